"""jax's compilation caches in tests: a compile done afresh, as on a machine's first run."""
import contextlib
import pathlib

import jax


@contextlib.contextmanager
def fresh_jax_cache(directory: pathlib.Path):
  """jax's persistent cache in `directory` (empty: every program written) and its in-memory
  caches cleared, so the next compile is done afresh, as on a machine's first run; the suite's
  cache is restored afterwards."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top  (no public reset)
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.clear_caches()
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    yield pathlib.Path(directory)
  finally:
    jax.clear_caches()
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
