"""`materialize(x)`: the identity, but XLA:CPU writes `x` to memory instead of recomputing it.

Why (issue 14, BENCHMARKS.md "Residual streams written once"): XLA:CPU's instruction fusion
copies a cheap elementwise producer into every consumer. A residual stream is elementwise
from layer to layer (post-norm: `LN(x + dot)`; pre-norm: `x + dot + bias`), so without a
materialised value in between, each consumer of layer k's output recomputes layers 1..k, in
the forward and again in the backward pass: fusions grow with depth and the program with its
square. The tiny train step had 310 fusions of 100-800 instructions on the decoder's (B, N, C)
= (2, 10, 32) queries, 57% of its fused instructions. `lax.optimization_barrier` does not help
(XLA:CPU removes barriers before fusion).

What does: a reduction, which XLA:CPU never fuses into a consumer. `x` is summed with zeros
over a new leading axis of 2 (exact: `x + 0` is `x`, up to the sign of a zero), in the forward
pass and, through a custom VJP, on the cotangent in the backward pass. The cost is one pass over
`x`. Other backends get the plain identity (`lax.platform_dependent`, resolved when the program
is lowered): their fusion passes are others, and without a GPU to measure them here their
programs stay as measured (BENCHMARKS.md, the H200 table).
"""
import jax
import jax.numpy as jnp


def _sum_with_zeros(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0, dtype=x.dtype)  # x's shape


def write_once(x: jax.Array) -> jax.Array:
  """`x` (any dtype), computed once into memory on the CPU, for values that take no gradient
  (integers, booleans): its gradient would be XLA's own, fused again; `materialize` writes the
  cotangent once too."""
  return jax.lax.platform_dependent(x, cpu=_sum_with_zeros, default=lambda y: y)


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """`x`, computed once into memory on the CPU (forward and backward); see the module doc."""
  return write_once(x)


def _forward(x):
  return write_once(x), None


def _backward(_, cotangent):
  return (write_once(cotangent),)


materialize.defvjp(_forward, _backward)
