"""ops/layer_norm: the forward as before (bit for bit), the hand-written backward equal to jax's
derivative of it up to summation order."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax.ops.layer_norm import layer_norm
from tests import norm_cases


def _plain(x, scale, bias, eps):
  """The formula `layers.LayerNorm` computed before, differentiated by jax."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale + bias).astype(x.dtype)


@pytest.mark.parametrize("shape", [(7,), (2, 5, 16), (3, 4, 6, 32)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_forward_and_gradients_match_jax(shape, dtype, tol):
  x, scale, bias, weights = norm_cases.inputs(shape, dtype)
  eps = 1e-6
  forward = lambda fn: np.asarray(jax.jit(fn, static_argnums=3)(x, scale, bias, eps), np.float32)
  np.testing.assert_array_equal(forward(layer_norm), forward(_plain))

  def loss(fn):
    return lambda x, s, b: jnp.sum(jnp.sin(fn(x, s, b, eps).astype(jnp.float32)) * weights)

  ours = jax.jit(jax.grad(loss(layer_norm), argnums=(0, 1, 2)))(x, scale, bias)
  theirs = jax.jit(jax.grad(loss(_plain), argnums=(0, 1, 2)))(x, scale, bias)
  norm_cases.assert_gradients_match(ours, theirs, tol)


def test_vmapped_and_second_use():
  """Under vmap (the scanned stacks) and used twice in one loss (shared parameters)."""
  x, scale, bias, weights = norm_cases.inputs((4, 3, 8), jnp.float32, seed=1)

  def loss(fn):
    def f(x, s, b):
      y = jax.vmap(lambda row: fn(row, s, b, 1e-5))(x)
      return jnp.sum(fn(y * 2.0, s, b, 1e-5) * weights)
    return f

  ours = jax.grad(loss(layer_norm), argnums=(0, 1, 2))(x, scale, bias)
  theirs = jax.grad(loss(_plain), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
