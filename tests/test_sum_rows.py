"""ops/sum_rows: sums over rows as ones-vector products on the CPU, `add_bias`, and the layers
built on it (`layers.dense`, Linear, Conv): the same values as jax's reduction, jnp.dot and
nnx's layers, gradients equal to jax's derivative up to summation order, clear errors for bad
shapes."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deris_jax.models import layers
from deris_jax.ops import sum_rows


def _normal(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(0.3, 2.0, shape), dtype)


@pytest.mark.parametrize("shape", [(1, 3), (37, 5), (4096, 48)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_sum_rows_matches_the_reduction(shape, dtype, tol):
  x = _normal(shape, 0, dtype)
  ours = jax.jit(sum_rows.sum_rows)(x)
  assert ours.dtype == dtype and ours.shape == shape[1:]
  expected = np.asarray(x, np.float64).sum(0)
  np.testing.assert_allclose(np.asarray(ours, np.float32), expected, rtol=tol,
                             atol=tol * np.abs(expected).max())


def test_sum_rows_is_a_product_on_the_cpu():
  """The CPU program has a dot and no reduction: the branch this module is for is taken."""
  hlo = jax.jit(sum_rows.sum_rows).lower(_normal((64, 8), 1)).compile().as_text()
  assert " dot(" in hlo and " reduce(" not in hlo


def test_sum_rows_rejects_other_ranks():
  with pytest.raises(ValueError, match=r"\(N, C\) array, got shape \(2, 3, 4\)"):
    sum_rows.sum_rows(jnp.zeros((2, 3, 4)))


@pytest.mark.parametrize("x_shape,bias_shape", [((2, 5, 7), (7,)), ((3, 2, 4, 6), (2, 4, 6)),
                                                ((5, 3), ()), ((4, 3), (4, 3))])
def test_add_bias_value_and_gradients_match_jax(x_shape, bias_shape):
  x, bias, weights = _normal(x_shape, 2), _normal(bias_shape, 3), _normal(x_shape, 4)

  def loss(add):
    return lambda x, b: jnp.sum(jnp.sin(add(x, b)) * weights)

  np.testing.assert_array_equal(sum_rows.add_bias(x, bias), x + bias)
  ours = jax.jit(jax.grad(loss(sum_rows.add_bias), argnums=(0, 1)))(x, bias)
  theirs = jax.jit(jax.grad(loss(jnp.add), argnums=(0, 1)))(x, bias)
  for name, a, b in zip(("x", "bias"), ours, theirs):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_add_bias_under_vmap_and_scan():
  """The scanned stacks trace layers under lax.scan; nnx.vmap builds them."""
  x, bias = _normal((3, 4, 5), 5), _normal((3, 5), 6)

  def loss(add):
    def body(carry, xb):
      return carry + jnp.sum(jnp.tanh(jax.vmap(add, (0, None))(xb[0][None], xb[1]))), None
    return lambda x, b: jax.lax.scan(body, 0.0, (x, b))[0]

  ours = jax.grad(loss(sum_rows.add_bias), argnums=(0, 1))(x, bias)
  theirs = jax.grad(loss(jnp.add), argnums=(0, 1))(x, bias)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_add_bias_rejects_a_bias_of_another_shape_or_dtype():
  with pytest.raises(ValueError, match=r"bias shape \(5,\) is not the trailing shape"):
    sum_rows.add_bias(jnp.zeros((2, 4)), jnp.zeros((5,)))
  with pytest.raises(ValueError, match=r"bias shape \(1, 2, 4\) is not the trailing shape"):
    sum_rows.add_bias(jnp.zeros((2, 4)), jnp.zeros((1, 2, 4)))
  with pytest.raises(ValueError, match="x is bfloat16 but bias is float32"):
    sum_rows.add_bias(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((4,)))


def _assert_module_matches(ours, theirs, x, tol=2e-5):
  """Same output and the same gradients (inputs and every parameter) as the nnx layer, up to
  summation order (bfloat16: the CPU's sum accumulates in float32 and rounds once)."""
  theirs.kernel[...] = ours.kernel[...]
  theirs.bias[...] = ours.bias[...]

  def grads(module):
    def loss(module, x):
      return jnp.sum(jnp.sin(module(x).astype(jnp.float32)))
    return nnx.grad(loss, argnums=(0, 1))(module, x)

  np.testing.assert_array_equal(np.asarray(ours(x), np.float32),
                                np.asarray(theirs(x), np.float32))
  (ours_params, ours_x), (theirs_params, theirs_x) = grads(ours), grads(theirs)
  np.testing.assert_allclose(np.asarray(ours_x, np.float32), np.asarray(theirs_x, np.float32),
                             rtol=tol, atol=tol)
  for name in ("kernel", "bias"):
    a, b = (np.asarray(getattr(p, name)[...]) for p in (ours_params, theirs_params))
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_linear_matches_nnx(dtype, tol):
  ours = layers.linear(6, 9, rngs=nnx.Rngs(0), dtype=dtype)
  theirs = nnx.Linear(6, 9, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  _assert_module_matches(ours, theirs, _normal((2, 3, 6), 7, dtype), tol)


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, 1), (4, 4, 0), (1, 1, 0)])
def test_conv_matches_nnx(kernel_size, stride, padding):
  ours = layers.conv(5, 7, kernel_size, stride=stride, padding=padding, rngs=nnx.Rngs(0))
  theirs = nnx.Conv(5, 7, (kernel_size, kernel_size), strides=(stride, stride),
                    padding=[(padding, padding)] * 2, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  _assert_module_matches(ours, theirs, _normal((2, 8, 8, 5), 8))


def test_conv_rejects_a_map_of_another_rank():
  conv = layers.conv(3, 4, 1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError,
                     match=r"Conv: expected a \(B, H, W, C\) map, got shape \(8, 8, 3\)"):
    conv(jnp.zeros((8, 8, 3)))


@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 3, 6), (2, 2, 3, 4, 6)])
def test_dense_is_the_dot_over_the_last_axis(shape):
  x, kernel, weights = _normal(shape, 9), _normal((6, 4), 10), _normal(shape[:-1] + (4,), 11)

  def loss(product):
    return lambda x, k: jnp.sum(jnp.sin(product(x, k)) * weights)

  np.testing.assert_array_equal(layers.dense(x, kernel), jnp.dot(x, kernel))
  ours = jax.jit(jax.grad(loss(layers.dense), argnums=(0, 1)))(x, kernel)
  theirs = jax.jit(jax.grad(loss(jnp.dot), argnums=(0, 1)))(x, kernel)
  for name, a, b in zip(("x", "kernel"), ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_dense_weight_gradient_needs_no_transposed_copy():
  """What `dense` is for: XLA:CPU computes the weight gradient of a (B, L, I) input without
  copying anything into another layout (the dot over the last axis of the 3-D array did)."""
  x, kernel, weights = _normal((4, 16, 8), 12), _normal((8, 32), 13), _normal((4, 16, 32), 14)

  def copies(product):
    grad = jax.jit(jax.grad(lambda x, k, w: jnp.sum(jnp.tanh(product(x, k)) * w), argnums=1))
    hlo = grad.lower(x, kernel, weights).compile().as_text()
    return len(re.findall(r" (?:copy|transpose)\(", hlo))

  assert copies(jnp.dot) > 0  # the layout change this avoids is still there to avoid
  assert copies(layers.dense) == 0


def test_layers_refuse_what_they_do_not_compute():
  """nnx options that the layers' own products would ignore are refused, not ignored."""
  with pytest.raises(ValueError, match="no preferred_element_type or dot_general"):
    layers.Linear(3, 4, preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="no dilation and no mask"):
    layers.Conv(3, 4, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="no dilation and no mask"):
    layers.Conv(3, 4, (3, 3), input_dilation=(1, 2), rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="padding as two .low, high. pairs, got 'SAME'"):
    layers.Conv(3, 4, (3, 3), padding="SAME", rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 3)))
  conv = layers.Conv(3, 4, (3, 3), kernel_dilation=(1, 1), padding=[(1, 1), (1, 1)],
                     rngs=nnx.Rngs(0))  # dilation 1 spelled as a pair, strides as an int
  assert conv(jnp.zeros((1, 8, 8, 3))).shape == (1, 8, 8, 4)


def test_sum_rows_of_pair_is_both_sums():
  a, b = _normal((300, 7), 15), _normal((300, 7), 16)
  pair = jax.jit(sum_rows.sum_rows_of_pair)(a, b)
  expected = np.stack([np.asarray(a, np.float64).sum(0), np.asarray(b, np.float64).sum(0)])
  assert pair.shape == (2, 7)
  np.testing.assert_allclose(pair, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  with pytest.raises(ValueError,
                     match=r"two \(N, C\) arrays of one shape, got \(3, 4\) and \(3, 5\)"):
    sum_rows.sum_rows_of_pair(jnp.zeros((3, 4)), jnp.zeros((3, 5)))
