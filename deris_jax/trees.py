"""Dotted names of pytree leaves: the names the regex rules of the optimizer and the sharding
match, and the names parameters carry in checkpoints ('decoder.query_SA.0.norm.scale')."""
from typing import Any, Callable, Dict, Mapping

import jax


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_name(path) -> str:
  """A jax key path -> 'a.b.0.c'."""
  return ".".join(_key_name(entry) for entry in path)


def named_leaves(tree) -> Dict[str, Any]:
  """{dotted name: leaf} of any pytree (dicts, lists, NamedTuples, dataclasses)."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def map_with_names(fn: Callable[[str, Any], Any], tree):
  """tree_map whose function also receives the leaf's dotted name."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_name(path), leaf), tree)


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{'a.b.c': leaf} -> nested dicts with string keys (the inverse of `named_leaves` on them)."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    *parents, last = name.split(".")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return tree


def unflatten_like(flat: Mapping[str, Any], like, *, what: str = "tree"):
  """{dotted name: leaf} -> a tree with the structure of `like` (any pytree), each leaf taken
  by its name; KeyError names the first leaf of `like` that `flat` lacks."""
  names = named_leaves(like)
  missing = [name for name in names if name not in flat]
  if missing:
    raise KeyError(f"{what} lacks {len(missing)} entries (e.g. '{missing[0]}')")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                      [flat[name] for name in names])
