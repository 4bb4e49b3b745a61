"""Orbax checkpoints shared by train, eval, predict and convert.

Layout: an Orbax `CheckpointManager` directory; each step holds the items
  params    the model parameters as a nested dict with string keys (the NNX paths, e.g.
            params['decoder']['query_SA']['0']['norm']['scale'])
  meta      JSON: what wrote it (`kind`: 'converted' | 'pretrained' | 'train'), the model
            config, and free-form details (source files and their sha256, step, ...)
  and, for training checkpoints, further items (optimizer state, RNG, data position) that
  `deris_jax.train` adds.
A converted or pretrained checkpoint is a manager directory with the single step 0.

A training run's `WORKDIR/checkpoints` also holds `best/`: a manager directory of its own (one
step, params + meta of kind 'best') with the params of the evaluation that scored highest on
the validation metric (`deris_jax.train.checkpointing.BestTracker`). `resolve` picks it for
`--which best`; passing `WORKDIR/checkpoints/best` itself works like any checkpoint.

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


BEST_DIRECTORY = "best"  # WORKDIR/checkpoints/best: the best-on-val params of a training run
WHICH = ("latest", "best")  # `--which` of eval.py / predict.py


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


def _steps(directory: pathlib.Path):
  if not directory.is_dir():
    return []
  with manager(directory, create=False) as mngr:
    return list(mngr.all_steps())


def _no_best_message(directory: pathlib.Path) -> str:
  """Why `directory` (a train checkpoint directory) has no best checkpoint yet."""
  best = directory / BEST_DIRECTORY
  steps = _steps(directory)
  meta = restore_meta(directory, max(steps)) if steps else {}
  if meta.get("kind") != "train":
    what = f"kind '{meta['kind']}'" if "kind" in meta else "no checkpoint step"
    return (f"no best checkpoint in {best}: {directory} is not a training run's checkpoint "
            f"directory ({what}; converted or pretrained weights have no best); use --which "
            "latest")
  record = meta.get("best") or {}
  start = record.get("start_epoch",
                     meta.get("config", {}).get("eval", {}).get("best_start_epoch"))
  start_text = "" if start is None else (
      f" of epoch {start} or later (eval.best_start_epoch {start}, epochs 0-based)")
  what = (f"{record['aggregate']} {record['metric']} over {', '.join(record['splits'])}"
          if record.get("metric") else "validation metric")
  epoch = meta.get("data", {}).get("epoch")
  latest = f"step {meta.get('step', max(steps))}" + (f" (in epoch {epoch})"
                                                     if epoch is not None else "")
  so_far = record.get("best")
  if not record.get("history"):
    so_far_text = "; it records no evaluation yet"
  elif so_far is None:
    so_far_text = "; no evaluation has given a finite value yet"
  elif record.get("saved_step") is None:
    so_far_text = (f"; the best so far, {so_far['value']:.2f} at epoch {so_far['epoch']}, came "
                   "before that epoch")
  else:
    so_far_text = (f"; it records a best checkpoint of step {record['saved_step']}, which is "
                   "missing (removed?)")
  return (f"no best checkpoint in {best}: training writes it after an evaluation{start_text} "
          f"whose {what} beats every earlier evaluation. The latest train checkpoint is "
          f"{latest}{so_far_text}. Use --which latest for the latest checkpoint.")


def resolve(directory, which: str = "latest") -> pathlib.Path:
  """The checkpoint directory that `--checkpoint DIRECTORY --which WHICH` designates.

  'latest': DIRECTORY itself (its latest step, or `--step`). 'best': DIRECTORY/best when
  DIRECTORY is a training run's checkpoint directory, or DIRECTORY when it is such a best
  directory already. A missing best raises a CheckpointError saying when training writes it.
  """
  if which not in WHICH:
    raise CheckpointError(f"--which {which!r}: expected one of {', '.join(WHICH)}")
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  if which == "latest":
    return directory
  best = directory / BEST_DIRECTORY
  if _steps(best):
    return best
  if directory.name == BEST_DIRECTORY and not best.exists() and _steps(directory):
    return directory  # WORKDIR/checkpoints/best given directly
  raise CheckpointError(_no_best_message(directory))


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
