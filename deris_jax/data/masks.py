"""COCO segmentations (polygons, RLE) decoded by pycocotools, as the official loaders decode them.

`decode_segmentation` is the official `loading.py::_load_mask(s)`: polygons go through
`frPyObjects` + `merge` + `decode` (several polygons of one object are one mask), RLE dicts
through `decode` (compressed counts) or `frPyObjects` first (plain counts). Before pycocotools
sees a segmentation it is checked here, so that a bad one is an error naming the problem:
types, sizes, polygon lengths, and the run total of an RLE. pycocotools cannot serve for that
last check: version 2.0.11 decodes an RLE whose runs fall short of height x width into
uninitialised memory without an error, and it has no public function that returns the runs of
a compressed string; `decode_rle_string` reads them (the 5-bit group format of the COCO API).

`mask_to_runs` / `runs_to_mask` are the builders' own storage format, plain column-major run
lengths that the tf.data pipeline decodes (`pipeline_ops.decode_rle_masks`), not a COCO one.
Everything here runs at prepare time, never inside the pipeline.
"""
from typing import Any

import numpy as np
from pycocotools import mask as mask_util


class MaskDecodeError(ValueError):
  """A segmentation that cannot be decoded; the message says why."""


def decode_rle_string(counts: str | bytes) -> np.ndarray:
  """Compressed COCO RLE string -> run lengths (int64).

  Each run is stored as 5-bit groups (char - 48), 0x20 = "more groups follow", 0x10 on the last
  group = negative; from the third run on, the value is a delta to the run two places back.
  """
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  runs = []
  pos = 0
  while pos < len(counts):
    value, shift, more = 0, 0, True
    while more:
      if pos >= len(counts):
        raise MaskDecodeError(f"RLE string ends inside a run at character {pos}")
      code = ord(counts[pos]) - 48
      if not 0 <= code < 64:
        raise MaskDecodeError(f"RLE string has an invalid character {counts[pos]!r} at {pos}")
      value |= (code & 0x1F) << (5 * shift)
      more = bool(code & 0x20)
      pos += 1
      shift += 1
      if not more and code & 0x10:
        value |= -1 << (5 * shift)  # sign-extend
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return np.asarray(runs, np.int64)


def runs_to_mask(runs: np.ndarray, height: int, width: int) -> np.ndarray:
  """Column-major run lengths (zeros first) -> (height, width) uint8 mask."""
  runs = np.asarray(runs, np.int64)
  _check_runs(runs, height, width)
  values = (np.arange(len(runs)) % 2).astype(np.uint8)  # 0, 1, 0, 1, ...
  flat = np.repeat(values, runs)  # (H*W,) column-major
  return flat.reshape(width, height).T.copy()


def mask_to_runs(mask: np.ndarray) -> np.ndarray:
  """(H, W) binary mask -> column-major run lengths starting with zeros (int64)."""
  flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)  # column-major
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds)
  if flat.size and flat[0] == 1:
    runs = np.concatenate([[0], runs])  # first run counts zeros
  return runs.astype(np.int64)


def _is_number_list(values: Any) -> bool:
  return isinstance(values, (list, tuple)) and all(
      isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in values)


def _check_runs(runs: np.ndarray, height: int, width: int) -> None:
  if (runs < 0).any():
    raise MaskDecodeError(f"RLE has a negative run length ({int(runs.min())})")
  if int(runs.sum()) != height * width:
    raise MaskDecodeError(
        f"RLE run lengths sum to {int(runs.sum())}, expected height*width = {height * width}")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
  """COCO `segmentation` (polygons, RLE dict with str or list counts) -> (H, W) uint8 mask.

  Several polygons are merged (union), as the official loaders do with `maskUtils.merge`.
  Raises MaskDecodeError with the reason when it cannot be decoded.
  """
  if isinstance(segmentation, dict):
    if "counts" not in segmentation or "size" not in segmentation:
      raise MaskDecodeError(f"RLE dict needs 'counts' and 'size', got keys {sorted(segmentation)}")
    size = segmentation["size"]
    if list(size) != [height, width]:
      raise MaskDecodeError(f"RLE size {list(size)} differs from the image (height, width) "
                            f"{[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
      _check_runs(decode_rle_string(counts), height, width)
      rle = {"size": [height, width],
             "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    elif _is_number_list(counts) and all(float(c).is_integer() for c in counts):
      _check_runs(np.asarray(counts, np.int64), height, width)
      rle = mask_util.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]},
                                  height, width)
    else:
      raise MaskDecodeError("RLE 'counts' must be a string or a list of integers")
    return np.ascontiguousarray(mask_util.decode(rle), np.uint8)
  if isinstance(segmentation, (list, tuple)):
    polygons = segmentation
    if _is_number_list(polygons) and polygons:  # a single flat polygon
      polygons = [polygons]
    if not polygons:
      raise MaskDecodeError("empty polygon list")
    for i, polygon in enumerate(polygons):
      if not _is_number_list(polygon):
        raise MaskDecodeError(f"polygon {i} is not a list of finite numbers")
      # Fewer than 3 points is no area; pycocotools would even read 4 numbers as a box.
      if len(polygon) % 2 or len(polygon) < 6:
        raise MaskDecodeError(
            f"polygon {i} has {len(polygon)} coordinates; expected an even number >= 6")
    rles = mask_util.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    return np.ascontiguousarray(mask_util.decode(mask_util.merge(rles)), np.uint8)
  raise MaskDecodeError(f"segmentation must be polygons or an RLE dict, got {type(segmentation)}")
