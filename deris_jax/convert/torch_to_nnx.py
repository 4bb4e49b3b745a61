"""Maps a PyTorch state dict onto an NNX module's parameters by name, with layout transforms.

deris-jax modules are named after the official keys, so one official key becomes one NNX path
through three steps:
1. prefix renames (a table per model, e.g. `perception_branch.predictor.` -> `decoder.`),
2. leaf renames by what the target holds:
     `X.weight` -> `X.kernel` (Linear [out,in] -> [in,out]; Conv OIHW -> HWIO),
                   `X.scale` (LayerNorm/GroupNorm) or `X.embedding` (Embedding),
     `X.in_proj_weight` / `X.in_proj_bias` -> `X.in_proj.kernel` / `X.in_proj.bias`
     (nn.MultiheadAttention's packed q/k/v), anything else by its own name,
3. an exact shape check.
Keys the model never uses are listed in a drop table with a reason. Every other mismatch
(unknown key, missing parameter, wrong shape) is an error that names the key and the shapes.

Everything here works on shapes first (`plan`), so a checkpoint can be checked against a
model built with `nnx.eval_shape` before any weight is read.
"""
import dataclasses
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax import trees

Shape = Tuple[int, ...]


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message names the key and shapes."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Renames official keys matching `pattern` (a regex, applied with re.sub, anchored at ^)."""
  pattern: str
  replacement: str


@dataclasses.dataclass(frozen=True)
class Drop:
  """Official keys matching `pattern` are not used by the model, for `reason`."""
  pattern: str
  reason: str


@dataclasses.dataclass
class Assignment:
  torch_key: str
  path: str
  transform: str  # 'copy' | 'linear' | 'conv'


@dataclasses.dataclass
class Plan:
  assignments: List[Assignment]
  dropped: Dict[str, str]  # torch key -> reason

  def summary(self) -> str:
    return f"{len(self.assignments)} keys loaded, {len(self.dropped)} dropped"


def _transform_shape(shape: Shape, transform: str) -> Shape:
  if transform == "linear":
    return tuple(reversed(shape))
  if transform == "conv":
    o, i, h, w = shape
    return (h, w, i, o)
  return tuple(shape)


def transform_array(array: np.ndarray, transform: str) -> np.ndarray:
  if transform == "linear":
    return np.ascontiguousarray(array.T)
  if transform == "conv":
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
  return array


def _candidates(name: str) -> List[Tuple[str, str]]:
  """(model path, transform) pairs that an official leaf name may map to."""
  head, _, leaf = name.rpartition(".")
  prefix = head + "." if head else ""
  if leaf == "in_proj_weight":
    return [(prefix + "in_proj.kernel", "linear")]
  if leaf == "in_proj_bias":
    return [(prefix + "in_proj.bias", "copy")]
  if leaf == "weight":
    return [(prefix + "kernel", "linear|conv"), (prefix + "scale", "copy"),
            (prefix + "embedding", "copy"), (prefix + "weight", "copy")]
  return [(name, "copy")]


def rename(key: str, rules: Sequence[Rule]) -> str:
  for rule in rules:
    new, n = re.subn("^" + rule.pattern, rule.replacement, key)
    if n:
      return new
  return key


def plan(torch_shapes: Mapping[str, Shape], model_shapes: Mapping[str, Shape],
         rules: Sequence[Rule] = (), drops: Sequence[Drop] = (), *,
         strict: bool = True, source: str = "checkpoint") -> Plan:
  """Matches official keys to model paths by name and shape.

  Args:
    torch_shapes: official key -> shape.
    model_shapes: model parameter path ('a.0.kernel') -> shape.
    rules: prefix renames, tried in order (first match wins).
    drops: keys the model does not use.
    strict: every model parameter must be assigned (else ConversionError).
    source: what to call the checkpoint in errors (its file name).
  """
  assignments, dropped, unknown = [], {}, []
  taken: Dict[str, str] = {}
  for key in sorted(torch_shapes):
    reason = next((d.reason for d in drops if re.search(d.pattern, key)), None)
    if reason is not None:
      dropped[key] = reason
      continue
    name = rename(key, rules)
    shape = tuple(torch_shapes[key])
    for path, transform in _candidates(name):
      if path not in model_shapes:
        continue
      if transform == "linear|conv":
        transform = {2: "linear", 4: "conv"}.get(len(shape), "copy")
      want = tuple(model_shapes[path])
      got = _transform_shape(shape, transform)
      if got != want:
        raise ConversionError(
            f"{source}: shape mismatch for '{key}' -> '{path}': checkpoint {shape} "
            f"(as {got} after {transform}) but the model expects {want}. Is the checkpoint "
            f"for the same model variant as the config?")
      if path in taken:
        raise ConversionError(f"{source}: '{key}' and '{taken[path]}' both map to '{path}'")
      taken[path] = key
      assignments.append(Assignment(key, path, transform))
      break
    else:
      unknown.append(key)
  if unknown:
    raise ConversionError(
        f"{source}: {len(unknown)} unknown key(s) that the model has no parameter for, "
        f"e.g. '{unknown[0]}' (renamed to '{rename(unknown[0], rules)}'); all: "
        + ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))
  if strict:
    missing = sorted(set(model_shapes) - set(taken))
    if missing:
      raise ConversionError(
          f"{source}: {len(missing)} model parameter(s) missing from the checkpoint, "
          f"e.g. '{missing[0]}' {tuple(model_shapes[missing[0]])}; all: "
          + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
  return Plan(assignments, dropped)


def apply(p: Plan, arrays: Mapping[str, np.ndarray],
          dtype: Optional[np.dtype] = np.float32) -> Dict[str, np.ndarray]:
  """Materialises a plan: model path -> converted numpy array."""
  out = {}
  for a in p.assignments:
    value = transform_array(np.asarray(arrays[a.torch_key]), a.transform)
    if dtype is not None and np.issubdtype(value.dtype, np.floating):
      value = value.astype(dtype)
    out[a.path] = value
  return out


def flat_shapes(state) -> Dict[str, Shape]:
  """'a.0.kernel' -> shape for every leaf of an nnx.State (real or abstract)."""
  return {name: tuple(leaf.shape)
          for name, leaf in trees.named_leaves(nnx.to_pure_dict(state)).items()}


def load_into(module, arrays: Mapping[str, np.ndarray], rules: Sequence[Rule] = (),
              drops: Sequence[Drop] = (), *, strict: bool = True,
              source: str = "checkpoint") -> Plan:
  """Converts `arrays` (official names) and writes them into `module`'s nnx.Param leaves."""

  params = nnx.state(module, nnx.Param)
  shapes = flat_shapes(params)
  p = plan({k: np.shape(v) for k, v in arrays.items()}, shapes, rules, drops, strict=strict,
           source=source)
  converted = apply(p, arrays)
  for path, leaf in params.flat_state():
    key = ".".join(str(x) for x in path)
    if key in converted:
      leaf.set_value(jnp.asarray(converted[key]))
  nnx.update(module, params)
  return p
