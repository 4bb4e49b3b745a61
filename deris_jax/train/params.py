"""Parameter trees of the train state: the trainable/frozen split.

The train state holds the model parameters as the NNX pure dict (`nnx.to_pure_dict` of
`nnx.state(model, nnx.Param)`): nested dicts whose keys are attribute names (str) and list
indices (int), so `nnx.merge(graphdef, nnx.State(params))` rebuilds the model, and Orbax
saves and restores it as it is (`deris_jax.checkpoints`). A parameter's *name* joins its path
with dots ('decoder.query_SA.0.norm.scale'), the form the regex rules of the optimizer and
sharding match (`deris_jax.trees`).
"""
import re
from typing import Any, Dict, Mapping, Sequence, Tuple

from flax import nnx

Tree = Dict[Any, Any]


def model_params(model: nnx.Module) -> Tree:
  """The model's parameters as the train state holds them (NNX pure dict)."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def matches_any(name: str, patterns: Sequence[str]) -> bool:
  return any(re.search(p, name) for p in patterns)


def split_frozen(params: Mapping, frozen_patterns: Sequence[str]) -> Tuple[Tree, Tree]:
  """(trainable, frozen): two trees with the same nesting, each holding its own leaves only.

  A leaf is frozen when its dotted name matches one of `frozen_patterns` (re.search).
  Sub-dicts left empty are dropped, so the optimizer sees the trainable leaves only.
  """
  def split(node, prefix):
    trainable, frozen = {}, {}
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        t, f = split(value, name + ".")
        if t:
          trainable[key] = t
        if f:
          frozen[key] = f
      elif matches_any(name, frozen_patterns):
        frozen[key] = value
      else:
        trainable[key] = value
    return trainable, frozen

  return split(params, "")


def merge_trees(a: Mapping, b: Mapping) -> Tree:
  """The union of two trees with disjoint leaves (inverse of `split_frozen`)."""
  out = dict(a)
  for key, value in b.items():
    if key in out:
      if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
        raise ValueError(f"merge_trees: leaf '{key}' is in both trees")
      out[key] = merge_trees(out[key], value)
    else:
      out[key] = value
  return out
