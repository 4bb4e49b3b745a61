"""PyTorch's bicubic resize (`F.interpolate(mode='bicubic', align_corners=False)`), by jax.image.

Used once per conversion, to resize the BEiT-3 vision position table when the cognition image
size differs from the checkpoint's (docs/design.md §11). `jax.image.resize` with
`ResizeMethod.CUBIC_PYTORCH` and no antialiasing is torch's kernel: Keys' cubic convolution
with A = -0.75 over 4 taps, half-pixel centres, separable (plain `cubic` is A = -0.5, Pillow's
and TF's, and would not do). Measured against torch 2.13 (tests/test_pretrained.py): at most
5e-8 on position tables of magnitude 0.05, 7e-7 on the 11x4 test image of magnitude ~1.
"""
from typing import Tuple

import jax
import numpy as np


def resize(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """(..., H, W) -> (..., h, w) like torch bicubic, align_corners=False; float32 numpy out."""
  h, w = (int(v) for v in size)
  if min(images.shape[-2:]) < 1 or h < 1 or w < 1:
    raise ValueError(f"bicubic resize from {tuple(images.shape[-2:])} to {(h, w)} points")
  x = np.asarray(images, np.float32)
  out = jax.image.resize(x, x.shape[:-2] + (h, w), jax.image.ResizeMethod.CUBIC_PYTORCH,
                         antialias=False, precision=jax.lax.Precision.HIGHEST)  # (..., h, w)
  return np.asarray(out, np.float32)
