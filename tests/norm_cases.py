"""What the tests of the hand-written norms share (test_layer_norm.py, test_group_norm.py):
their inputs, and the comparison of a backward with jax's derivative."""
import jax.numpy as jnp
import numpy as np


def inputs(shape, dtype, seed=0):
  """x of `shape` in `dtype`, float32 scale and bias over its last axis, and float32 weights of
  x's shape for a loss that mixes every element."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(0.5, 3.0, shape), dtype)
  scale = jnp.asarray(rng.normal(1.0, 0.2, shape[-1:]), jnp.float32)
  bias = jnp.asarray(rng.normal(0.0, 0.2, shape[-1:]), jnp.float32)
  weights = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
  return x, scale, bias, weights


def assert_gradients_match(ours, theirs, tol):
  """(d x, d scale, d bias) against jax's: same dtypes and shapes, values within `tol` (of each
  gradient's largest magnitude)."""
  for name, a, b in zip(("x", "scale", "bias"), ours, theirs):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)
