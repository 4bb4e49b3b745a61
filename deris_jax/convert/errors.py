"""The error of the checkpoint readers, and the guard that turns a damaged file's exceptions
into it (naming the file)."""
import contextlib
import os
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
  """A checkpoint file cannot be read; the message names the file and what is wrong."""


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
