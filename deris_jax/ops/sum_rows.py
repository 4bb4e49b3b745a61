"""Sums over rows, which the CPU computes as products with a ones vector, and a bias add whose
bias gradient is such a sum.

XLA:CPU compiles a reduction over a non-minor axis ("column" reduction: (N, C) -> (C,)) into a
loop that is slow for large N, while Eigen's matrix-vector product with a ones vector reads
(N, C) once at memory speed and needs no kernel compiled. The default job's train step spent
~46 ms of its ~260 ms of thread time in such sums, most of them the gradients of a bias (a
Linear's, the Swin relative position bias') and of a norm's scale and bias (BENCHMARKS.md
"The train step's thread time by source"). `lax.platform_dependent` takes the product on the
CPU only; other backends keep jax's reduction, so GPU and TPU programs are unchanged.

`sum_rows_of_pair` is the two sums a norm's backward needs (d bias, d scale), one stacked
reduction off the CPU. `add_bias(x, bias)` is `x + bias` for a bias of x's trailing shape
(broadcast over the leading axes), with the same value and a gradient for `bias` from
`sum_rows` (equal to jax's up to the order of summation; tests/test_sum_rows.py).
"""
import functools
import math

import jax
import jax.numpy as jnp


def _sum_by_reduction(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=0)  # (C,)


def _sum_by_dot(x: jax.Array) -> jax.Array:
  ones = jnp.ones((x.shape[0],), jnp.float32)  # (N,)
  return jnp.dot(ones, x.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST).astype(x.dtype)  # (C,)


def sum_rows(x: jax.Array) -> jax.Array:
  """(N, C) -> (C,): the sum over rows in x's dtype (on the CPU accumulated in float32)."""
  if x.ndim != 2:
    raise ValueError(f"sum_rows: expected an (N, C) array, got shape {x.shape}")
  return jax.lax.platform_dependent(x, cpu=_sum_by_dot, default=_sum_by_reduction)


def _pair_by_reduction(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(jnp.stack([a, b]), axis=1)  # (2, C)


def _pair_by_dots(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.stack([_sum_by_dot(a), _sum_by_dot(b)])  # (2, C)


def sum_rows_of_pair(a: jax.Array, b: jax.Array) -> jax.Array:
  """(2, C): `sum_rows` of two (N, C) arrays (a norm's d bias and d scale); off the CPU one
  reduction of the stacked pair."""
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"sum_rows_of_pair: expected two (N, C) arrays of one shape, got "
                     f"{a.shape} and {b.shape}")
  return jax.lax.platform_dependent(a, b, cpu=_pair_by_dots, default=_pair_by_reduction)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _add_bias(bias_ndim: int, x: jax.Array, bias: jax.Array) -> jax.Array:
  del bias_ndim
  return x + bias


def _add_bias_forward(bias_ndim, x, bias):
  del bias_ndim
  return x + bias, None


def _add_bias_backward(bias_ndim, residuals, cotangent):
  del residuals
  bias_shape = cotangent.shape[cotangent.ndim - bias_ndim:]
  rows = cotangent.reshape(-1, math.prod(bias_shape))  # (N, prod(bias_shape))
  return cotangent, sum_rows(rows).reshape(bias_shape)


_add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """x + bias, bias of x's trailing shape and dtype; d bias = `sum_rows` of the cotangent."""
  if bias.ndim > x.ndim or x.shape[x.ndim - bias.ndim:] != bias.shape:
    raise ValueError(f"add_bias: bias shape {bias.shape} is not the trailing shape of x "
                     f"{x.shape}")
  if x.dtype != bias.dtype:
    raise ValueError(f"add_bias: x is {x.dtype} but bias is {bias.dtype}; cast one first")
  return _add_bias(bias.ndim, x, bias)
