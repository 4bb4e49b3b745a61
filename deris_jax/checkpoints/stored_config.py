"""The config a checkpoint was written with: every checkpoint is self-describing.

Training, `convert.py deris` and `convert.py pretrained` store `config.to_dict()` in the
`meta` item (manager.py). `stored_config` rebuilds it as a ConfigDict with the shared values
linked again (`config_check.link_shared`), so `--config.model.image_size=...` still moves
both sections, and checks it like a config file. JSON lists become tuples again. A checkpoint whose metadata has no config
(written before configs were stored) raises a CheckpointError that says to pass `--config`.
"""
import pathlib
from typing import Optional

import ml_collections

from deris_jax import config_check
from deris_jax.checkpoints.errors import CheckpointError
from deris_jax.checkpoints.manager import restore_meta

PASS_CONFIG = "pass --config configs/X.py[:arg] to say which model it holds"


def _tuples(value):
  """JSON lists back to the tuples the config files hold (sizes, depths, splits)."""
  if isinstance(value, dict):
    return {key: _tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(item) for item in value)
  return value


def stored_config(directory, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The ConfigDict stored in a checkpoint step's metadata (default: the latest step)."""
  directory = pathlib.Path(directory).absolute()
  meta = restore_meta(directory, step)
  stored = meta.get("config")
  if not isinstance(stored, dict) or "model" not in stored:
    what = "no config" if stored is None else "a config without a 'model' section"
    raise CheckpointError(f"{directory}: its metadata holds {what} (a checkpoint from an older "
                          f"layout); {PASS_CONFIG}")
  config = ml_collections.ConfigDict(_tuples(stored))
  try:
    return config_check.link_shared(config)
  except ValueError as e:
    raise CheckpointError(f"{directory}: the stored config is inconsistent ({e}); "
                          f"{PASS_CONFIG}") from e
