"""Orbax checkpoints shared by train, eval, predict and convert.

Layout: an Orbax `CheckpointManager` directory; each step holds the items
  params    the model parameters as a nested dict with string keys (the NNX paths, e.g.
            params['decoder']['query_SA']['0']['norm']['scale'])
  meta      JSON: what wrote it (`kind`: 'converted' | 'pretrained' | 'train'), the model
            config, and free-form details (source files and their sha256, step, ...)
  and, for training checkpoints, further items (optimizer state, RNG, data position) that
  `deris_jax.train` adds.
A converted or pretrained checkpoint is a manager directory with the single step 0.

Restoring checks every parameter path and shape against the model built from the config, and
names the first path that differs.
"""
import pathlib
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit the model."""


def _key(part) -> str:
  return str(part.key if hasattr(part, "key") else getattr(part, "idx", part))


def state_to_tree(state: nnx.State) -> Dict[str, Any]:
  """nnx.State -> nested dict with string keys and array leaves."""
  tree: Dict[str, Any] = {}
  for path, leaf in state.flat_state():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(_key(part), {})
    node[_key(path[-1])] = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
  return tree


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """Nested dict -> {'a.b.c': leaf}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_tree(value, name + "."))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{'a.b.c': leaf} -> nested dict."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return tree


def tree_into_state(tree: Mapping[str, Any], state: nnx.State, *,
                    source: str = "checkpoint") -> nnx.State:
  """Writes the leaves of `tree` into a copy of `state` (same paths and shapes required)."""
  flat = flatten_tree(tree)
  expected = {".".join(_key(p) for p in path): leaf for path, leaf in state.flat_state()}
  missing = sorted(set(expected) - set(flat))
  unknown = sorted(set(flat) - set(expected))
  if missing or unknown:
    raise CheckpointError(
        f"{source}: parameters do not fit the model built from the config: "
        + (f"{len(missing)} missing (e.g. '{missing[0]}')" if missing else "")
        + ("; " if missing and unknown else "")
        + (f"{len(unknown)} unknown (e.g. '{unknown[0]}')" if unknown else "")
        + ". Is it a checkpoint of this model variant?")
  for name, leaf in expected.items():
    want = tuple(leaf.get_value().shape if hasattr(leaf, "get_value") else leaf.value.shape)
    got = tuple(np.shape(flat[name]))
    if got != want:
      raise CheckpointError(f"{source}: '{name}' has shape {got} but the model built from the "
                            f"config expects {want}. Is it a checkpoint of this model variant?")
  new_state = jax.tree_util.tree_map(lambda x: x, state)  # a copy with the same structure
  for path, leaf in new_state.flat_state():
    value = flat[".".join(_key(p) for p in path)]
    leaf.set_value(jax.numpy.asarray(value, dtype=leaf.get_value().dtype))
  return new_state


def manager(directory, *, max_to_keep: Optional[int] = None, save_interval_steps: int = 1,
            async_save: bool = False, create: bool = True) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager over `directory` (absolute path)."""
  directory = pathlib.Path(directory).absolute()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=create,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def save_params(directory, params: Mapping[str, Any], *, metadata: Dict[str, Any],
                step: int = 0) -> pathlib.Path:
  """Writes a params-only checkpoint (converted or pretrained weights) and waits for it."""
  directory = pathlib.Path(directory).absolute()
  with manager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(dict(params)),
                                            meta=ocp.args.JsonSave(metadata)), force=True)
    mngr.wait_until_finished()
  return directory


def latest_step(directory) -> int:
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  with manager(directory, create=False) as mngr:
    step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"{directory} holds no checkpoint step")
  return step


def restore_meta(directory, step: Optional[int] = None) -> Dict[str, Any]:
  directory = pathlib.Path(directory).absolute()
  step = latest_step(directory) if step is None else step
  with manager(directory, create=False) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(directory, abstract_params: Optional[Mapping[str, Any]] = None,
                   step: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Reads (params tree, metadata) of a step (default: the latest).

  Args:
    abstract_params: a tree of `jax.ShapeDtypeStruct` (with shardings) to restore into;
      None restores every array as saved, on the default device.
  """
  directory = pathlib.Path(directory).absolute()
  step = latest_step(directory) if step is None else step
  with manager(directory, create=False) as mngr:
    try:
      item = (ocp.args.StandardRestore(dict(abstract_params)) if abstract_params is not None
              else ocp.args.StandardRestore())
      restored = mngr.restore(step, args=ocp.args.Composite(params=item,
                                                             meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"{directory} step {step}: cannot restore params ({e})") from e
  return dict(restored["params"]), dict(restored["meta"])


def load_params_into(model: nnx.Module, directory, step: Optional[int] = None) -> Dict[str, Any]:
  """Restores a checkpoint's params into `model` (shape-checked). Returns its metadata."""
  params = nnx.state(model, nnx.Param)
  tree, meta = restore_params(directory, None, step)
  nnx.update(model, tree_into_state(tree, params, source=str(directory)))
  return meta


def load_model(directory, model_config, step: Optional[int] = None):
  """Builds a DeRIS from `model_config` with a checkpoint's params (no random init).

  Returns (model, metadata). A checkpoint of another variant fails naming the first path or
  shape that differs.
  """
  from deris_jax.models.deris import abstract_model
  graphdef, abstract_state = nnx.split(abstract_model(model_config))
  tree, meta = restore_params(directory, None, step)
  state = tree_into_state(tree, abstract_state, source=str(directory))
  return nnx.merge(graphdef, state), meta
