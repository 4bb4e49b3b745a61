"""The persistent compilation cache every command turns on: compile once per machine, not per run.

XLA programs compiled by train.py, eval.py, predict.py, demo.py and bench.py are written to a
cache directory and read back by the next run that compiles the same program (same model,
shapes, shardings, jax version and device), so a second start skips most of its compilation.

  directory: $DERIS_JAX_CACHE if set, else $XDG_CACHE_HOME/deris_jax/xla (by default
    ~/.cache/deris_jax/xla); `DERIS_JAX_CACHE=off` turns the cache off.
Programs that compile in under MIN_COMPILE_SECONDS are not written (not worth a file read).
The tests use their own directory (tests/conftest.py), so they never fill the user's.
"""
import os
import pathlib
from typing import Optional

import jax

ENV = "DERIS_JAX_CACHE"
MIN_COMPILE_SECONDS = 0.5


def default_directory() -> Optional[pathlib.Path]:
  """Where the cache lives (None when $DERIS_JAX_CACHE is 'off')."""
  configured = os.environ.get(ENV)
  if configured is not None:
    return None if configured.lower() in ("off", "0", "none", "") else pathlib.Path(
        configured).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "deris_jax" / "xla"


def enable(directory: Optional[os.PathLike] = None,
           min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Optional[pathlib.Path]:
  """Turns the persistent cache on (in `directory`, else `default_directory()`); returns the
  directory used, or None when it is off. Call before the first compilation."""
  path = pathlib.Path(directory) if directory is not None else default_directory()
  if path is None:
    return None
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
