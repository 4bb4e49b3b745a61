"""Bilinear point sampling with `F.grid_sample(align_corners=False, padding_mode='zeros')`.

Points are given as normalised (x, y) in [0, 1] (the official code passes `2*loc-1` to
grid_sample); a sample's pixel coordinate is `loc * size - 0.5`, and each of its four
neighbours that falls outside the map contributes zero.
"""
import jax
import jax.numpy as jnp


def bilinear_corners(points: jax.Array, height: int, width: int):
  """Flat indices and weights of the 4 neighbours of each point.

  Args:
    points: (..., 2) normalised (x, y).
    height, width: the map size.
  Returns:
    indices: (..., 4) int32 flat indices y*width+x, clipped into range.
    weights: (..., 4) float32 bilinear weights, 0 for neighbours outside the map.
  """
  px = points[..., 0].astype(jnp.float32) * width - 0.5
  py = points[..., 1].astype(jnp.float32) * height - 0.5
  x0 = jnp.floor(px)
  y0 = jnp.floor(py)
  fx = px - x0
  fy = py - y0
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  ws = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
  inside = (xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)
  ws = jnp.where(inside, ws, 0.0)
  xi = jnp.clip(xs, 0, width - 1).astype(jnp.int32)
  yi = jnp.clip(ys, 0, height - 1).astype(jnp.int32)
  return yi * width + xi, ws


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
  """Samples maps at points, like detectron2's `point_sample` on (N, 1, H, W) inputs.

  Args:
    maps: (M, H, W) one map per row.
    points: (M, P, 2) normalised (x, y) for each map, or (P, 2) shared by all maps.
  Returns:
    (M, P) sampled values in float32.
  """
  m, h, w = maps.shape
  if points.ndim == 2:
    points = jnp.broadcast_to(points[None], (m,) + points.shape)
  idx, wts = bilinear_corners(points, h, w)  # (M, P, 4)
  flat = maps.reshape(m, h * w).astype(jnp.float32)
  vals = jnp.take_along_axis(flat, idx.reshape(m, -1), axis=1).reshape(idx.shape)
  return jnp.sum(vals * wts, axis=-1)
