"""Bilinear resizing and average pooling with exact PyTorch `F.interpolate` semantics.

align_corners=False (the pixel decoder, the loopback maps) is `jax.image.resize` with
`antialias=False`: PyTorch's bilinear mode does not antialias, and without it jax.image's
triangle kernel is PyTorch's (tests/test_ops.py: within 3e-5 of torch on values ~20, as close
as ours was). align_corners=True (the x4 upsampling of the mask logits) has no jax.image
method: `scale_and_translate` can express the mapping but computes the source coordinate
differently and lands 1.5e-4 from torch where the tests allow 4e-5, so it is a product with a
small (out, in) interpolation matrix built in numpy at trace time, with PyTorch's float32
source coordinate: exact, static in shape, and a matmul on accelerators. Pooling is a mean over
windows split off by a reshape (`avg_pool`).
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's 1-D linear interpolation."""
  if in_size <= 0 or out_size <= 0:
    raise ValueError(f"sizes must be positive, got in={in_size} out={out_size}")
  # The source coordinate is computed in float32, as PyTorch's CPU/GPU kernels do for float
  # inputs; float64 would differ from them by up to ~1e-5 on large resizes.
  f32 = np.float32
  dst = np.arange(out_size, dtype=f32)
  if align_corners:
    scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0.0)
    src = dst * scale
  else:
    src = (dst + f32(0.5)) * (f32(in_size) / f32(out_size)) - f32(0.5)
    src = np.maximum(src, f32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(f32)).astype(np.float64)
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, size: Sequence[int], *, align_corners: bool,
                    axes: Sequence[int] = (-2, -1)) -> jax.Array:
  """Resizes the two spatial `axes` of `x` to `size` like `F.interpolate(mode='bilinear')`.

  Args:
    x: any array; `axes` name its height and width axes (default: the last two, as in
      (B, N, H, W) mask logits). Use axes=(1, 2) for NHWC feature maps.
    size: (out_h, out_w).
    align_corners: PyTorch's flag.
  Returns:
    The resized array, in x.dtype (computed in float32).
  """
  ax_h, ax_w = (a % x.ndim for a in axes)
  out_h, out_w = size
  in_h, in_w = x.shape[ax_h], x.shape[ax_w]
  y = x.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  if (in_h, in_w) == (out_h, out_w):
    return y.astype(x.dtype)
  if not align_corners:
    shape = list(y.shape)
    shape[ax_h], shape[ax_w] = out_h, out_w
    y = jax.image.resize(y, tuple(shape), "linear", antialias=False, precision=hi)
  else:
    wh = jnp.asarray(interpolation_matrix(in_h, out_h, align_corners))  # (out_h, in_h)
    ww = jnp.asarray(interpolation_matrix(in_w, out_w, align_corners))  # (out_w, in_w)
    y = jnp.moveaxis(jnp.tensordot(y, wh, axes=((ax_h,), (1,)), precision=hi), -1, ax_h)
    y = jnp.moveaxis(jnp.tensordot(y, ww, axes=((ax_w,), (1,)), precision=hi), -1, ax_w)
  return y.astype(x.dtype)


def avg_pool(x: jax.Array, window: int, axes: Sequence[int] = (1, 2)) -> jax.Array:
  """Non-overlapping average pooling (`nn.AvgPool2d(k, k)`) over two axes of `x`.

  Like PyTorch with no padding, trailing rows/columns that do not fill a window are dropped.
  Each axis is split into (windows, window) and the mean taken over the two window axes: the
  same sums as a `reduce_window`, but its gradient is a broadcast that XLA fuses into its
  consumer, where `reduce_window`'s is a base-dilated `reduce_window` of its own (on the CPU
  10.9 ms of thread time per default-job train step for the loopback's four poolings,
  BENCHMARKS.md "The train step's thread time by source").
  """
  if window < 1:
    raise ValueError(f"avg_pool: window must be >= 1, got {window}")
  ax_h, ax_w = sorted(a % x.ndim for a in axes)
  if ax_h == ax_w:
    raise ValueError(f"avg_pool: axes {tuple(axes)} name the same axis of a {x.ndim}-D array")
  h, w = x.shape[ax_h] // window, x.shape[ax_w] // window
  y = x.astype(jnp.float32)
  y = jax.lax.slice_in_dim(y, 0, h * window, axis=ax_h)
  y = jax.lax.slice_in_dim(y, 0, w * window, axis=ax_w)
  split = (y.shape[:ax_h] + (h, window) + y.shape[ax_h + 1:ax_w] + (w, window)
           + y.shape[ax_w + 1:])
  y = jnp.mean(y.reshape(split), axis=(ax_h + 1, ax_w + 2))  # x's shape, (h, w) pooled
  return y.astype(x.dtype)
