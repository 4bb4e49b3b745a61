"""The optimizer of docs/design.md §9, with PyTorch's exact update rules, as optax transforms.

  clip_grad_norm_(0.15) -> Adam(amsgrad, betas (0.9, 0.98), eps 1e-9, weight decay 0)
  -> learning rate: base lr x per-epoch factor (`schedule`) x the parameter's group multiplier
Param groups (config `optimizer`): names matching `frozen` (the Swin backbone) are not trained
and get no optimizer state (the train step splits them off before differentiating); the first
`lr_multipliers` regex a name matches scales its learning rate (BEiT-3: x0.5); others x1.

Why not optax.adam/amsgrad and clip_by_global_norm: PyTorch's amsgrad keeps the running max
of the *raw* second moment and divides it by the bias correction afterwards
(`denom = sqrt(max(v)) / sqrt(1 - b2^t) + eps`); optax takes the max of the *bias-corrected*
moments, which gives different updates from the second step on. `torch.nn.utils.clip_grad_norm_`
scales by `max_norm / (norm + 1e-6)` when that is < 1. Both are reproduced here exactly.

The per-leaf arithmetic is written with `jax.lax` ops (the same primitives, in the same order,
as the `jnp` operators would emit): tracing a jnp operator goes through a jitted ufunc per
call, which for the ~900 parameter leaves of DeRIS-B (the gradient norm, then traced twice, and
the Adam update) was about a third of the train step's tracing time (BENCHMARKS.md). The clip
now reuses the norm the train step computes (`grad_norm`).
"""
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from jax import lax

from deris_jax import trees
from deris_jax.train import params as params_lib

TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (norm + 1e-6)


def _as(x: jax.Array, dtype) -> jax.Array:
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def global_norm(tree, concatenated=None) -> jax.Array:
  """() float32 L2 norm over every leaf, in float32.

  `concatenated`: None, or a tree of bools with `tree`'s structure: the leaves marked True
  (replicated ones, e.g. every leaf of a data-parallel step) are raveled, concatenated and
  summed in one reduction; the others, leaf by leaf. One reduction compiles to a few kernels,
  where a sum per leaf is one kernel per leaf shape (the default job's train step: 121 fewer
  distinct kernels, ~10% of its compile; BENCHMARKS.md), at the price of a float32 copy of
  those leaves while the norm is computed. Concatenating sharded leaves would gather them
  across the devices, so by default (None) every leaf is summed on its own.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  joined = ([False] * len(leaves) if concatenated is None else
            jax.tree_util.tree_structure(tree).flatten_up_to(concatenated))
  squares = [_sum_of_squares(_as(x, jnp.float32)) for x, j in zip(leaves, joined) if not j]
  flat = [lax.reshape(_as(x, jnp.float32), (x.size,)) for x, j in zip(leaves, joined) if j]
  if flat:
    squares.append(_sum_of_squares(lax.concatenate(flat, 0)))  # (N,) -> ()
  total = None
  for leaf_squares in squares:
    total = leaf_squares if total is None else lax.add(total, leaf_squares)
  return jnp.zeros((), jnp.float32) if total is None else lax.sqrt(total)


def _sum_of_squares(x: jax.Array) -> jax.Array:
  return lax.reduce_sum(lax.mul(x, x), tuple(range(x.ndim)))  # ()


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`torch.nn.utils.clip_grad_norm_(params, max_norm)` (norm_type 2) on the updates.

  `update(..., grad_norm=N)` takes the updates' `global_norm` from a caller that computed it
  already (the train step logs it), instead of tracing the same per-leaf sums a second time."""

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates) if grad_norm is None else grad_norm  # ()
    coef = jnp.minimum(max_norm / (norm + TORCH_CLIP_EPS), 1.0)  # ()
    return jax.tree.map(lambda g: _as(lax.mul(g, _as(coef, g.dtype)), g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


class TorchAdamState(NamedTuple):
  count: jax.Array  # () int32: optimizer steps taken
  mu: Any  # first moment (exp_avg)
  nu: Any  # second moment (exp_avg_sq)
  nu_max: Any  # running max of nu (max_exp_avg_sq); () when amsgrad is off


def scale_by_torch_adam(b1: float, b2: float, eps: float, amsgrad: bool,
                        ) -> optax.GradientTransformation:
  """`torch.optim.Adam`'s direction, without the learning rate (weight decay: see below).

  update = (mu / (1 - b1^t)) / (sqrt(nu_or_max) / sqrt(1 - b2^t) + eps), t = 1, 2, ...
  """

  def init(params):
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # noqa
    return TorchAdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros(),
                          nu_max=zeros() if amsgrad else ())

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    t = count.astype(jnp.float32)
    f32 = lambda g: _as(g, jnp.float32)  # noqa: E731
    mu = jax.tree.map(lambda m, g: lax.add(lax.mul(m, b1), lax.mul(f32(g), 1.0 - b1)),
                      state.mu, updates)
    nu = jax.tree.map(lambda v, g: lax.add(lax.mul(v, b2), lax.mul(lax.square(f32(g)), 1.0 - b2)),
                      state.nu, updates)
    nu_max = jax.tree.map(lax.max, state.nu_max, nu) if amsgrad else ()
    second = nu_max if amsgrad else nu
    bc1 = 1.0 - b1 ** t  # ()
    bc2_sqrt = jnp.sqrt(1.0 - b2 ** t)  # ()
    out = jax.tree.map(lambda m, v, g: _as(lax.div(
        lax.div(m, bc1), lax.add(lax.div(lax.sqrt(v), bc2_sqrt), eps)), g.dtype),
        mu, second, updates)
    return out, TorchAdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init, update)


class LearningRateState(NamedTuple):
  count: jax.Array  # () int32: the 0-based step of the next update


def scale_by_learning_rate(schedule: Callable[[jax.Array, jax.Array], jax.Array],
                           multipliers) -> optax.GradientTransformationExtraArgs:
  """updates * -schedule(step, steps_per_epoch) * multiplier (a tree of Python floats shaped
  like params); `update(..., steps_per_epoch=N)` (the train state's) is required."""

  def init(params):
    del params
    return LearningRateState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, *, steps_per_epoch=None, **extra_args):
    del params, extra_args
    if steps_per_epoch is None:
      raise TypeError("the learning-rate schedule needs update(..., steps_per_epoch=N)")
    lr = schedule(state.count, steps_per_epoch)
    # One scale per distinct multiplier (a few), not per leaf: the same scalar ops either way.
    scales = {m: -lr * m for m in set(jax.tree.leaves(multipliers))}  # {multiplier: ()}
    out = jax.tree.map(lambda g, m: _as(lax.mul(g, _as(scales[m], g.dtype)), g.dtype), updates,
                       multipliers)
    return out, LearningRateState(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


def lr_multiplier(name: str, opt_config: mlc.ConfigDict) -> float:
  """The learning-rate multiplier of a (trainable) parameter: the first matching rule, else 1."""
  for pattern, multiplier in opt_config.lr_multipliers:
    if params_lib.matches_any(name, (pattern,)):
      return float(multiplier)
  return 1.0


def param_groups(params, opt_config: mlc.ConfigDict) -> Dict[str, str]:
  """{parameter name: 'frozen' | 'lr x{multiplier}'}: who is trained at which rate."""
  return {name: ("frozen" if params_lib.matches_any(name, opt_config.frozen)
                 else f"lr x{lr_multiplier(name, opt_config):g}")
          for name in trees.named_leaves(params)}


_OPTIMIZERS = ("adam",)


def build_optimizer(opt_config: mlc.ConfigDict,
                    schedule: Callable[[jax.Array, jax.Array], jax.Array],
                    trainable_params) -> optax.GradientTransformationExtraArgs:
  """The optimizer of the trainable parameters (a tree shaped like `trainable_params`);
  `update(grads, state, params, steps_per_epoch=N[, grad_norm=G])`.

  Args:
    opt_config: the `optimizer` config section.
    schedule: (step, steps per epoch) -> base learning rate x epoch factor
      (`schedule.make_lr_schedule`).
    trainable_params: the trainable subtree (arrays or ShapeDtypeStructs); it fixes the
      per-parameter learning-rate multipliers.
  """
  if opt_config.name not in _OPTIMIZERS:
    raise ValueError(f"unknown optimizer '{opt_config.name}' (config optimizer.name); known: "
                     f"{_OPTIMIZERS}")
  multipliers = trees.map_with_names(lambda name, _: lr_multiplier(name, opt_config),
                                 trainable_params)
  chain = []
  if opt_config.clip_norm:
    chain.append(clip_by_global_norm_torch(opt_config.clip_norm))
  if opt_config.weight_decay:  # torch Adam: L2 added to the (clipped) gradient
    chain.append(optax.add_decayed_weights(opt_config.weight_decay))
  chain.append(scale_by_torch_adam(opt_config.b1, opt_config.b2, opt_config.eps,
                                   opt_config.amsgrad))
  chain.append(scale_by_learning_rate(schedule, multipliers))
  return optax.chain(*chain)
