"""The learning-rate schedule: the official per-epoch factors, as a function of the train step.

The official scheduler (`deris/core/scheduler.py::MultiStepLRWarmUp`, docs/design.md §9) is a
LambdaLR stepped once per epoch, so the learning rate is constant within an epoch:
  epoch < warmup_epochs:  factor (epoch + 1) / (warmup_epochs + 1)   (no per-step ramp)
  else, decay_epochs set: decay_ratio ** #{s in decay_epochs : epoch + 1 >= s}
  else (linear decay):    (epochs - warmup_epochs - (epoch - warmup_epochs)) /
                          (epochs - warmup_epochs)
Here the epoch of a step is `step // steps_per_epoch` (0-based steps). Steps per epoch is an
argument of the schedule, not a constant of the program: the train step reads it from the
train state, so runs over datasets of any size (RefCOCO, RefCOCO+, RefCOCOg, or `train.py
--dry_run`, which has no dataset) compile the same train step and share it through the caches.
"""
from typing import Callable, Dict

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np


def _warmup(epoch: int, warmup_epochs: int):
  if epoch <= warmup_epochs - 1:
    return float(epoch + 1) / float(warmup_epochs + 1)
  return None


def multistep_warmup(config: mlc.ConfigDict, epoch: int, epochs: int) -> float:
  """`MultiStepLRWarmUp` with decay_steps: step decay after a constant warmup."""
  del epochs
  factor = _warmup(epoch, config.warmup_epochs)
  if factor is not None:
    return factor
  factor = 1.0
  for step in config.decay_epochs:  # the official loop: break at the first step not reached
    if epoch + 1 < step:
      break
    factor *= config.decay_ratio
  return factor


def linear_warmup(config: mlc.ConfigDict, epoch: int, epochs: int) -> float:
  """`MultiStepLRWarmUp` with decay_steps=None: linear decay to 0 after the warmup."""
  factor = _warmup(epoch, config.warmup_epochs)
  if factor is not None:
    return factor
  span = epochs - config.warmup_epochs
  return (span - (epoch - config.warmup_epochs)) / span


def constant(config: mlc.ConfigDict, epoch: int, epochs: int) -> float:
  del config, epoch, epochs
  return 1.0


SCHEDULES: Dict[str, Callable[[mlc.ConfigDict, int, int], float]] = {
    "multistep_warmup": multistep_warmup,
    "linear_warmup": linear_warmup,
    "constant": constant,
}


def epoch_factor(schedule_config: mlc.ConfigDict, epoch: int, epochs: int) -> float:
  """The learning-rate factor of a 0-based epoch (host-side, Python floats)."""
  if schedule_config.name not in SCHEDULES:
    raise ValueError(f"unknown schedule '{schedule_config.name}' (config schedule.name); "
                     f"known: {sorted(SCHEDULES)}")
  return SCHEDULES[schedule_config.name](schedule_config, epoch, epochs)


def epoch_factors(schedule_config: mlc.ConfigDict, epochs: int) -> np.ndarray:
  """(epochs,) float32 factors of every epoch."""
  if epochs < 1:
    raise ValueError(f"config train.epochs={epochs} must be >= 1")
  return np.asarray([epoch_factor(schedule_config, e, epochs) for e in range(epochs)],
                    np.float32)


def make_lr_schedule(base_lr: float, schedule_config: mlc.ConfigDict, *, epochs: int
                     ) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
  """(step, steps_per_epoch) (int arrays, 0-based step) -> learning rate (float32):
  base_lr x factor(step // steps_per_epoch).

  Steps past the last epoch keep the last epoch's factor. Steps per epoch must be >= 1
  (`check_steps_per_epoch`; the caller checks it on the host).
  """
  lrs = jnp.asarray(base_lr * epoch_factors(schedule_config, epochs), jnp.float32)  # (E,)

  def schedule(step, steps_per_epoch):
    epoch = jnp.minimum(jnp.asarray(step) // jnp.asarray(steps_per_epoch), epochs - 1)  # ()
    return lrs[epoch]

  return schedule


def check_steps_per_epoch(steps_per_epoch: int) -> int:
  """`steps_per_epoch` as an int, or a ValueError when it is below 1."""
  if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be an integer >= 1")
  return int(steps_per_epoch)
