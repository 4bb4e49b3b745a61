"""Parameters in and out of checkpoints: save, restore, the partial merge, a ready model.

`check_fit` is the one place that decides whether loaded parameters fit the model built from
the config: every loaded name must be a parameter of the model with the same shape;
parameters the checkpoint lacks are an error, or, for partial initialisation (`train.py
--init_from`, `convert.py pretrained`), take the values of a fresh initialisation
(`merge_params`, which also casts to the model's dtype). `stored_shapes` reads a checkpoint's
names and shapes alone, so a run checks its checkpoint before it compiles anything.
"""
import pathlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deris_jax import trees
from deris_jax.checkpoints.errors import CheckpointError
from deris_jax.checkpoints.manager import META, PARAMS, latest_step, manager
from deris_jax.models.deris import abstract_model

Flat = Dict[str, Any]  # {dotted parameter name: array}


def save_params(directory, params, *, metadata: Dict[str, Any], step: int = 0) -> pathlib.Path:
  """Writes a params-only checkpoint (converted or pretrained weights) and waits for it.

  `params`: any tree of arrays keyed by the NNX paths (nested dicts, str or int keys).
  """
  directory = pathlib.Path(directory).absolute()
  with manager(directory, pytree_items=(PARAMS,), create=True) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.PyTreeSave(params),
                                               META: ocp.args.JsonSave(metadata)}), force=True)
    mngr.wait_until_finished()
  return directory


def restore_params(directory, abstract_params=None,
                   step: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(params tree, metadata) of a step (default: the latest).

  Args:
    abstract_params: a tree of `jax.ShapeDtypeStruct` (with shardings) to restore straight
      into, e.g. the NNX pure dict of the train state; None restores every array as saved
      (nested dicts with string keys) on the default device.
  """
  directory = pathlib.Path(directory).absolute()
  step = latest_step(directory) if step is None else step
  item = (ocp.args.StandardRestore() if abstract_params is None
          else ocp.args.StandardRestore(abstract_params))
  with manager(directory) as mngr:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          **{PARAMS: item, META: ocp.args.JsonRestore()}))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{directory} step {step}: cannot restore params ({e})") from e
  return restored[PARAMS], dict(restored[META])


def check_fit(loaded: Mapping[str, Any], expected: Mapping[str, Any], *, partial: bool,
              source: str = "checkpoint") -> List[str]:
  """Checks that loaded parameters fit the model: every loaded name is one of `expected`'s,
  with its shape, and (unless `partial`) every expected name is loaded. Values may be arrays
  or anything with a `.shape` (`stored_shapes`). Returns the expected names not loaded.

  Raises CheckpointError naming the first unknown name, shape mismatch or (not `partial`)
  missing name.
  """
  unknown = [name for name in loaded if name not in expected]
  missing = [name for name in expected if name not in loaded]
  if unknown or (missing and not partial):
    parts = [f"{len(missing)} missing (e.g. '{missing[0]}')"] if missing and not partial else []
    parts += [f"{len(unknown)} unknown (e.g. '{unknown[0]}')"] if unknown else []
    raise CheckpointError(f"{source}: parameters do not fit the model built from the config: "
                          f"{'; '.join(parts)}. Is it a checkpoint of this model variant?")
  for name, value in loaded.items():
    want, got = tuple(expected[name].shape), tuple(np.shape(value))
    if got != want:
      raise CheckpointError(f"{source}: '{name}' has shape {got} but the model built from the "
                            f"config expects {want}. Is it a checkpoint of this model variant?")
  return missing


def stored_shapes(directory, step: Optional[int] = None) -> Flat:
  """{dotted name: jax.ShapeDtypeStruct} of a checkpoint's params (default: the latest step),
  from Orbax's metadata: no array is read, so checking a checkpoint against a model
  (`check_fit`) costs milliseconds whatever its size."""
  directory = pathlib.Path(directory).absolute()
  step = latest_step(directory) if step is None else step
  step_dir = directory / str(step)
  # A handler for every array item of the step (a train checkpoint also has the optimizer's):
  # Orbax warns about items it has no handler for.
  items = sorted(p.name for p in step_dir.iterdir() if p.is_dir() and p.name != META
                 ) if step_dir.is_dir() else [PARAMS]
  with manager(directory, pytree_items=items) as mngr:
    try:
      item = mngr.item_metadata(step)[PARAMS]
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{directory} step {step}: cannot read the params' metadata "
                            f"({e})") from e
  if item is None:
    raise CheckpointError(f"{directory} step {step}: the checkpoint has no params item")
  tree = getattr(item, "tree", item)  # Orbax's tree metadata, or the tree itself (older Orbax)
  return {name: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
          for name, leaf in trees.named_leaves(tree).items()}


def merge_params(loaded: Mapping[str, Any], expected: Mapping[str, Any], *,
                 fill: Optional[Callable[[], Mapping[str, Any]]] = None,
                 source: str = "checkpoint") -> Tuple[Flat, List[str]]:
  """Loaded parameters over the model's: ({name: value} for every expected name, filled).

  Args:
    loaded: {dotted name: array} read from a checkpoint (all or part of the model).
    expected: {dotted name: array or jax.ShapeDtypeStruct} of the model built from the
      config: the names, shapes and dtypes wanted.
    fill: returns {name: value} of a fresh initialisation; called only when `loaded` lacks
      some expected names (partial initialisation). None: a lacking name is an error.
    source: what was loaded, for messages.
  Returns:
    The merged {name: value} in the order of `expected` (loaded values cast to the expected
    dtype), and the names whose value came from `fill`.
  Raises:
    CheckpointError naming the first unknown name, shape mismatch or (without `fill`)
    missing name (`check_fit`).
  """
  missing = check_fit(loaded, expected, partial=fill is not None, source=source)
  fresh = fill() if missing else {}
  merged = {}
  for name, like in expected.items():
    value = loaded[name] if name in loaded else fresh[name]
    merged[name] = value if value.dtype == like.dtype else value.astype(like.dtype)
  return merged, missing


def load_model(directory, model_config, step: Optional[int] = None):
  """Builds a DeRIS from `model_config` with a checkpoint's params (no random init).

  Returns (model, metadata). A checkpoint of another variant fails naming the first path or
  shape that differs.
  """
  graphdef, abstract_state = nnx.split(abstract_model(model_config))
  tree, meta = restore_params(directory, None, step)
  pure = nnx.to_pure_dict(abstract_state)
  merged, _ = merge_params(trees.named_leaves(tree), trees.named_leaves(pure),
                           source=str(directory))
  nnx.replace_by_pure_dict(abstract_state, trees.unflatten_like(
      {name: jax.numpy.asarray(value) for name, value in merged.items()}, pure))
  return nnx.merge(graphdef, abstract_state), meta

