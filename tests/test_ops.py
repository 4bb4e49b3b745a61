"""Resize, pooling and point sampling against PyTorch outputs (tests/data/torch_ops_ref.npz).

Inputs are ~N(0, 20) (max |x| ~ 80), so atol 4e-5 is about 5 float32 ulps: the remaining
difference is summation order, not the interpolation weights (float64 source indices were off
by up to 1.5e-4 here).
"""
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
