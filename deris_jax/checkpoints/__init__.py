"""Checkpoints, in one package: the Orbax format, params save/restore, the partial merge.

  errors.py    CheckpointError, the one error class (Orbax directories and official files)
  manager.py   the CheckpointManager factory, item names, steps and metadata
  params.py    save_params / restore_params, merge_params (partial initialisation), load_model,
               check_fit / stored_shapes (a checkpoint checked against a model, no array read)
  select.py    resolve: which directory `--checkpoint D --which latest|best` designates
  stored_config.py  stored_config: the config a checkpoint was written with
The train-state checkpointer (`deris_jax.train.checkpointing`) is built on the same factory.
"""
from deris_jax.checkpoints.errors import CheckpointError
from deris_jax.checkpoints.manager import (BEST_DIRECTORY, META, PARAMS, WHICH, all_steps,
                                           latest_step, manager, restore_args, restore_meta)
from deris_jax.checkpoints.params import (check_fit, load_model, merge_params, restore_params,
                                          save_params, stored_shapes)
from deris_jax.checkpoints.select import resolve
from deris_jax.checkpoints.stored_config import stored_config

__all__ = ["BEST_DIRECTORY", "CheckpointError", "META", "PARAMS", "WHICH", "all_steps",
           "check_fit", "latest_step", "load_model", "manager", "merge_params", "resolve",
           "restore_args", "restore_meta", "restore_params", "save_params", "stored_config",
           "stored_shapes"]
