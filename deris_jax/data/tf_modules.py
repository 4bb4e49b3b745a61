"""TensorFlow and TFDS for the data package: imported in one place, quietly.

TensorFlow prints C++ lines while it is imported ("oneDNN custom operations are on", on CPUs
where oneDNN is on), before absl's log is set up, so TF_CPP_MIN_LOG_LEVEL does not reach them.
In quiet mode (`deris_jax.cli`: --verbosity 0, the default) the import runs with the process's
stderr (file descriptor 2) sent to /dev/null, and with TF_CPP_MIN_LOG_LEVEL at 3 unless the
user exported one. With --verbosity 1 or more, or TF_CPP_MIN_LOG_LEVEL=0 exported, it prints
what it prints. A Python error of the import is raised as usual.

  from deris_jax.data.tf_modules import tf, tfds
"""
import contextlib
import os
import sys

from deris_jax import cli


@contextlib.contextmanager
def _stderr_to_devnull():
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _quiet() -> bool:
  return "tensorflow" not in sys.modules and not cli.verbose() and (
      cli.user_tf_cpp_level() != "0")


_QUIET = _quiet()
if _QUIET and cli.user_tf_cpp_level() is None:
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TF's later C++ logs too (read at its import)
with _stderr_to_devnull() if _QUIET else contextlib.nullcontext():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

__all__ = ["tf", "tfds"]
