"""Official DeRIS state dict -> deris-jax DeRIS parameters (shape-checked, torch-free)."""
from typing import Mapping, Optional, Tuple

import numpy as np
from flax import nnx

from deris_jax import trees
from deris_jax.convert import deris_keys, torch_to_nnx
from deris_jax.models.deris import abstract_model


def plan_for_model(model: nnx.Module, torch_shapes: Mapping[str, tuple], *,
                   source: str = "checkpoint") -> torch_to_nnx.Plan:
  """Matches official keys (shapes only) to the parameters of `model` (real or abstract)."""
  shapes = torch_to_nnx.flat_shapes(nnx.state(model, nnx.Param))
  return torch_to_nnx.plan(torch_shapes, shapes, deris_keys.RULES, deris_keys.DROPS,
                           source=source)


def load_official(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                  window_size: Optional[int] = None,
                  source: str = "checkpoint") -> torch_to_nnx.Plan:
  """Loads an official DeRIS state dict into `model` in place.

  Args:
    model: a `DeRIS` built from the config that matches the checkpoint.
    state_dict: official key -> array (a `module.` prefix is stripped).
    window_size: the Swin window size of the config; when given, the checkpoint's
      `relative_position_index` buffers are checked against it.
    source: the file name, for error messages.
  Returns:
    The conversion plan (what was loaded, what was dropped and why).
  """
  state_dict = deris_keys.strip_module_prefix(state_dict)
  if window_size is not None:
    deris_keys.check_relative_position_index(state_dict, window_size, source)
  return torch_to_nnx.load_into(model, state_dict, deris_keys.RULES, deris_keys.DROPS,
                                source=source)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model_config, *,
                       source: str = "checkpoint") -> Tuple[dict, torch_to_nnx.Plan]:
  """Official state dict -> (deris-jax params as a nested dict of numpy arrays, plan).

  Works on the abstract model (no parameter is initialised), so converting DeRIS-L costs only
  the memory of the two copies of its weights.
  """
  state_dict = deris_keys.strip_module_prefix(state_dict)
  deris_keys.check_relative_position_index(state_dict, model_config.swin.window_size, source)
  plan = plan_for_model(abstract_model(model_config),
                        {k: np.shape(v) for k, v in state_dict.items()}, source=source)
  return trees.unflatten(torch_to_nnx.apply(plan, state_dict)), plan


def report(plan: torch_to_nnx.Plan) -> str:
  """A short human-readable report: counts, and the dropped keys grouped by reason."""
  lines = [plan.summary()]
  by_reason = {}
  for key, reason in plan.dropped.items():
    by_reason.setdefault(reason, []).append(key)
  for reason, keys in sorted(by_reason.items()):
    example = keys[0] if len(keys) == 1 else f"{keys[0]} and {len(keys) - 1} more"
    lines.append(f"  dropped {len(keys):4d}: {example} -- {reason}")
  return "\n".join(lines)
