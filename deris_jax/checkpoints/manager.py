"""The one Orbax `CheckpointManager` factory and the names every checkpoint shares.

Layout of a checkpoint directory (an Orbax manager directory, one sub-directory per step):
  params     the model parameters, nested dicts keyed by the NNX path parts
             (params['decoder']['query_SA']['0']['norm']['scale']; list indices read back as
             strings, and restore straight into int-keyed NNX pure dicts given a target)
  meta       JSON: `kind` ('converted' | 'pretrained' | 'train' | 'best'), the config, and
             what wrote it (source files and sha256, step, input position, best record, ...)
  and for training checkpoints `opt_state` and `train` (`deris_jax.train.checkpointing`).
A training run's `WORKDIR/checkpoints/best` is a manager directory of its own (one step,
params + meta of kind 'best').
"""
import pathlib
from typing import Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from deris_jax.checkpoints.errors import CheckpointError

PARAMS, META = "params", "meta"
BEST_DIRECTORY = "best"  # WORKDIR/checkpoints/best: the best-on-val params of a training run
WHICH = ("latest", "best")  # `--which` of eval.py / predict.py

# Orbax splits every replicated array into one slice per replica to write them in parallel
# (its CPU/TPU default). For the ~1500 small arrays of a DeRIS state that costs thousands of
# eagerly dispatched slices (measured: 8.5 s per save of the micro test config, 24 s the first
# time); arrays below this size are written whole by one replica instead.
MIN_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  th = ocp.type_handlers
  array = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_BYTES_FOR_REPLICA_PARALLEL)
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()), (jax.Array, array), (str, th.StringHandler()))


def manager(directory, *, pytree_items: Optional[Sequence[str]] = None,
            keep: Optional[int] = None, async_save: bool = False, create: bool = False,
            cleanup_tmp: bool = False) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager over `directory`.

  Args:
    pytree_items: writers name their array items (e.g. ('params',)): each gets a PyTree
      handler with our array writer settings, plus the JSON `meta`. None (readers): Orbax
      picks the handlers from the restore args.
    keep: how many steps to keep (None or 0: all).
    async_save: write in a background thread (`wait_until_finished` before reading).
    create: create `directory` if it is missing.
    cleanup_tmp: remove the temporary directories an interrupted save left. Only the writer
      of a directory may do that (a reader could remove a save in progress).
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None, create=create, cleanup_tmp_directories=cleanup_tmp,
      enable_async_checkpointing=async_save)
  handlers = None
  if pytree_items is not None:
    registry = _type_handlers()
    handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
                for name in pytree_items}
    handlers[META] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_handlers=handlers)


def restore_args(abstract) -> ocp.args.PyTreeRestore:
  """PyTree restore args that read every array straight into the abstract tree's shardings
  (a tree of `jax.ShapeDtypeStruct` with `sharding`), whatever mesh wrote it."""
  return ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def all_steps(directory) -> list:
  """The steps of a checkpoint directory ([] when it does not exist)."""
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    return []
  with manager(directory) as mngr:
    return list(mngr.all_steps())


def latest_step(directory) -> int:
  """The latest step of a checkpoint directory; CheckpointError when there is none."""
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  steps = all_steps(directory)
  if not steps:
    raise CheckpointError(f"{directory} holds no checkpoint step")
  return max(steps)


def restore_meta(directory, step: Optional[int] = None) -> dict:
  """The JSON `meta` item of a step (default: the latest)."""
  directory = pathlib.Path(directory).absolute()
  step = latest_step(directory) if step is None else step
  with manager(directory) as mngr:
    return dict(mngr.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META])
