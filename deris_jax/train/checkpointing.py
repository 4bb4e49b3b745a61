"""Training checkpoints: the shared Orbax format plus what an exact resume needs.

Each step directory of `WORKDIR/checkpoints` holds the items
  params     every model parameter, nested dict with string keys (`deris_jax.checkpoint`
             format, so eval / predict / --init_from read it with `checkpoint.load_model`)
  meta       JSON: kind 'train', the config, the step, and `data` = the input position
             (epoch, batches consumed in it, steps per epoch, global batch, seed)
  opt_state  the optimizer state as a nested dict named by its tree paths
  train      step and the train key data
Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
save interrupted by a kill leaves the previous step the latest one; unfinished temporary
directories are removed when the manager opens. Restoring reads straight into the
shardings of the current mesh (which may differ from the one that saved).
"""
import pathlib
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from deris_jax import checkpoint as ckpt_lib
from deris_jax.train import params as P
from deris_jax.train.state import Trainer, TrainState


def _abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def _named_tree(tree) -> Dict[str, Any]:
  """Any pytree -> nested dict keyed by its path names (what Orbax stores)."""
  return ckpt_lib.unflatten(P.named_leaves(tree))


def _from_named_tree(named: Dict[str, Any], like, *, item: str):
  """Inverse of `_named_tree` given a tree of the wanted structure."""
  flat = ckpt_lib.flatten_tree(named)
  names = P.named_leaves(like)
  missing = sorted(set(names) - set(flat))
  if missing:
    raise ckpt_lib.CheckpointError(f"checkpoint item '{item}' lacks {len(missing)} entries "
                                   f"(e.g. '{missing[0]}'): was it written by another config?")
  leaves = [flat[name] for name in names]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


# Orbax splits every replicated array into one slice per replica to write them in parallel
# (its CPU/TPU default). For the ~1500 small arrays of a DeRIS state that costs thousands of
# eagerly dispatched slices (measured: 8.5 s per save of the micro test config, 24 s the first
# time); arrays below this size are written whole by one replica instead.
MIN_BYTES_FOR_REPLICA_PARALLEL = 4 << 20
PYTREE_ITEMS = ("params", "opt_state", "train")


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  th = ocp.type_handlers
  array = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_BYTES_FOR_REPLICA_PARALLEL)
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()), (jax.Array, array), (str, th.StringHandler()))


def _pytree_restore(abstract) -> ocp.args.PyTreeRestore:
  """Restore args that read every array straight into the abstract tree's shardings."""
  return ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
  """Periodic, keep-N, optionally asynchronous train checkpoints in `directory`."""

  def __init__(self, directory, *, keep: Optional[int], async_save: bool):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    registry = _type_handlers()
    handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
                for name in PYTREE_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, state: TrainState, *, config: mlc.ConfigDict, data_position: Dict[str, int],
           extra_meta: Optional[Dict[str, Any]] = None) -> int:
    """Writes the state at its step (returns it); async saves copy to host before returning."""
    step = int(jax.device_get(state.step))
    meta = dict(kind="train", config=config.to_dict(), step=step, data=dict(data_position),
                **(extra_meta or {}))
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(P.to_checkpoint_tree(state.params)),
        opt_state=ocp.args.PyTreeSave(_named_tree(state.opt_state)),
        train=ocp.args.PyTreeSave(dict(step=state.step, rng=state.rng)),
        meta=ocp.args.JsonSave(meta))
    with jax.transfer_guard("allow"):  # the device-to-host copy is the point of saving
      self._manager.save(step, args=args, force=True)
    return step

  def restore(self, trainer: Trainer, step: Optional[int] = None
              ) -> Tuple[TrainState, Dict[str, Any]]:
    """(state in the trainer's shardings, meta) of a step (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ckpt_lib.CheckpointError(f"{self.directory} holds no checkpoint")
    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    params_abs = _abstract_with_shardings(abstract.params, shardings.params)
    opt_abs = _abstract_with_shardings(abstract.opt_state, shardings.opt_state)
    train_abs = dict(step=jax.ShapeDtypeStruct((), abstract.step.dtype, sharding=shardings.step),
                     rng=jax.ShapeDtypeStruct(abstract.rng.shape, abstract.rng.dtype,
                                              sharding=shardings.rng))
    args = ocp.args.Composite(
        params=_pytree_restore(P.to_checkpoint_tree(params_abs)),
        opt_state=_pytree_restore(_named_tree(opt_abs)),
        train=_pytree_restore(train_abs),
        meta=ocp.args.JsonRestore())
    try:
      with jax.transfer_guard("allow"):
        restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ckpt_lib.CheckpointError(
          f"{self.directory} step {step}: cannot restore the train state ({e}); was it "
          "written by another model or optimizer config?") from e
    params = P.from_checkpoint_tree(restored["params"], abstract.params,
                                    source=f"{self.directory} step {step}")
    opt_state = _from_named_tree(restored["opt_state"], abstract.opt_state, item="opt_state")
    state = TrainState(step=restored["train"]["step"], params=params, opt_state=opt_state,
                       rng=restored["train"]["rng"],
                       first_nonfinite_step=jax.device_put(np.int32(-1),
                                                        shardings.first_nonfinite_step))
    return state, dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until a pending asynchronous save is complete."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
