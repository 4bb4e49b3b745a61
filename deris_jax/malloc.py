"""A faster memory allocator for the commands: the process re-executes itself once with one preloaded.

XLA's compiler (HLO passes, MLIR emitters, LLVM) makes and frees millions of small objects,
and XLA:CPU's runtime allocates each step's buffers; glibc's malloc spends a fifth of a
compile in itself. With tcmalloc preloaded, the default job's train step (2-core CPU,
BENCHMARKS.md "A faster malloc") compiles in ~81% of the time and runs its steps in ~77%.

A library can only replace malloc when it is loaded before the process starts (`LD_PRELOAD`),
so each command calls `reexec_with_fast_malloc()` first, before its heavy imports: when an
allocator is found and none is loaded yet, the process replaces itself (`os.execve`, the same
interpreter, flags, arguments, process id and open files) with the allocator preloaded.
Child processes inherit it. `DERIS_JAX_MALLOC` chooses:

  auto (default)  the first of tcmalloc, jemalloc, mimalloc found in the system's library
                  folders or `LD_LIBRARY_PATH` (Debian/Ubuntu: `apt-get install
                  libtcmalloc-minimal4`; Fedora: `gperftools-libs`; conda: `gperftools`);
                  nothing happens when none is installed
  off             never re-execute
  /path/lib.so    that library (an error names the path when it is not a file)

A parent that only starts workers (pytest's xdist controller, tests/conftest.py) calls
`preload_for_children()` instead: the processes it starts load the allocator from their start.
Linux only (elsewhere a no-op). `active()` names the allocator in use; bench.py and
benchmarks/compile_time print it (`describe()`) beside their figures.
"""
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

ENV = "DERIS_JAX_MALLOC"
REEXEC_ENV = "_DERIS_JAX_MALLOC_PRELOADED"  # set where it is preloaded: never twice

# In order of preference (measured: tcmalloc compiled and stepped fastest, BENCHMARKS.md).
CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2",
              "libmimalloc.so.2")
# Library names by which an allocator already in the process is recognised.
KNOWN = ("tcmalloc", "jemalloc", "mimalloc", "tbbmalloc", "hoard", "snmalloc")


def search_dirs() -> Tuple[str, ...]:
  """Folders searched for `CANDIDATES`: LD_LIBRARY_PATH, then the system's library folders."""
  arch = getattr(sys.implementation, "_multiarch", "") or ""
  user = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
  system = [f"/usr/local/lib/{arch}", "/usr/local/lib", f"/usr/lib/{arch}", f"/lib/{arch}",
            "/usr/lib64", "/lib64", "/usr/lib", os.path.join(sys.prefix, "lib")]
  return tuple(dict.fromkeys(d for d in user + system if d and not d.endswith("/")))


def find(setting: str, dirs: Sequence[str]) -> Optional[str]:
  """The library `setting` asks for: a path, or the first candidate in `dirs` (None: off, or
  none installed)."""
  if setting == "off":
    return None
  if setting != "auto":
    if not os.path.isfile(setting):
      raise SystemExit(f"error: {ENV}={setting!r} is neither 'auto', 'off' nor a library file")
    return os.path.abspath(setting)
  for name in CANDIDATES:
    for folder in dirs:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return path
  return None


def active() -> Optional[str]:
  """The allocator this process uses: the file name of a known one mapped into it, or the
  library this module preloaded; None: the C library's own malloc."""
  try:
    with open("/proc/self/maps") as maps:
      mapped = {line.split()[-1] for line in maps if "/" in line}
  except OSError:
    return None
  for path in sorted(mapped):
    if any(key in os.path.basename(path) for key in KNOWN):
      return os.path.basename(path)
  preloaded = os.environ.get(REEXEC_ENV)
  if preloaded and os.path.realpath(preloaded) in {os.path.realpath(p) for p in mapped}:
    return os.path.basename(preloaded)
  return None


def describe() -> str:
  """The allocator in use, for the lines benchmarks print beside their figures."""
  return active() or "of the C library"


def preloaded_environ() -> Optional[Dict[str, str]]:
  """This process's environment with the allocator `$DERIS_JAX_MALLOC` picks preloaded, for a
  process to start with; None when that is off, not on Linux, already done, an allocator is
  already loaded, or none is installed."""
  if not sys.platform.startswith("linux") or os.environ.get(REEXEC_ENV):
    return None
  library = find(os.environ.get(ENV, "auto"), search_dirs())
  if library is None or active() is not None:
    return None
  preload = [library] + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
  env = dict(os.environ, LD_PRELOAD=":".join(preload), **{REEXEC_ENV: library})
  # tcmalloc reports every allocation above 1 GiB on stderr unless told otherwise.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  return env


def reexec_with_fast_malloc() -> None:
  """Replaces this process with itself plus a faster malloc, once; returns when that is off,
  not on Linux, already done, an allocator is already loaded, or none is installed."""
  env = preloaded_environ()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + list(sys.orig_argv[1:]), env)


def preload_for_children() -> Optional[str]:
  """Makes the processes this one starts from now on load the faster malloc (`LD_PRELOAD` in
  `os.environ`); this process keeps the allocator it has. For a parent that only starts
  workers, e.g. pytest's xdist controller (tests/conftest.py). Returns the library, or None
  where `reexec_with_fast_malloc` would not re-execute."""
  env = preloaded_environ()
  if env is None:
    return None
  os.environ.update(env)
  return env[REEXEC_ENV]
