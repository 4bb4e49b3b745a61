"""Repeated layers as one `lax.scan` (config `model.scan_layers`): one compiled body per stack.

A Python loop over N layers puts N copies of the layer (and of its backward) into the program,
so compile time grows with depth. Scanned, the program holds the body once. The model keeps
its parameters per layer (`layers[i]` ...), so checkpoints and the converter do not change: at
call time each layer's pure-dict parameters are stacked (`jnp.stack`, leading axis = layer)
and the body rebuilds one layer with `nnx.merge(graphdef, slice)`; gradients flow back through
the stack to every layer's own parameters. The modules that scan say which layers they stack
(`scan_groups()`), and the train state holds exactly those stacked (`stack_layout`): there
the per-layer parameters the model receives are slices of the stacked arrays, and XLA folds
the stack of those slices back into the arrays, so training pays for neither.

Rules the callers keep:
- The stacked modules differ only in parameter values and in attributes the body overrides
  (drop-path rates, passed as scanned arrays); the body uses the first module's graphdef, so
  any other static attribute (window shift, sizes) must be the same across the stack.
- Stochastic layers get one key per step (`step_keys`): other draws than the loop's, the same
  law.
- Intermediates for the parity check (`taps`) come out of the scan as stacked per-step values
  (`unstack_taps`), so the scanned program is checked against the official per-layer tensors.
"""
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx


def stack_params(modules: Sequence[nnx.Module]):
  """The modules' parameters as one pure-dict tree with a leading axis of len(modules)."""
  params = [nnx.to_pure_dict(nnx.state(m)) for m in modules]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)


def step_keys(rngs: Optional[nnx.Rngs], shape: Tuple[int, ...], use: bool) -> jax.Array:
  """`shape` keys (one per stochastic step) from the 'dropout' stream, or placeholders."""
  if not use:
    return jnp.zeros(shape, jnp.uint32)
  if rngs is None:
    raise ValueError("drop path in training needs `rngs` with a 'dropout' stream")
  return jax.random.split(rngs.dropout(), math.prod(shape)).reshape(shape)


def scan_modules(groups: Sequence[Sequence[nnx.Module]], body: Callable, carry, xs=None, *,
                 remat: bool = False):
  """`lax.scan` over len(groups[0]) steps; step i calls
  `body(carry, [groups[0][i], groups[1][i], ...], xs[i]) -> (carry, ys)`.

  `groups` are parallel stacks of same-structured modules (one group for a plain stack, two
  for Swin's regular / shifted pairs). Returns (carry, stacked ys).
  """
  lengths = {len(g) for g in groups}
  if len(lengths) != 1:
    raise ValueError(f"scan_modules: groups of different lengths {sorted(lengths)}")
  graphdefs = [nnx.split(g[0])[0] for g in groups]
  stacked = [stack_params(g) for g in groups]

  def step(carry, inputs):
    params, x = inputs
    modules = [nnx.merge(gd, nnx.State(p)) for gd, p in zip(graphdefs, params)]
    return body(carry, modules, x)

  if remat:
    step = jax.checkpoint(step)
  return jax.lax.scan(step, carry, (stacked, xs))


def unstack_taps(taps: Optional[dict], stacked: Optional[Dict[str, jax.Array]],
                 name: Callable[[int, str], str]) -> None:
  """Writes the stacked per-step taps of a scan into `taps` as `name(step, key)`."""
  if taps is None or not stacked:
    return
  for key, values in stacked.items():
    for i in range(values.shape[0]):
      taps[name(i, key)] = values[i]
