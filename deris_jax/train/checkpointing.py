"""Training checkpoints: the shared format (`deris_jax.checkpoints`) plus what an exact
resume needs.

Each step directory of `WORKDIR/checkpoints` holds the items
  params     the train state's params (the NNX pure dict), read by eval / predict /
             --init_from with `checkpoints.load_model` / `restore_params`
  meta       JSON: kind 'train', the config, the step, `data` = the input position (epoch,
             batches consumed in it, steps per epoch, global batch, seed) and the best record
  opt_state  the optimizer state as nested dicts named by its tree paths (stable across optax
             versions, whose state classes change)
  train      step and the train key data
Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
save interrupted by a kill leaves the previous step the latest one; unfinished temporary
directories are removed when the manager opens. Restoring reads straight into the
shardings of the current mesh (which may differ from the one that saved).

The best-on-val params (`deris_jax.train.best`) go to `WORKDIR/checkpoints/best`, a manager
directory of its own (one step: params + meta of kind 'best'), after the train checkpoint of
the same step, so the best never gets ahead of the train checkpoints: a run killed between the
two writes resumes from that train checkpoint and writes the best from it.
"""
import pathlib
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from deris_jax import checkpoints, trees
from deris_jax.train.best import json_safe
from deris_jax.train.state import Trainer, TrainState

OPT_STATE, TRAIN = "opt_state", "train"
PYTREE_ITEMS = (checkpoints.PARAMS, OPT_STATE, TRAIN)


class Checkpointer:
  """Periodic, keep-N, optionally asynchronous train checkpoints in `directory`, and the best
  one in `directory/best` (`save_best`, synchronous)."""

  def __init__(self, directory, *, keep: Optional[int], async_save: bool):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = checkpoints.manager(self.directory, pytree_items=PYTREE_ITEMS, keep=keep,
                                        async_save=async_save, create=True, cleanup_tmp=True)
    self.best_directory = self.directory / checkpoints.BEST_DIRECTORY
    self._best = None
    if self.best_directory.is_dir():  # opening removes what a killed best save left
      self._best_manager()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, state: TrainState, *, config: mlc.ConfigDict, data_position: Dict[str, int],
           extra_meta: Optional[Dict[str, Any]] = None) -> int:
    """Writes the state at its step (returns it); async saves copy to host before returning.

    `state` in the stored layout (`Trainer.to_stored`: one subtree per layer)."""
    step = int(jax.device_get(state.step))
    meta = dict(kind="train", config=config.to_dict(), step=step, data=dict(data_position),
                **(extra_meta or {}))
    args = ocp.args.Composite(**{
        checkpoints.PARAMS: ocp.args.PyTreeSave(state.params),
        OPT_STATE: ocp.args.PyTreeSave(trees.unflatten(trees.named_leaves(state.opt_state))),
        TRAIN: ocp.args.PyTreeSave(dict(step=state.step, rng=state.rng)),
        checkpoints.META: ocp.args.JsonSave(meta)})
    with jax.transfer_guard("allow"):  # the device-to-host copy is the point of saving
      self._manager.save(step, args=args, force=True)
    return step

  def restore(self, trainer: Trainer, step: Optional[int] = None
              ) -> Tuple[TrainState, Dict[str, Any]]:
    """(state in the trainer's layout and shardings, meta) of a step (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise checkpoints.CheckpointError(f"{self.directory} holds no checkpoint")
    # One subtree per layer, as checkpoints hold it; every leaf carries its sharding.
    abstract = trainer.stored_abstract_state()
    args = ocp.args.Composite(**{
        checkpoints.PARAMS: checkpoints.restore_args(abstract.params),
        OPT_STATE: checkpoints.restore_args(
            trees.unflatten(trees.named_leaves(abstract.opt_state))),
        TRAIN: checkpoints.restore_args(dict(step=abstract.step, rng=abstract.rng)),
        checkpoints.META: ocp.args.JsonRestore()})
    try:
      with jax.transfer_guard("allow"):
        restored = self._manager.restore(step, args=args)
      opt_state = trees.unflatten_like(trees.named_leaves(restored[OPT_STATE]),
                                       abstract.opt_state, what=f"item '{OPT_STATE}'")
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise checkpoints.CheckpointError(
          f"{self.directory} step {step}: cannot restore the train state ({e}); was it "
          "written by another model or optimizer config?") from e
    state = TrainState(step=restored[TRAIN]["step"], params=restored[checkpoints.PARAMS],
                       opt_state=opt_state, rng=restored[TRAIN]["rng"],
                       first_nonfinite_step=jax.device_put(
                           np.int32(-1), abstract.first_nonfinite_step.sharding),
                       steps_per_epoch=jax.device_put(np.int32(trainer.steps_per_epoch),
                                                      abstract.steps_per_epoch.sharding))
    return trainer.from_stored(state), dict(restored[checkpoints.META])

  def wait(self) -> None:
    """Blocks until a pending asynchronous save is complete."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def _best_manager(self) -> ocp.CheckpointManager:
    if self._best is None:
      self._best = checkpoints.manager(self.best_directory, pytree_items=(checkpoints.PARAMS,),
                                       keep=1, create=True, cleanup_tmp=True)
    return self._best

  def best_step(self) -> Optional[int]:
    """The step of the best checkpoint (None: none written)."""
    if self._best is None and not self.best_directory.is_dir():
      return None
    return self._best_manager().latest_step()

  def save_best(self, state: TrainState, *, meta: Dict[str, Any]) -> int:
    """Writes the params of `state` (stored layout) as the best checkpoint (replacing the
    previous one).

    Synchronous and atomic: Orbax writes a temporary directory, renames it when complete and
    only then removes the previous best, so a kill leaves the previous or the new best.
    """
    step = int(meta["step"])
    mngr = self._best_manager()
    if step in mngr.all_steps():  # written before the train checkpoints were rolled back
      mngr.delete(step)
    args = ocp.args.Composite(**{
        checkpoints.PARAMS: ocp.args.PyTreeSave(state.params),
        checkpoints.META: ocp.args.JsonSave(json_safe(dict(meta, kind="best")))})
    with jax.transfer_guard("allow"):
      mngr.save(step, args=args, force=True)
      mngr.wait_until_finished()
    return step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._best is not None:
      self._best.close()
