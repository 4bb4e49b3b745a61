"""PyTorch's bicubic resize (`F.interpolate(mode='bicubic', align_corners=False)`) in numpy.

Used once per conversion, to resize the BEiT-3 vision position table when the cognition image
size differs from the checkpoint's (docs/design.md §11). It follows torch's CPU kernel:
  * source coordinate `(i + 0.5) * in / out - 0.5`, in float32 and NOT clamped at 0 (torch
    clamps only for linear modes), then `floor` capped at `in - 1`, fraction clamped to [0, 1];
  * Keys' cubic convolution with A = -0.75 over the 4 taps `floor - 1 .. floor + 2`, each
    index clamped into the input (border replication);
  * separable: rows, then columns.
The weights are computed in float32 like torch's and applied in float64: torch sums the 16
taps in float32, so the two differ by float32 rounding only (measured against torch 2.13:
at most 5e-8 on position tables of magnitude 0.05; tests/test_pretrained.py checks it).
"""
from typing import Tuple

import numpy as np

CUBIC_A = -0.75  # torch's `get_cubic_upsample_coefficients`


def _cubic_coefficients(t: np.ndarray) -> np.ndarray:
  """(n,) fractions -> (n, 4) weights of taps floor-1 .. floor+2 (float32, as torch)."""
  a = np.float32(CUBIC_A)
  one = np.float32(1.0)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  t = t.astype(np.float32)
  opposite = one - t
  return np.stack([far(t + one), near(t), near(opposite), far(opposite + one)], axis=-1)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix M with `out = M @ in` along one axis."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic resize from {in_size} to {out_size} points")
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  real = scale * (dst + np.float32(0.5)) - np.float32(0.5)  # (out,) float32, may be < 0
  index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)  # (out,)
  frac = np.clip(real - index.astype(np.float32), 0.0, 1.0)  # (out,)
  weights = _cubic_coefficients(frac).astype(np.float64)  # (out, 4)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for tap in range(4):
    np.add.at(matrix, (rows, np.clip(index - 1 + tap, 0, in_size - 1)), weights[:, tap])
  return matrix


def resize(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """(..., H, W) -> (..., h, w) like torch bicubic, align_corners=False; float32 out."""
  h, w = size
  rows = resize_matrix(images.shape[-2], h)  # (h, H)
  cols = resize_matrix(images.shape[-1], w)  # (w, W)
  x = np.asarray(images, np.float64)
  out = np.einsum("hH,...HW,wW->...hw", rows, x, cols)  # (..., h, w)
  return out.astype(np.float32)
