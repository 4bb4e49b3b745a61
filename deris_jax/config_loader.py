"""Loads `configs/X.py[:arg]` files (ml_collections `get_config(arg)`) with `key=value` overrides.

e.g. `configs/deris.py:variant=l,data=grefcoco` or its alias `configs/deris_l_grefcoco.py`.
train.py uses absl's `config_flags` for the same syntax; this is for the argparse commands
(through `deris_jax.cli`: `--config.a.b=VALUE` becomes the override 'a.b=VALUE') and for
tests. Both run `config_check.check_config` on the result; a bad override raises
`OverrideError` (a ValueError) naming it. Config files are read by path (the package never imports them); they import
`configs.common` and its siblings, so the repository root must be importable: it is for the
commands (their folder) and for pytest (`pythonpath = .`).
"""
import ast
import importlib.util
import pathlib
from typing import Sequence

import ml_collections

from deris_jax import config_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


class OverrideError(ValueError):
  """A `--config.a.b=VALUE` that names no field or gives a value of the wrong type."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """'configs/deris.py:variant=b,data=refcoco' -> checked ConfigDict; overrides like
  'model.dtype=bfloat16' (an override of a shared value, e.g. model.image_size, moves both)."""
  path_str, _, arg = spec.partition(":")
  path = pathlib.Path(path_str)
  if not path.is_file() and (ROOT / path).is_file():
    path = ROOT / path
  if not path.is_file():
    raise FileNotFoundError(f"config file {path_str} not found")
  module_spec = importlib.util.spec_from_file_location(f"_deris_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} has no get_config(arg)")
  config = module.get_config(arg or None)
  for item in overrides:
    apply_override(config, item)
  config_check.check_config(config)
  return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Sets 'a.b=value'; the value is parsed as a Python literal when possible and must keep
  the type of the existing field."""
  key, sep, raw = item.partition("=")
  if not sep:
    raise OverrideError(f"override '{item}' is not key=value")
  parts = key.split(".")
  node = config
  for part in parts[:-1]:
    if part not in node:
      raise OverrideError(f"override '{item}': unknown config field '{part}' in '{key}'")
    node = node[part]
  if parts[-1] not in node:
    raise OverrideError(f"override '{item}': unknown config field '{key}'")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  old = node[parts[-1]]
  if isinstance(old, bool) and raw.strip().lower() in _BOOLS:  # absl's spellings, as train.py
    value = _BOOLS[raw.strip().lower()]
  if isinstance(old, str) and not isinstance(value, str):  # '123' for a string field
    value = raw
  if isinstance(old, bool) and not isinstance(value, bool):
    raise OverrideError(f"override '{item}': '{key}' is a bool")
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    value = type(old)(value)
  try:
    node[parts[-1]] = value
  except TypeError as e:  # ml_collections refuses another type
    raise OverrideError(f"override '{item}': {e}") from e
