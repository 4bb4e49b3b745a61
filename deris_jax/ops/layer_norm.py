"""LayerNorm over the last axis in float32, with its backward pass written out.

The forward is PyTorch's `F.layer_norm` as `layers.LayerNorm` always computed it (the same jnp
operations in the same order). The backward is the textbook one, with x_hat = (x - mean) * r:

  d bias  = sum over rows of g              d scale = sum over rows of g * x_hat
  d x     = r * (g s - mean(g s) - x_hat * mean(g s * x_hat))     (means over the last axis)

written so that each pair of reductions is one reduction over a stacked pair: two reduction
kernels per LayerNorm shape where jax's derivative of the forward gives XLA four or more, plus
their elementwise neighbours. A DeRIS program has LayerNorms of a few dozen shapes (Swin
stages, BEiT-3 experts, decoder queries), and on the CPU each distinct kernel costs ~35 ms of
compile (issue 14; BENCHMARKS.md "Residual streams written once"). On the CPU the two sums over
rows (d bias, d scale) are products with a ones vector (`sum_rows_of_pair`: Eigen's matrix-vector
product, no kernel to compile): XLA:CPU's column reductions were ~10 ms of thread time per
default-job train step (BENCHMARKS.md "The train step's thread time by source"); other
backends keep the reduction. The values equal jax's derivative up to summation order
(tests/test_layer_norm.py).
"""
import functools

import jax
import jax.numpy as jnp

from deris_jax.ops import sum_rows


def _forward(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)  # (..., 1)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # (..., 1)
  rstd = jax.lax.rsqrt(var + eps)  # (..., 1)
  x_hat = (x32 - mean) * rstd  # (..., C)
  return (x_hat * scale + bias).astype(x.dtype), (x_hat, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32, returned in
  x's dtype; scale and bias (C,) float32."""
  return _forward(x, scale, bias, eps)[0]


def _backward(eps, residuals, cotangent):
  del eps
  x_hat, rstd, scale = residuals
  g = cotangent.astype(jnp.float32)  # (..., C)
  d_bias, d_scale = sum_rows.sum_rows_of_pair(g.reshape(-1, g.shape[-1]),
                                              (g * x_hat).reshape(-1, g.shape[-1]))  # 2 x (C,)
  g_scaled = g * scale  # (..., C)
  mean_g, mean_gx = jnp.mean(jnp.stack([g_scaled, g_scaled * x_hat]), axis=-1,
                             keepdims=True)  # 2 x (..., 1)
  d_x = rstd * (g_scaled - mean_g - x_hat * mean_gx)  # (..., C)
  return d_x.astype(cotangent.dtype), d_scale, d_bias


layer_norm.defvjp(_forward, _backward)
