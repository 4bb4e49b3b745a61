"""COCO segmentation decoding without pycocotools: RLE (compressed and plain) and polygons.

The results equal pycocotools' `frPyObjects` + `merge` + `decode`, which the official loaders
call (`loading.py::_load_mask(s)`): polygons are rasterised with the same boundary walk on a 5x
upsampled grid, RLE counts are column-major runs that start with a run of zeros.

Everything here is numpy; it runs at prepare time, never inside the tf.data pipeline (which
decodes the plain run lengths written by the builders, see `pipeline_ops.decode_rle_masks`).
"""
from typing import Any, Sequence

import numpy as np

_UPSAMPLE = 5.0  # pycocotools rasterises polygon boundaries on a 5x finer grid


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


def encode_rle_string(runs: Sequence[int]) -> str:
  """Run lengths -> compressed COCO RLE string (inverse of `decode_rle_string`)."""
  chars = []
  runs = [int(r) for r in runs]
  for i, run in enumerate(runs):
    value = run - runs[i - 2] if i > 2 else run
    more = True
    while more:
      code = value & 0x1F
      value >>= 5
      more = value != -1 if code & 0x10 else value != 0
      if more:
        code |= 0x20
      chars.append(chr(code + 48))
  return "".join(chars)


def runs_to_mask(runs: np.ndarray, height: int, width: int) -> np.ndarray:
  """Column-major run lengths (zeros first) -> (height, width) uint8 mask."""
  runs = np.asarray(runs, np.int64)
  if (runs < 0).any():
    raise MaskDecodeError(f"RLE has a negative run length ({int(runs.min())})")
  if int(runs.sum()) != height * width:
    raise MaskDecodeError(
        f"RLE run lengths sum to {int(runs.sum())}, expected height*width = {height * width}")
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


def _polygon_boundary_points(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Integer points along every edge of the polygon on the upsampled grid (closed walk)."""
  # C-style truncation toward zero, as pycocotools' `(int)(scale * x + .5)`.
  xs = np.trunc(_UPSAMPLE * xy[:, 0] + 0.5).astype(np.int64)
  ys = np.trunc(_UPSAMPLE * xy[:, 1] + 0.5).astype(np.int64)
  xs = np.append(xs, xs[0])
  ys = np.append(ys, ys[0])
  us, vs = [], []
  for j in range(len(xy)):
    x0, x1, y0, y1 = xs[j], xs[j + 1], ys[j], ys[j + 1]
    dx, dy = abs(x1 - x0), abs(y1 - y0)
    # Walk from the lower end of the dominant axis; `flip` walks the points back in edge order.
    flip = (dx >= dy and x0 > x1) or (dx < dy and y0 > y1)
    if flip:
      x0, x1, y0, y1 = x1, x0, y1, y0
    if dx >= dy:
      steps = np.arange(dx + 1)
      t = dx - steps if flip else steps
      slope = (y1 - y0) / dx if dx else 0.0
      us.append(t + x0)
      vs.append(np.trunc(y0 + slope * t + 0.5).astype(np.int64))
    else:
      steps = np.arange(dy + 1)
      t = dy - steps if flip else steps
      slope = (x1 - x0) / dy
      vs.append(t + y0)
      us.append(np.trunc(x0 + slope * t + 0.5).astype(np.int64))
  return np.concatenate(us), np.concatenate(vs)


def polygon_to_runs(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
  """One COCO polygon [x0, y0, x1, y1, ...] -> run lengths, as pycocotools `rleFrPoly`."""
  xy = np.asarray(polygon, np.float64).reshape(-1, 2)
  u, v = _polygon_boundary_points(xy)
  # Keep the points where the walk crosses a pixel-centre column of the original grid.
  prev_u, prev_v = u[:-1], v[:-1]
  cur_u, cur_v = u[1:], v[1:]
  moved = cur_u != prev_u
  xd = np.where(cur_u < prev_u, cur_u, cur_u - 1).astype(np.float64)
  xd = (xd + 0.5) / _UPSAMPLE - 0.5
  keep = moved & (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
  yd = np.where(cur_v < prev_v, cur_v, prev_v).astype(np.float64)
  yd = (yd + 0.5) / _UPSAMPLE - 0.5
  yd = np.ceil(np.clip(yd, 0, height))
  column = xd[keep].astype(np.int64)
  row = yd[keep].astype(np.int64)
  # Each crossing toggles the mask from that (column-major) position on.
  toggles = np.sort(np.append(column * height + row, height * width))
  gaps = np.diff(np.concatenate([[0], toggles]))
  # Zero-length gaps cancel a toggle pair: fold the following gap into the previous run.
  runs = [int(gaps[0])]
  j = 1
  while j < len(gaps):
    if gaps[j] > 0:
      runs.append(int(gaps[j]))
      j += 1
    else:
      j += 1
      if j < len(gaps):
        runs[-1] += int(gaps[j])
        j += 1
  return np.asarray(runs, np.int64)


def _is_number_list(values: Any) -> bool:
  return isinstance(values, (list, tuple)) and all(
      isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in values)


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
      runs = decode_rle_string(counts)
    elif _is_number_list(counts) and all(float(c).is_integer() for c in counts):
      runs = np.asarray(counts, np.int64)
    else:
      raise MaskDecodeError("RLE 'counts' must be a string or a list of integers")
    return runs_to_mask(runs, height, width)
  if isinstance(segmentation, (list, tuple)):
    polygons = segmentation
    if _is_number_list(polygons) and polygons:  # a single flat polygon
      polygons = [polygons]
    if not polygons:
      raise MaskDecodeError("empty polygon list")
    mask = np.zeros((height, width), np.uint8)
    for i, polygon in enumerate(polygons):
      if not _is_number_list(polygon):
        raise MaskDecodeError(f"polygon {i} is not a list of finite numbers")
      # Fewer than 3 points is no area; pycocotools would even read 4 numbers as a box.
      if len(polygon) % 2 or len(polygon) < 6:
        raise MaskDecodeError(
            f"polygon {i} has {len(polygon)} coordinates; expected an even number >= 6")
      mask |= runs_to_mask(polygon_to_runs(polygon, height, width), height, width)
    return mask
  raise MaskDecodeError(f"segmentation must be polygons or an RLE dict, got {type(segmentation)}")
