"""Compiled programs kept on disk under what they are built from: a warm start skips tracing.

jax's persistent compilation cache (`compile_cache`) is keyed on the *lowered* program, so even
a warm start first traces and lowers it (and hashes the result for its key). This cache keys a
program on what it is built from instead, and a hit loads the serialized executable without
tracing anything: the default job's warm first step takes 6.1-7.1 s instead of 12.2-13.6 s on
2 CPU cores (BENCHMARKS.md).

  key: sha256 of the program's name and the caller's description of it (the config sections it
    reads, the model structure), the abstract arguments (tree structure, shapes, dtypes,
    shardings and their devices), the source of the deris_jax package, the versions of
    Python, jax, jaxlib, flax, optax and numpy, jax's settings that change tracing (x64, matmul
    precision, PRNG implementation: jax's own trace-cache key), the backend (platform, its
    version, every device's id, kind and process), $XLA_FLAGS and the compiler options.
  file: <the persistent cache's directory>/executables/<name>-<key>.jaxexe, written only while
    that cache is on (`DERIS_JAX_CACHE=off` turns both off); at most KEEP_PER_NAME files per
    name are kept (the least recently used are removed), since each code edit makes new keys.

Only a program compiled afresh in this process is written, known by jax's own record that it
compiled it and wrote it to its cache ('/jax/compilation_cache/cache_misses', in the compiling
thread, with no cache hit). XLA:CPU cannot serialize an executable it read back from a cache:
written again, it loads but fails when run ("Function ... not found"). So a program that jax's
cache already held when this key was new (after a code edit that left the program as it was)
keeps jax's warm start, tracing included, until it is compiled afresh; a jax that records
other events makes this cache write nothing, never a broken file.

What the key does not read must not change the program: code outside `deris_jax/` (the
commands only call into it) and environment variables other than XLA_FLAGS. A file that cannot
be read back (truncated, or from another build that the versions do not tell apart) is reported,
removed and compiled again. Loading runs pickle: like jax's `deserialize_and_load`, it is only
for files this cache wrote in the user's own directory.

Single process only: with several processes (`jax.distributed`) every host compiles through
jax's persistent cache as before. Programs loaded or compiled here are also kept in memory
(MAX_IN_MEMORY), so a second run in the same process (tests, a notebook) reuses them.
"""
import collections
import functools
import hashlib
import os
import pathlib
import pickle
import re
import sys
import tempfile
import threading
from typing import Any, Callable, Optional, Tuple

import jax
from jax.experimental import serialize_executable
import numpy as np

SUBDIRECTORY = "executables"
SUFFIX = ".jaxexe"
KEEP_PER_NAME = 4
MAX_IN_MEMORY = 4
_PACKAGE = pathlib.Path(__file__).resolve().parent
_in_memory: "collections.OrderedDict[str, Any]" = collections.OrderedDict()  # key -> Compiled
# jax.monitoring events of its persistent cache: compiled afresh and written, or read back.
WRITTEN_EVENT = "/jax/compilation_cache/cache_misses"
HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread_events = threading.local()  # .seen: the events of this thread's compile, while watched
_listening = threading.Lock()
_listener_registered = False


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  seen = getattr(_thread_events, "seen", None)
  if seen is not None and event in (WRITTEN_EVENT, HIT_EVENT):
    seen.add(event)


def _compile_watched(jitted: Callable, args: Tuple):
  """(jitted.lower(*args).compile(), whether jax compiled it afresh in this thread)."""
  global _listener_registered
  with _listening:
    if not _listener_registered:
      jax.monitoring.register_event_listener(_on_event)
      _listener_registered = True
  _thread_events.seen = set()
  try:
    compiled = jitted.lower(*args).compile()
    seen = _thread_events.seen
  finally:
    _thread_events.seen = None
  return compiled, seen == {WRITTEN_EVENT}


@functools.lru_cache(maxsize=None)
def package_digest() -> str:
  """sha256 of every .py file of the deris_jax package (paths and contents)."""
  digest = hashlib.sha256()
  for path in sorted(_PACKAGE.rglob("*.py")):
    digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def stable_repr(value: Any) -> str:
  """repr without the memory addresses Python puts in the reprs of functions and objects."""
  return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _sharding_description(sharding) -> str:
  if sharding is None:
    return "None"
  devices = sorted(d.id for d in sharding.device_set)
  return f"{stable_repr(sharding)} on {devices}"


def arguments_description(args) -> str:
  """The abstract arguments: tree structure, and each leaf's shape, dtype and sharding."""
  leaves, treedef = jax.tree.flatten(args)
  lines = [stable_repr(treedef)]
  for leaf in leaves:
    lines.append(f"{tuple(leaf.shape)} {leaf.dtype} "
                 f"{_sharding_description(getattr(leaf, 'sharding', None))}")
  return "\n".join(lines)


def _jax_settings() -> str:
  """jax's settings that change what a function traces to (x64, matmul precision, the PRNG
  implementation, ...): the values jax keys its own trace cache on."""
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    return stable_repr(jax_config.trace_context())
  except (ImportError, AttributeError):  # another jax: every setting (more misses, none stale)
    return stable_repr(sorted(jax.config.values.items()))


def environment_description() -> str:
  """The software, settings and devices a compiled program is only valid for."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  backend = jax.devices()[0].client
  devices = [(d.id, d.device_kind, d.process_index) for d in jax.devices()]
  return "\n".join([
      f"python {sys.version}", f"jax {jax.__version__} jaxlib {jaxlib.__version__}",
      f"flax {flax.__version__} optax {optax.__version__} numpy {np.__version__}",
      f"backend {backend.platform} {backend.platform_version}", f"devices {devices}",
      f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')}", f"jax settings {_jax_settings()}",
      f"deris_jax {package_digest()}"])


def program_key(name: str, description: str, args, compiler_options=None) -> str:
  """The file key of program `name` built from `description` for the abstract `args`."""
  options = sorted((compiler_options or {}).items())
  text = "\n\n".join([name, description, arguments_description(args), stable_repr(options),
                      environment_description()])
  return hashlib.sha256(text.encode()).hexdigest()[:40]


def directory() -> Optional[pathlib.Path]:
  """Where the executables are kept: beside jax's persistent cache, None while it is off."""
  cache_dir = jax.config.jax_compilation_cache_dir
  return pathlib.Path(cache_dir) / SUBDIRECTORY if cache_dir else None


def _device_ids(compiled) -> Tuple[int, ...]:
  """The ids of the devices the program runs on, in its device assignment's order (loading
  needs them: by default jax would load it for all devices)."""
  unloaded = getattr(compiled._executable, "_unloaded_executable", None)  # pylint: disable=protected-access
  device_list = getattr(unloaded, "device_list", None)  # older jax named it device_assignment
  if device_list is None:
    device_list = getattr(unloaded, "device_assignment", None)
  if device_list is None:
    raise ValueError("this jax does not say which devices a compiled program runs on")
  return tuple(d.id for d in device_list)


def _write(path: pathlib.Path, compiled) -> None:
  blob, in_tree, out_tree = serialize_executable.serialize(compiled)
  device_ids = _device_ids(compiled)
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as f:
      pickle.dump((device_ids, in_tree, out_tree, blob), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.chmod(tmp, 0o644)  # mkstemp's files are private; these are as readable as jax's own
    os.replace(tmp, path)  # whole or not at all, even with several writers
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _read(path: pathlib.Path):
  with open(path, "rb") as f:
    device_ids, in_tree, out_tree, blob = pickle.load(f)
  devices = {d.id: d for d in jax.devices()}
  return serialize_executable.deserialize_and_load(
      blob, in_tree, out_tree, execution_devices=[devices[i] for i in device_ids])


def _remove(path: pathlib.Path) -> None:
  try:
    path.unlink(missing_ok=True)
  except OSError:  # another user's file in a shared directory: left, it is only read
    pass


def _prune(folder: pathlib.Path, name: str, keep: int) -> None:
  """Keeps the `keep` most recently used files of program `name`."""
  used = {}
  for path in folder.glob(f"{name}-*{SUFFIX}"):
    try:
      used[path] = path.stat().st_mtime
    except OSError:  # removed meanwhile by another process
      pass
  for old in sorted(used, key=used.get, reverse=True)[keep:]:
    _remove(old)


def load_or_compile(name: str, jitted: Callable, args: Tuple, *, description: str,
                    compiler_options=None, log: Callable[[str], None] = print
                    ) -> Tuple[Any, str]:
  """`jitted.lower(*args).compile()`, read from disk or memory when the key was seen before.

  `args`: the abstract arguments (ShapeDtypeStructs with shardings). `description`: everything
  besides the arguments, the environment and the package source that the program is built
  from. Returns (the compiled program, where it came from: 'memory', 'disk', 'compiled').
  """
  if jax.process_count() > 1:
    return jitted.lower(*args).compile(), "compiled"
  key = program_key(name, description, args, compiler_options)
  if key in _in_memory:
    _in_memory.move_to_end(key)
    return _in_memory[key], "memory"
  folder = directory()
  path = folder / f"{name}-{key}{SUFFIX}" if folder is not None else None
  compiled, origin = None, "compiled"
  if path is not None and path.exists():
    try:
      compiled, origin = _read(path), "disk"
    except Exception as e:  # pylint: disable=broad-except  (any unreadable file: compile again)
      log(f"warning: cannot read the cached executable {path} ({type(e).__name__}: {e}); "
          "removed, compiling again")
      _remove(path)
    else:
      try:
        os.utime(path)  # recently used: kept by _prune
      except OSError:
        pass
  if compiled is None:
    compiled, fresh = _compile_watched(jitted, args)
    if path is not None and fresh:
      try:
        _write(path, compiled)
        _prune(folder, name, KEEP_PER_NAME)
      except Exception as e:  # pylint: disable=broad-except  (full disk, unserializable: the
        # program is compiled all the same; only the next start is slower)
        log(f"warning: the compiled {name} is not cached on disk ({type(e).__name__}: {e})")
  _in_memory[key] = compiled
  while len(_in_memory) > MAX_IN_MEMORY:
    _in_memory.popitem(last=False)
  return compiled, origin
