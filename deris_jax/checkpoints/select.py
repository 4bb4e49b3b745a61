"""Which checkpoint `--checkpoint DIRECTORY --which latest|best` designates."""
import pathlib

from deris_jax.checkpoints.errors import CheckpointError
from deris_jax.checkpoints.manager import BEST_DIRECTORY, WHICH, all_steps, restore_meta


def _no_best_message(directory: pathlib.Path) -> str:
  """Why `directory` (a train checkpoint directory) has no best checkpoint yet."""
  best = directory / BEST_DIRECTORY
  steps = all_steps(directory)
  meta = restore_meta(directory, max(steps)) if steps else {}
  if meta.get("kind") != "train":
    what = f"kind '{meta['kind']}'" if "kind" in meta else "no checkpoint step"
    return (f"no best checkpoint in {best}: {directory} is not a training run's checkpoint "
            f"directory ({what}; converted or pretrained weights have no best); use --which "
            "latest")
  record = meta.get("best") or {}
  start = record.get("start_epoch",
                     meta.get("config", {}).get("eval", {}).get("best_start_epoch"))
  start_text = "" if start is None else (
      f" of epoch {start} or later (eval.best_start_epoch {start}, epochs 0-based)")
  what = (f"{record['aggregate']} {record['metric']} over {', '.join(record['splits'])}"
          if record.get("metric") else "validation metric")
  epoch = meta.get("data", {}).get("epoch")
  latest = f"step {meta.get('step', max(steps))}" + (f" (in epoch {epoch})"
                                                     if epoch is not None else "")
  so_far = record.get("best")
  if not record.get("history"):
    so_far_text = "; it records no evaluation yet"
  elif so_far is None:
    so_far_text = "; no evaluation has given a finite value yet"
  elif record.get("saved_step") is None:
    so_far_text = (f"; the best so far, {so_far['value']:.2f} at epoch {so_far['epoch']}, came "
                   "before that epoch")
  else:
    so_far_text = (f"; it records a best checkpoint of step {record['saved_step']}, which is "
                   "missing (removed?)")
  return (f"no best checkpoint in {best}: training writes it after an evaluation{start_text} "
          f"whose {what} beats every earlier evaluation. The latest train checkpoint is "
          f"{latest}{so_far_text}. Use --which latest for the latest checkpoint.")


def resolve(directory, which: str = "latest") -> pathlib.Path:
  """The checkpoint directory that `--checkpoint DIRECTORY --which WHICH` designates.

  'latest': DIRECTORY itself (its latest step, or `--step`). 'best': DIRECTORY/best when
  DIRECTORY is a training run's checkpoint directory, or DIRECTORY when it is such a best
  directory already. A missing best raises a CheckpointError saying when training writes it.
  """
  if which not in WHICH:
    raise CheckpointError(f"--which {which!r}: expected one of {', '.join(WHICH)}")
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  if which == "latest":
    return directory
  best = directory / BEST_DIRECTORY
  if all_steps(best):
    return best
  if directory.name == BEST_DIRECTORY and not best.exists() and all_steps(directory):
    return directory  # WORKDIR/checkpoints/best given directly
  raise CheckpointError(_no_best_message(directory))
