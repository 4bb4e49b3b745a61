"""The guards of the checkpoint readers: a file that must exist, and the context that turns a
damaged file's exceptions into the one `CheckpointError` (`deris_jax.checkpoints.errors`),
naming the file."""
import contextlib
import os
from typing import Iterator, Union

from deris_jax.checkpoints.errors import CheckpointError

PathLike = Union[str, os.PathLike]
__all__ = ["CheckpointError", "PathLike", "existing_file", "reraise"]


def existing_file(path: PathLike) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not a regular file")
  return path


@contextlib.contextmanager
def reraise(path: str, what: str) -> Iterator[None]:
  """Turns the errors a damaged file can cause into a CheckpointError naming it."""
  try:
    yield
  except CheckpointError:
    raise
  except MemoryError as e:
    raise CheckpointError(f"{path}: out of memory reading the {what}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from e
