"""COCO mask decoding (deris_jax.data.masks, over pycocotools) against literal pycocotools values.

The literal cases below were produced with pycocotools 2.0 (`frPyObjects` + `merge`, compressed
counts and `area`) on random polygons, when the decoding was our own; they now pin the
installed pycocotools and the way the builders call it. Bad segmentations must be errors that
name the problem, before pycocotools sees them (it decodes short RLEs into garbage).
"""
import re

import numpy as np
import pytest
from pycocotools import mask as mask_util

from deris_jax.data import masks as M

# (height, width, polygon, pycocotools compressed counts, pycocotools area)
PYCOCOTOOLS_CASES = [
    (7, 9, [9.66, 8.08, 0.93, 1.9, 9.36, -1.93, 8.68, 8.36, 4.08, 1.94, 1.62, 1.31, 3.79, 4.56],
     "?160O2LN13OM0411O1", 29),
    (7, 9, [5.2, 10.94, 8.3, 6.09, 10.86, 0.8, 0.08, 5.96, -1.43, -1.54, 4.69, 4.06],
     "062N2O1N83F0O10OO", 31),
    (20, 13, [13.1, 10.34, 9.92, 3.94, -1.72, 2.62, 14.61, 2.81, 6.87, -1.91, 17.92, 1.71, 4.42,
              19.13], "k31<0J050L030N01001M01OK31N50I68", 29),
    (20, 13, [10.23, 18.33, 13.35, 15.8, 0.2, 10.99, 10.19, 18.91, 6.67, 12.36, -0.58, 7.3, 5.75,
              1.6], "62b01@N;3FM85GL76II69IH86HK;63IC0>031NO1OB", 72),
    (31, 40, [14.7, 41.06, 23.96, 24.62, 26.07, 27.76, 4.63, 17.37],
     "]51n03N1N2O2M2OO001O001O001O001O001M2N11002Of<", 126),
    (31, 40, [8.54, 15.71, 2.25, 40.58, 7.46, 27.56, 11.22, 36.46, 27.14, 3.79, 35.18, 39.58,
              37.77, 23.07],
     "g53h03M2N6N1O0001O000O1N3M2M3N2N11N2N2N2N3M2N2005L3L4L3OO3L4L0001O0J]1", 284),
]


@pytest.mark.parametrize("height,width,polygon,counts,area", PYCOCOTOOLS_CASES)
def test_polygon_matches_pycocotools(height, width, polygon, counts, area):
  mask = M.decode_segmentation([polygon], height, width)
  assert int(mask.sum()) == area
  assert mask_util.encode(np.asfortranarray(mask))["counts"].decode() == counts
  assert M.decode_rle_string(counts).tolist() == M.mask_to_runs(mask).tolist()
  rle_mask = M.decode_segmentation({"size": [height, width], "counts": counts}, height, width)
  np.testing.assert_array_equal(rle_mask, mask)


def test_integer_rectangle_area_and_union_of_polygons():
  rect = [2, 3, 12, 3, 12, 9, 2, 9]
  mask = M.decode_segmentation([rect], 20, 20)
  assert mask.sum() == 60  # pycocotools: pixels [2, 12) x [3, 9)
  assert mask[3:9, 2:12].all()
  two = M.decode_segmentation([rect, [14, 1, 18, 1, 18, 5, 14, 5]], 20, 20)
  assert two.sum() == 76  # 60 + 16, as pycocotools merge
  single_flat = M.decode_segmentation(rect, 20, 20)  # a flat polygon list is one polygon
  np.testing.assert_array_equal(single_flat, mask)


def test_rle_string_roundtrip_and_uncompressed_counts():
  rng = np.random.default_rng(0)
  mask = (rng.random((13, 17)) > 0.6).astype(np.uint8)
  runs = M.mask_to_runs(mask)
  assert runs.sum() == 13 * 17
  counts = mask_util.encode(np.asfortranarray(mask))["counts"]  # bytes, as COCO files hold
  np.testing.assert_array_equal(M.decode_rle_string(counts), runs)
  np.testing.assert_array_equal(
      M.decode_segmentation({"size": [13, 17], "counts": counts.decode()}, 13, 17), mask)
  decoded = M.decode_segmentation({"size": [13, 17], "counts": runs.tolist()}, 13, 17)
  np.testing.assert_array_equal(decoded, mask)
  full = np.ones((3, 4), np.uint8)  # starts with a run of ones -> leading zero run
  assert M.mask_to_runs(full).tolist() == [0, 12]


@pytest.mark.parametrize("segmentation,message", [
    ([[1.0, 2.0, 3.0]], "expected an even number >= 6"),
    ([[1, 1, 5, 1]], "expected an even number >= 6"),
    ([], "empty polygon list"),
    ([["a", 1, 2, 3, 4, 5]], "not a list of finite numbers"),
    ({"size": [4, 4], "counts": [3, 4]}, "sum to 7, expected height*width = 16"),
    ({"size": [4, 4], "counts": "32"}, "sum to 5, expected height*width = 16"),  # short
    ({"size": [4, 4], "counts": "3>2"}, "sum to 19, expected height*width = 16"),  # long
    ({"size": [5, 4], "counts": [20]}, "differs from the image"),
    ({"size": [4, 4], "counts": "@@ \x7f"}, "invalid character"),
    ({"counts": [16]}, "needs 'counts' and 'size'"),
    ("nonsense", "must be polygons or an RLE dict"),
])
def test_bad_segmentations_name_the_problem(segmentation, message):
  with pytest.raises(M.MaskDecodeError, match=re.escape(message)):
    M.decode_segmentation(segmentation, 4, 4)
