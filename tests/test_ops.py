"""Resize, pooling and point sampling against PyTorch outputs (tests/data/torch_ops_ref.npz).

Inputs are ~N(0, 20) (max |x| ~ 80), so atol 4e-5 is about 5 float32 ulps: the remaining
difference is summation order, not the interpolation weights (float64 source indices were off
by up to 1.5e-4 here).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax.ops import resize, sample


@pytest.fixture(scope="module")
def ref():
  with np.load("tests/data/torch_ops_ref.npz") as d:
    return {k: d[k] for k in d.files}


@pytest.mark.parametrize("size", [(14, 18), (3, 4), (7, 9), (28, 5), (1, 1), (37, 50), (61, 13)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_matches_torch(ref, size, align_corners):
  want = ref[f"{size[0]}_{size[1]}_{align_corners}"]
  got = resize.resize_bilinear(ref["x"], size, align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got), want, atol=4e-5)
  nhwc = resize.resize_bilinear(np.transpose(ref["x"], (0, 2, 3, 1)), size,
                                align_corners=align_corners, axes=(1, 2))
  np.testing.assert_allclose(np.transpose(np.asarray(nhwc), (0, 3, 1, 2)), want, atol=4e-5)


@pytest.mark.parametrize("name,size,align_corners", [("big_96", (96, 96), True),
                                                     ("big_37_50", (37, 50), False)])
def test_large_resize_matches_torch(ref, name, size, align_corners):
  """Values ~20 and large scale factors: the source index must be float32 like PyTorch's."""
  got = resize.resize_bilinear(ref["big"], size, align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got), ref[name], atol=4e-5)


def test_point_sample_matches_grid_sample(ref):
  got = sample.point_sample(ref["maps"], ref["pts"])
  np.testing.assert_allclose(np.asarray(got), ref["gs"], atol=1e-6)
  assert (ref["pts"] < 0).any() and (ref["pts"] > 1).any()  # out-of-map points are covered


def test_avg_pool_matches_torch(ref):
  got = resize.avg_pool(ref["x"], 2, axes=(2, 3))
  np.testing.assert_allclose(np.asarray(got), ref["pool"], atol=4e-5)


@pytest.mark.parametrize("axes", [(1, 2), (2, 1), (-3, -2)])
def test_avg_pool_drops_partial_windows_and_spreads_the_gradient(axes):
  """(1, 5, 7, 2) in windows of 2: the last row and column fill no window and are dropped
  (PyTorch without padding); each pooled value's cotangent goes to its 4 inputs / 4."""
  x = np.arange(70, dtype=np.float32).reshape(1, 5, 7, 2)
  want = x[:, :4, :6].reshape(1, 2, 2, 3, 2, 2).mean(axis=(2, 4))  # (1, 2, 3, 2)
  np.testing.assert_array_equal(np.asarray(resize.avg_pool(x, 2, axes=axes)), want)
  cotangent = np.arange(12, dtype=np.float32).reshape(1, 2, 3, 2) + 1
  grad = jax.grad(lambda v: jnp.sum(resize.avg_pool(v, 2, axes=axes) * cotangent))(x)
  want_grad = np.zeros_like(x)
  want_grad[:, :4, :6] = np.repeat(np.repeat(cotangent, 2, axis=1), 2, axis=2) / 4
  np.testing.assert_array_equal(np.asarray(grad), want_grad)


def test_avg_pool_keeps_dtype_and_rejects_bad_arguments():
  assert resize.avg_pool(jnp.ones((2, 8, 8, 3), jnp.bfloat16), 4).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="window must be >= 1"):
    resize.avg_pool(np.ones((1, 4, 4, 1), np.float32), 0)
  with pytest.raises(ValueError, match="the same axis"):
    resize.avg_pool(np.ones((1, 4, 4, 1), np.float32), 2, axes=(1, -3))
