"""GroupNorm over NHWC maps in float32, with its backward pass written out.

The forward is PyTorch's `F.group_norm` as `layers.GroupNorm` always computed it (the same jnp
operations in the same order). With x_hat = (x - mean) * r per sample and group, the backward:

  d bias  = sum over (B, H, W) of g         d scale = sum over (B, H, W) of g * x_hat
  d x     = r * (g s - mean(g s) - x_hat * mean(g s * x_hat))   (means per sample and group)

Every sum here runs over the spatial axes, which are not minor, so XLA:CPU compiles them as
column reductions (the pixel decoder's GroupNorms: ~6 ms of the default job's ~250 ms of
thread time per train step). On the CPU they are products with a ones vector instead: d bias
and d scale through `sum_rows_of_pair` (as LayerNorm's), and the per-sample channel sums of the
two means as one batched (B, 1, H*W) x (B, H*W, C) product each, summed over each group's few
channels after. Other backends reduce instead (the two per-sample sums as one reduction of the
stacked pair). The values equal jax's derivative up to summation order (tests/test_group_norm.py).
"""
import functools

import jax
import jax.numpy as jnp

from deris_jax.ops import sum_rows


def _forward(x, scale, bias, num_groups, eps):
  b, h, w, c = x.shape
  grouped = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)  # (B, H, W, G, c)
  mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)  # (B, 1, 1, G, 1)
  var = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)  # (B, 1, 1, G, 1)
  rstd = jax.lax.rsqrt(var + eps)  # (B, 1, 1, G, 1)
  x_hat = ((grouped - mean) * rstd).reshape(b, h, w, c)  # (B, H, W, C)
  return (x_hat * scale + bias).astype(x.dtype), (x_hat, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               eps: float) -> jax.Array:
  """x (B, H, W, C) normalised per sample over each group of C / num_groups channels and all
  pixels, in float32, times scale plus bias ((C,) float32); returned in x's dtype."""
  return _forward(x, scale, bias, num_groups, eps)[0]


def _sample_sums_by_reduction(g_scaled: jax.Array, gx_scaled: jax.Array) -> jax.Array:
  return jnp.sum(jnp.stack([g_scaled, gx_scaled]), axis=2)  # (2, B, C)


def _sample_sums_by_dot(g_scaled: jax.Array, gx_scaled: jax.Array) -> jax.Array:
  ones = jnp.ones(g_scaled.shape[:2], jnp.float32)  # (B, H*W)
  hi = jax.lax.Precision.HIGHEST
  return jnp.stack([jnp.einsum("bn,bnc->bc", ones, part, precision=hi)
                    for part in (g_scaled, gx_scaled)])  # (2, B, C)


def _backward(num_groups, eps, residuals, cotangent):
  del eps
  x_hat, rstd, scale = residuals
  b, h, w, c = x_hat.shape
  groups = (b, h, w, num_groups, c // num_groups)
  g = cotangent.astype(jnp.float32)  # (B, H, W, C)
  gx = g * x_hat  # (B, H, W, C)
  d_bias, d_scale = sum_rows.sum_rows_of_pair(g.reshape(-1, c), gx.reshape(-1, c))  # 2 x (C,)
  g_scaled, gx_scaled = g * scale, gx * scale  # 2 x (B, H, W, C)
  channel_sums = jax.lax.platform_dependent(
      g_scaled.reshape(b, h * w, c), gx_scaled.reshape(b, h * w, c),
      cpu=_sample_sums_by_dot, default=_sample_sums_by_reduction)  # (2, B, C)
  group_means = jnp.sum(channel_sums.reshape(2, b, 1, 1, num_groups, c // num_groups), axis=-1,
                        keepdims=True) / (h * w * (c // num_groups))  # (2, B, 1, 1, G, 1)
  d_x = rstd * (g_scaled.reshape(groups) - group_means[0]
                - x_hat.reshape(groups) * group_means[1])  # (B, H, W, G, c)
  return d_x.reshape(b, h, w, c).astype(cotangent.dtype), d_scale, d_bias


group_norm.defvjp(_forward, _backward)
