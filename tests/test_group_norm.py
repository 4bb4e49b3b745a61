"""ops/group_norm: the forward as `layers.GroupNorm` computed it before (bit for bit), the
hand-written backward equal to jax's derivative of it up to summation order."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax.models import layers
from deris_jax.ops.group_norm import group_norm
from tests import norm_cases


def _plain(x, scale, bias, num_groups, eps):
  """The formula `layers.GroupNorm` computed before, differentiated by jax."""
  b, h, w, c = x.shape
  g = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
  return (y * scale + bias).astype(x.dtype)


@pytest.mark.parametrize("shape,num_groups", [((2, 5, 3, 8), 4), ((3, 4, 4, 6), 1),
                                              ((1, 2, 7, 12), 12), ((4, 8, 8, 64), 32)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_forward_and_gradients_match_jax(shape, num_groups, dtype, tol):
  x, scale, bias, weights = norm_cases.inputs(shape, dtype)
  eps = 1e-5
  forward = lambda fn: np.asarray(
      jax.jit(fn, static_argnums=(3, 4))(x, scale, bias, num_groups, eps), np.float32)
  np.testing.assert_array_equal(forward(group_norm), forward(_plain))

  def loss(fn):
    return lambda x, s, b: jnp.sum(
        jnp.sin(fn(x, s, b, num_groups, eps).astype(jnp.float32)) * weights)

  ours = jax.jit(jax.grad(loss(group_norm), argnums=(0, 1, 2)))(x, scale, bias)
  theirs = jax.jit(jax.grad(loss(_plain), argnums=(0, 1, 2)))(x, scale, bias)
  norm_cases.assert_gradients_match(ours, theirs, tol)


def test_the_cpu_backward_sums_pixels_by_products():
  """On the CPU the backward's sums over pixels are dots: the compiled gradient reduces over
  pixels only in the forward (mean and variance)."""
  x, scale, bias, weights = norm_cases.inputs((2, 6, 6, 8), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, s, b, w: jnp.sum(group_norm(x, s, b, 4, 1e-5) * w),
                          argnums=(0, 1, 2)))
  hlo = grad.lower(x, scale, bias, weights).compile().as_text()
  reductions = re.findall(r" reduce\(.*dimensions=\{([\d,]*)\}", hlo)
  over_pixels = [dims for dims in reductions if {"1", "2"} <= set(dims.split(","))]
  assert len(over_pixels) == 2, reductions
  assert hlo.count(" dot(") == 4  # d bias, d scale and the two per-sample channel sums


def test_layer_checks_its_input():
  norm = layers.GroupNorm(4, 8)
  with pytest.raises(ValueError, match=r"GroupNorm: expected \(B, H, W, 8\), got \(2, 3, 3, 6\)"):
    norm(jnp.zeros((2, 3, 3, 6)))
  with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
    layers.GroupNorm(4, 6)
