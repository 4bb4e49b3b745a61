"""Initial DeRIS weights from the paper's pretrained checkpoints (docs/design.md §11).

Two files, mapped as the official loaders do (the tables are in `pretrained_keys`):
  * a Mask2Former COCO-instance Swin checkpoint (detectron2 `.pkl`): `backbone.*` -> the Swin
    (strict), `sem_seg_head.pixel_decoder.*` -> the pixel decoder (detectron2's conv+norm
    renamed), `sem_seg_head.predictor.*` -> the first 3 of Mask2Former's 9 decoder layers,
    decoder_norm, level_embed, mask_embed, and query_embed sliced to its first N rows;
  * a unilm BEiT-3 pretrained checkpoint (`.pth`/`.zip`, state dict under `model` or `module`):
    `beit3.*` one to one; the vision position table is resized with torch's bicubic kernel
    when the cognition image size differs from the checkpoint's (`bicubic.py`).
Every other parameter keeps its value in `build_model(config, seed)`, i.e. the official
initialisers (`pretrained_keys.INITIALISED` says which and why).

Stricter than the official loaders, never looser. The official pixel-decoder, predictor and
BEiT-3 loads are non-strict and would silently keep random values where a file lacks a key;
here every parameter a file must provide (`SourceSpec.provides`) has to be there, and any
shape mismatch is an error naming the first key (in file order) whose shape differs. Keys the
model does not use are reported as ignored, each with its reason.

Everything works on shapes first (`plan_pretrained`), so a wrong file is refused before any
weight is read or initialised.
"""
import dataclasses
import itertools
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import nnx

from deris_jax import checkpoints, trees
from deris_jax.convert import bicubic, deris_keys, readers, torch_to_nnx
from deris_jax.convert.pretrained_keys import (BEIT3, INITIALISED, MASK2FORMER, SPECS,
                                               SourceSpec, extra_decoder_layers_drop)
from deris_jax.convert.torch_to_nnx import Assignment, ConversionError
from deris_jax.models.deris import abstract_model, build_model

Shape = Tuple[int, ...]

# Globals a pretrained file may hold outside its weights (saved training arguments).
INERT_GLOBALS = ("argparse.Namespace",)
# BEiT-3's vision position table starts with cls + 2 rows (fairseq positions start at 2).
VISION_EXTRA_POSITIONS = 3


@dataclasses.dataclass
class SourcePlan:
  """What one file gives: assignments (official key -> model path), adjustments, ignored keys."""
  spec: SourceSpec
  name: str  # the file name, for messages and the report
  num_keys: int
  assignments: List[Assignment]
  adjusted: Dict[str, str]  # official key -> what was done to it
  ignored: Dict[str, str]  # official key -> reason

  @property
  def role(self) -> str:
    return self.spec.role


@dataclasses.dataclass
class PretrainedPlan:
  sources: Dict[str, SourcePlan]  # by role, in SPECS order
  initialised: Dict[str, str]  # model path -> reason (official initialiser)
  model_shapes: Dict[str, Shape]

  @property
  def loaded(self) -> Dict[str, Tuple[str, str]]:
    """model path -> (role, official key)."""
    return {a.path: (role, a.torch_key) for role, s in self.sources.items()
            for a in s.assignments}


# ------------------------------------------------------------------------------------------
# Reading.


def read_shapes(path) -> Dict[str, Shape]:
  """Official key -> shape of a pretrained file, in file order, without reading weights."""
  return {k: shape for k, (shape, _) in
          readers.read_checkpoint_shapes(path, inert_globals=INERT_GLOBALS).items()}


def read_arrays(path) -> Dict[str, np.ndarray]:
  """Official key -> array of a pretrained file (state dict under `model`, `module`, ...)."""
  return readers.read_checkpoint(path, inert_globals=INERT_GLOBALS)


# ------------------------------------------------------------------------------------------
# Adjustments: query_embed sliced to N rows, the BEiT-3 vision positions resized.


def _vision_grid(model_config) -> Tuple[int, int]:
  (h, w), p = tuple(model_config.cognition_image_size), model_config.beit3.patch_size
  return h // p, w // p


def _adjusted_shape(kind: str, key: str, shape: Shape, want: Shape, model_config,
                    source: str) -> Tuple[Shape, Optional[str]]:
  """(the shape the key will have, a note) after the official adjustment; no note if none."""
  if tuple(shape) == tuple(want) or len(shape) != 2 or shape[1:] != want[1:]:
    return tuple(shape), None  # nothing to do, or a mismatch that planning reports
  if kind == "first_rows":
    if shape[0] < want[0]:
      return tuple(shape), None
    return tuple(want), (f"first {want[0]} of its {shape[0]} rows (query_embed sliced to the "
                         "N queries, as the official loader does)")
  if kind == "vision_positions":
    patches = shape[0] - VISION_EXTRA_POSITIONS
    side = math.isqrt(max(patches, 0))
    if patches <= 0 or side * side != patches:
      raise ConversionError(
          f"{source}: '{key}' has {shape[0]} rows, not {VISION_EXTRA_POSITIONS} + a square "
          "number of patch positions, so it cannot be resized to the config's image size")
    gh, gw = _vision_grid(model_config)
    return tuple(want), (f"patch positions resized {side}x{side} -> {gh}x{gw} (torch bicubic, "
                         "align_corners=False, as the official loader does)")
  raise ValueError(f"unknown adjustment '{kind}'")


def resize_vision_positions(table: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """BEiT-3 `embed_positions.A` (3 + s*s, D) -> (3 + gh*gw, D), as the official loader does:
  the 3 leading rows kept, the s x s patch rows resized with torch's bicubic kernel."""
  patches = table.shape[0] - VISION_EXTRA_POSITIONS
  side = math.isqrt(max(patches, 0))
  if patches <= 0 or side * side != patches:
    raise ValueError(f"a vision position table of {table.shape[0]} rows is not "
                     f"{VISION_EXTRA_POSITIONS} + a square number of patch positions")
  gh, gw = grid
  patch_rows = np.asarray(table[VISION_EXTRA_POSITIONS:], np.float32)  # (s*s, D)
  image = patch_rows.reshape(side, side, -1).transpose(2, 0, 1)  # (D, s, s)
  resized = bicubic.resize(image, (gh, gw)).transpose(1, 2, 0)  # (gh, gw, D)
  return np.concatenate([np.asarray(table[:VISION_EXTRA_POSITIONS], np.float32),
                         resized.reshape(gh * gw, -1)])  # (3 + gh*gw, D)


def _adjust_array(kind: str, array: np.ndarray, want: Shape, model_config) -> np.ndarray:
  if tuple(array.shape) == tuple(want):
    return array
  if kind == "first_rows":
    return array[:want[0]]
  if kind == "vision_positions":
    return resize_vision_positions(array, _vision_grid(model_config))
  raise ValueError(f"unknown adjustment '{kind}'")


# ------------------------------------------------------------------------------------------
# Planning (shapes only).


def _drops(spec: SourceSpec, model_config) -> Tuple[torch_to_nnx.Drop, ...]:
  if spec.role == MASK2FORMER:
    return spec.drops + (extra_decoder_layers_drop(model_config.decoder.num_layers),)
  return spec.drops


def _has_module(target: str, module_prefixes: frozenset) -> bool:
  return target.rpartition(".")[0] + "." in module_prefixes


def plan_source(spec: SourceSpec, shapes: Mapping[str, Shape], model_shapes: Mapping[str, Shape],
                model_config, *, source: str) -> SourcePlan:
  """Matches one file's keys (in file order) to model paths; raises ConversionError naming the
  first key whose shape differs, an unknown key of a strict namespace, or a parameter the file
  must provide and lacks."""
  drops = _drops(spec, model_config)
  adjust = {key: (path, kind) for key, path, kind in spec.adjust}
  modules = frozenset(".".join(p.split(".")[:i]) + "." for p in model_shapes
                      for i in range(1, p.count(".") + 1))
  assignments, adjusted, ignored, taken = [], {}, {}, {}
  for key, shape in shapes.items():
    namespace = next((n for n in spec.namespaces if key.startswith(n.prefix)), None)
    if namespace is None:
      ignored[key] = spec.not_read
      continue
    reason = next((d.reason for d in drops if re.search(d.pattern, key)), None)
    if reason is not None:
      ignored[key] = reason
      continue
    target = torch_to_nnx.rename(key, spec.rules)
    if not namespace.strict and not _has_module(target, modules):
      ignored[key] = ("no DeRIS parameter of this name; the official loader skips it "
                      "(strict=False)")
      continue
    if key in adjust and adjust[key][0] in model_shapes:
      path, kind = adjust[key]
      shape, note = _adjusted_shape(kind, key, shape, model_shapes[path], model_config, source)
      if note:
        adjusted[key] = note
    plan = torch_to_nnx.plan({key: shape}, model_shapes, spec.rules, (), strict=False,
                             source=source)  # one key: errors come in file order
    (assignment,) = plan.assignments
    if assignment.path in taken:
      raise ConversionError(f"{source}: '{key}' and '{taken[assignment.path]}' both map to "
                            f"'{assignment.path}'")
    taken[assignment.path] = key
    assignments.append(assignment)
  prefixes = ", ".join(f"'{n.prefix}'" for n in spec.namespaces)
  if not assignments:
    raise ConversionError(
        f"{source}: none of its {len(shapes)} keys is a weight of a {spec.description} (keys "
        f"under {prefixes}); first keys: {list(shapes)[:5]}. Is it the file for "
        f"--{spec.role}?")
  missing = [p for p in model_shapes if re.search(spec.provides, p) and p not in taken]
  if missing:
    raise ConversionError(
        f"{source}: {len(missing)} parameter(s) that a {spec.description} provides are missing "
        f"from it, e.g. '{missing[0]}' {tuple(model_shapes[missing[0]])} (official keys under "
        f"{prefixes}); all: {', '.join(compact_keys(missing)[:10])}. Is it the file for "
        f"--{spec.role}, of the config's variant?")
  return SourcePlan(spec, source, len(shapes), assignments, adjusted, ignored)


def plan_pretrained(model_config, model_shapes: Mapping[str, Shape],
                    file_shapes: Mapping[str, Mapping[str, Shape]],
                    names: Optional[Mapping[str, str]] = None) -> PretrainedPlan:
  """Plans the initial weights of a model from the shapes of both files.

  Args:
    model_config: config.model of the variant.
    model_shapes: model path -> shape (`torch_to_nnx.flat_shapes` of the abstract model).
    file_shapes: role ('mask2former', 'beit3') -> official key -> shape, in file order.
    names: role -> file name for messages (default: the role).
  """
  names = dict(names or {})
  sources = {}
  for spec in SPECS:
    if spec.role not in file_shapes:
      raise ValueError(f"no file given for --{spec.role}")
    sources[spec.role] = plan_source(spec, file_shapes[spec.role], model_shapes, model_config,
                                     source=names.get(spec.role, spec.role))
  loaded = {a.path for s in sources.values() for a in s.assignments}
  initialised = {}
  for path in model_shapes:
    if path in loaded:
      continue
    reason = next((r for pattern, r in INITIALISED if re.search(pattern, path)), None)
    if reason is None:  # the tables do not cover the model: a bug in pretrained_keys
      raise ConversionError(f"no file provides '{path}' and it is not in INITIALISED")
    initialised[path] = reason
  return PretrainedPlan(sources, initialised, dict(model_shapes))


# ------------------------------------------------------------------------------------------
# Conversion.


def initial_values(model_config, seed: int, paths: Sequence[str]) -> Dict[str, np.ndarray]:
  """The values `build_model(model_config, seed)` gives the parameters `paths`: the official
  initialisers (the model is built whole, so each parameter gets its usual draw)."""
  state = nnx.state(build_model(model_config, seed), nnx.Param)
  flat = trees.named_leaves(nnx.to_pure_dict(state))
  return {path: np.asarray(flat[path]) for path in paths}


def convert(model_config, arrays: Mapping[str, Mapping[str, np.ndarray]], *, seed: int = 0,
            names: Optional[Mapping[str, str]] = None) -> Tuple[dict, PretrainedPlan]:
  """Both files' state dicts -> (DeRIS params as a nested dict of numpy arrays, plan).

  Args:
    model_config: config.model of the variant.
    arrays: role ('mask2former', 'beit3') -> official key -> array (`read_arrays`).
    seed: the `build_model` seed for every parameter no file provides.
    names: role -> file name for messages.
  """
  abstract = trees.named_leaves(nnx.to_pure_dict(
      nnx.state(abstract_model(model_config), nnx.Param)))  # {name: ShapeDtypeStruct}
  model_shapes = {name: tuple(a.shape) for name, a in abstract.items()}
  file_shapes = {role: {k: np.shape(v) for k, v in a.items()} for role, a in arrays.items()}
  plan = plan_pretrained(model_config, model_shapes, file_shapes, names)
  swin_buffers = {k: v for k, v in arrays[MASK2FORMER].items() if k.startswith("backbone.")}
  deris_keys.check_relative_position_index(swin_buffers, model_config.swin.window_size,
                                           plan.sources[MASK2FORMER].name)
  values = {}
  for role, source in plan.sources.items():
    state = dict(arrays[role])
    for key, path, kind in source.spec.adjust:
      if key in source.adjusted:
        state[key] = _adjust_array(kind, np.asarray(state[key]), model_shapes[path], model_config)
    values.update(torch_to_nnx.apply(torch_to_nnx.Plan(source.assignments, {}), state))
  params, _ = checkpoints.merge_params(  # the plan guarantees the fit; checked once more
      values, abstract, source=", ".join(s.name for s in plan.sources.values()),
      fill=lambda: initial_values(model_config, seed, list(plan.initialised)))
  return trees.unflatten(params), plan


# ------------------------------------------------------------------------------------------
# The report.


def _set_text(values) -> str:
  values = sorted(values, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
  if len(values) == 1:
    return values[0]
  numbers = [int(v) for v in values if v.isdigit()]
  if len(numbers) == len(values) and numbers == list(range(numbers[0], numbers[-1] + 1)):
    return "{" + f"{numbers[0]}..{numbers[-1]}" + "}"
  return "{" + ",".join(values) + "}"


def compact_keys(keys: Sequence[str]) -> List[str]:
  """Dotted names -> brace patterns whose expansions are exactly the names, e.g.
  ['a.3.w', 'a.4.w', 'a.5.w', 'a.3.b'] -> ['a.3.b', 'a.{3..5}.w'] (`{x,y}` lists, `{3..5}`
  ranges). Names merge when they differ in one component only, last components first."""
  by_length: Dict[int, List[Tuple[frozenset, ...]]] = {}
  for key in dict.fromkeys(keys):
    parts = key.split(".")
    by_length.setdefault(len(parts), []).append(tuple(frozenset([p]) for p in parts))
  out = []
  for length, entries in sorted(by_length.items()):
    for position in reversed(range(length)):
      merged: Dict[tuple, set] = {}
      for entry in entries:
        rest = entry[:position] + entry[position + 1:]
        merged.setdefault(rest, set()).update(entry[position])
      entries = [rest[:position] + (frozenset(values),) + rest[position:]
                 for rest, values in merged.items()]
    out.extend(".".join(_set_text(part) for part in entry) for entry in entries)
  return sorted(out)


def expand_pattern(pattern: str) -> List[str]:
  """The names a `compact_keys` pattern stands for."""
  choices = []
  for part in re.split(r"\.(?![^{]*\})", pattern):  # dots outside braces
    m = re.fullmatch(r"\{(\d+)\.\.(\d+)\}", part)
    if m:
      choices.append([str(i) for i in range(int(m[1]), int(m[2]) + 1)])
    elif part.startswith("{") and part.endswith("}"):
      choices.append(part[1:-1].split(","))
    else:
      choices.append([part])
  return [".".join(names) for names in itertools.product(*choices)]


def _by_reason(items: Mapping[str, str]) -> Dict[str, List[str]]:
  out: Dict[str, List[str]] = {}
  for name, reason in items.items():
    out.setdefault(reason, []).append(name)
  return out


def report(plan: PretrainedPlan, *, seed=0) -> str:
  """The conversion report: loaded, initialised and ignored, counted and listed exactly."""
  loaded = plan.loaded
  numbers = sum(math.prod(plan.model_shapes[p]) for p in loaded)
  init_numbers = sum(math.prod(plan.model_shapes[p]) for p in plan.initialised)
  lines = [f"loaded {len(loaded)} parameters ({numbers:,} numbers):"]
  for role, source in plan.sources.items():
    per_module: Dict[str, int] = {}
    for a in source.assignments:
      module = a.path.split(".")[0]
      per_module[module] = per_module.get(module, 0) + 1
    counts = ", ".join(f"{m} {n}" for m, n in per_module.items())
    lines.append(f"  {len(source.assignments)} of the {source.num_keys} keys of {source.name} "
                 f"(--{role}) -> {counts}")
    for key, note in source.adjusted.items():
      lines.append(f"    {key}: {note}")
    lines.extend(f"    {p}" for p in compact_keys([a.torch_key for a in source.assignments]))
  lines.append(f"initialised {len(plan.initialised)} parameters ({init_numbers:,} numbers) with "
               f"the official initialisers (build_model seed {seed}):")
  for reason, paths in _by_reason(plan.initialised).items():
    lines.append(f"  {len(paths)}: {reason}")
    lines.extend(f"    {p}" for p in compact_keys(paths))
  ignored = sum(len(s.ignored) for s in plan.sources.values())
  lines.append(f"ignored {ignored} keys:")
  for role, source in plan.sources.items():
    for reason, keys in _by_reason(source.ignored).items():
      lines.append(f"  {len(keys)} of {source.name}: {reason}")
      lines.extend(f"    {k}" for k in compact_keys(keys))
  return "\n".join(lines)


def metadata(plan: PretrainedPlan) -> dict:
  """JSON-able record of the plan for the checkpoint's `meta` item."""
  return {
      "loaded": {path: f"{role}:{key}" for path, (role, key) in plan.loaded.items()},
      "adjusted": {role: dict(s.adjusted) for role, s in plan.sources.items()},
      "initialised": dict(plan.initialised),
      "ignored": {role: dict(s.ignored) for role, s in plan.sources.items()},
  }


__all__ = ["BEIT3", "MASK2FORMER", "PretrainedPlan", "SourcePlan", "compact_keys", "convert",
           "expand_pattern", "initial_values", "metadata", "plan_pretrained", "plan_source",
           "read_arrays", "read_shapes", "report", "resize_vision_positions"]
