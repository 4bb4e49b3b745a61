"""The scanned stacks' parameters held stacked: a leading layer axis per scan group.

With `model.scan_layers`, each repeated stack runs as one `lax.scan` over its layers'
parameters stacked (`deris_jax/models/scan.py`). The model and its checkpoints keep one
subtree per layer (`layers.0`, `layers.1`, ...): the *stored* layout, which the converter,
`eval.py` and the predictor read. The train state holds the scanned stacks *stacked*
instead: at a stack's parent, the layers of each scan group become one subtree whose leaves
carry a leading layer axis (`layers.scan0`; Swin stages have two groups, the regular and the
shifted blocks). Then the step's program neither stacks the parameters nor cuts each layer's
gradient out of the scan's stacked one, and the optimizer updates one array per stacked leaf
instead of one per layer: the released configs' train steps compile in 55-80% of the time
(BENCHMARKS.md "Scanned stacks held stacked in the train state").

`StackLayout.of(model)` reads the stacks from the modules that scan (`scan_groups()`: Swin
stages, BEiT-3, the pixel decoder's encoder). `stack` / `unstack` map any tree that holds
parameter-shaped dicts (params, gradients, the optimizer's moments inside its state) between
the layouts, with a `join` / `split` for the leaves: arrays, ShapeDtypeStructs or shardings
(`ARRAYS`, `ABSTRACT`, `SHARDINGS`). Both are exact (slicing and stacking, no arithmetic).
A stack is only held stacked when its groups cover every child of its parent (an odd last Swin
block, in no released depth, keeps the stage per layer).
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Path = Tuple[Any, ...]


def group_key(index: int) -> str:
  """The key of scan group `index` at its parent in the stacked layout."""
  return f"scan{index}"


@dataclasses.dataclass(frozen=True)
class Stack:
  """A parent dict of per-layer subtrees and its scan groups (lists of child indices)."""
  parent: Path  # the parameter path of the list, e.g. ('beit3', 'encoder', 'layers')
  groups: Tuple[Tuple[int, ...], ...]  # e.g. ((0, 2, 4), (1, 3, 5)) for Swin pairs

  def name(self) -> str:
    return ".".join(str(k) for k in self.parent)


# join: the members' leaves -> the stacked leaf; split: (stacked leaf, n) -> n leaves.
Join = Callable[[Sequence[Any]], Any]
Split = Callable[[Any, int], List[Any]]


def _join_arrays(leaves):
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)  # host arrays stay on the host (fresh params)
  return jnp.stack(leaves)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unstack(x, n):
  """The n slices of x along its first axis. Its gradient stacks the slices' gradients (jax's
  own would pad each to x's shape and add them): in the train step they are slices of the
  scan's stacked gradient, and XLA folds a stack of slices back into the array it cut."""
  return tuple(x[i] for i in range(n))


def _unstack_fwd(x, n):
  return _unstack(x, n), None


def _unstack_bwd(n, _, cotangents):
  del n
  return (jnp.stack(cotangents),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)


def _split_arrays(x, n):
  if isinstance(x, np.ndarray):
    return [x[i] for i in range(n)]
  return list(_unstack(x, n))


def _join_abstract(leaves):
  first = leaves[0]
  sharding = getattr(first, "sharding", None)
  if sharding is not None:
    sharding = _join_shardings([x.sharding for x in leaves])
  return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                              sharding=sharding)


def _split_abstract(x, n):
  sharding = getattr(x, "sharding", None)
  if sharding is not None:
    sharding = _split_shardings(sharding, n)[0]
  return [jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sharding)] * n


def _join_shardings(leaves):
  first = leaves[0]
  if any(s != first for s in leaves[1:]):
    raise ValueError(f"the layers of a scanned stack are sharded differently ({first} vs "
                     f"{[s for s in leaves if s != first][0]}); the stacked layout needs one "
                     "sharding for every layer (config sharding.rules)")
  if not isinstance(first, NamedSharding):
    raise ValueError(f"stacking needs NamedShardings, got {type(first).__name__}")
  return NamedSharding(first.mesh, PartitionSpec(None, *first.spec))  # layer axis unsharded


def _split_shardings(x, n):
  return [NamedSharding(x.mesh, PartitionSpec(*tuple(x.spec)[1:]))] * n


ARRAYS = (_join_arrays, _split_arrays)
ABSTRACT = (_join_abstract, _split_abstract)
SHARDINGS = (_join_shardings, _split_shardings)


def _get(tree: Mapping, path: Path):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _replace(tree: Mapping, path: Path, value) -> Dict:
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
  return out


def _map_param_dicts(fn: Callable[[Mapping], Any], tree):
  """fn applied to every outermost dict of `tree` (params itself, or the moments inside an
  optimizer state); other nodes and leaves are kept."""
  return jax.tree.map(lambda x: fn(x) if isinstance(x, Mapping) else x, tree,
                      is_leaf=lambda x: isinstance(x, Mapping))


@dataclasses.dataclass(frozen=True)
class StackLayout:
  """Where the scanned stacks are; empty when nothing scans (then both maps are identities)."""
  stacks: Tuple[Stack, ...] = ()

  @classmethod
  def of(cls, model: nnx.Module) -> "StackLayout":
    """The stacks of `model`'s modules that scan (their `scan_groups()`)."""
    paths = {id(node): path for path, node in nnx.iter_graph(model)}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stacks = []
    for path, node in nnx.iter_graph(model):
      groups = node.scan_groups() if hasattr(node, "scan_groups") else []
      if not groups:
        continue
      member_paths = [[tuple(paths[id(m)]) for m in group] for group in groups]
      parent = member_paths[0][0][:-1]
      if any(p[:-1] != parent or not isinstance(p[-1], int)
             for group in member_paths for p in group):
        raise ValueError(f"{type(node).__name__} at {path}: its scan groups are not children "
                         "of one list")
      indices = tuple(tuple(p[-1] for p in group) for group in member_paths)
      children = _get(params, parent)
      if children is None or sorted(i for g in indices for i in g) != sorted(children):
        continue  # some children run outside the scan: the stage stays per layer
      stacks.append(Stack(parent=parent, groups=indices))
    return cls(tuple(sorted(stacks, key=lambda s: s.name())))

  def __bool__(self) -> bool:
    return bool(self.stacks)

  def _rewrite(self, tree, children_of: Callable[[Stack, Mapping], Dict]):
    """Each stack's parent dict replaced by `children_of(stack, its children)`, in every
    params-shaped dict of `tree`; a tree without the stack (e.g. a frozen stack in the
    optimizer's moments) keeps what it has."""
    def rewrite(params: Mapping):
      for stack in self.stacks:
        children = _get(params, stack.parent)
        if children:
          params = _replace(params, stack.parent, children_of(stack, children))
      return params

    return _map_param_dicts(rewrite, tree)

  def stack(self, tree, leaves: Tuple[Join, Split] = ARRAYS):
    """Stored (per layer) -> stacked layout, for params-shaped dicts anywhere in `tree`."""
    join = leaves[0]

    def stacked_children(stack: Stack, children: Mapping) -> Dict:
      out = {k: v for k, v in children.items() if not any(k in group for group in stack.groups)}
      for g, group in enumerate(stack.groups):
        missing = [i for i in group if i not in children]
        if missing:
          raise ValueError(f"stack {stack.name()}: layers {missing} are missing from the "
                           f"tree (it holds {sorted(children)})")
        try:
          out[group_key(g)] = jax.tree.map(lambda *xs: join(xs), *[children[i] for i in group])
        except ValueError as e:
          raise ValueError(f"stack {stack.name()}: its layers hold different parameters "
                           f"({e})") from e
      return out

    return self._rewrite(tree, stacked_children)

  def unstack(self, tree, leaves: Tuple[Join, Split] = ARRAYS):
    """Stacked -> stored (per layer) layout; the inverse of `stack`."""
    split = leaves[1]

    def layer_children(stack: Stack, children: Mapping) -> Dict:
      keys = [group_key(g) for g in range(len(stack.groups))]
      out = {k: v for k, v in children.items() if k not in keys}
      for key, group in zip(keys, stack.groups):
        if key not in children:
          raise ValueError(f"stack {stack.name()}: '{key}' is missing from the tree (it holds "
                           f"{sorted(map(str, children))})")
        parts = jax.tree.map(lambda x: split(x, len(group)), children[key])
        for j, index in enumerate(group):  # parts' leaves are lists of the layers' leaves
          out[index] = jax.tree.map(lambda p: p[j], parts, is_leaf=lambda p: isinstance(p, list))
      return dict(sorted(out.items()))

    return self._rewrite(tree, layer_children)

  def stored_names(self, names: Sequence[str]) -> Dict[str, List[str]]:
    """{stacked name: its per-layer names} for dotted parameter names of the stored layout
    that belong to a stack (for checks that rules treat every layer alike)."""
    out: Dict[str, List[str]] = {}
    for name in names:
      parts = name.split(".")
      for stack in self.stacks:
        n = len(stack.parent)
        if tuple(parts[:n]) != tuple(str(k) for k in stack.parent) or len(parts) <= n:
          continue
        for g, group in enumerate(stack.groups):
          if parts[n].isdigit() and int(parts[n]) in group:
            key = ".".join(parts[:n] + [group_key(g)] + parts[n + 1:])
            out.setdefault(key, []).append(name)
    return out
