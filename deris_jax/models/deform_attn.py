"""Multi-scale deformable attention (Deformable DETR `MSDeformAttn`) in pure JAX.

`ms_deform_attn_core` is the sampling kernel: a drop-in for the official CUDA op and its
`ms_deform_attn_core_pytorch` fallback (`F.grid_sample`, bilinear, zero padding,
align_corners=False on the grid `2*loc-1`). It is a plain function of arrays and static level
shapes, so a Pallas kernel can replace it later without touching the module.

Per level it does one gather of the 4 bilinear neighbours of every sampling point from the
level's flattened values, then a weighted sum in float32; nothing larger than
(B, Lq, heads, points*4, D) per level is materialised.

In a forward pass without gradient (eval, predict, the demo), on the CPU, the level's values
and the corner rows are written to memory first (`ops.materialize.write_once`; otherwise
XLA:CPU fused the bilinear corners and every level into one loop that recomputed them for each
gathered value), then the gathered rows, then their weighted sum as a batched (1, K) x (K, D)
product, over chunks of queries when the rows would pass `GATHER_CHUNK_BYTES` (BENCHMARKS.md
"Deformable attention's operands written once" and "... summed by a product"). A train step's
program is as it was: its gradient is the checkpointed multiply-and-reduce's, whose backward
pass reads those operands too, so XLA writes them anyway; writing the gathered rows there
would cost more than the product saves.
"""
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import layers
from deris_jax.ops import materialize, sample

SpatialShapes = Tuple[Tuple[int, int], ...]


def level_start_index(spatial_shapes: Sequence[Tuple[int, int]]) -> Tuple[int, ...]:
  """Offsets of each level in the flattened token axis (official `level_start_index`)."""
  sizes = [h * w for h, w in spatial_shapes]
  return tuple(int(x) for x in np.concatenate([[0], np.cumsum(sizes)[:-1]]))


@jax.checkpoint
def _gather_and_mix_checkpointed(level_value: jax.Array, rows: jax.Array,
                                 mix: jax.Array) -> jax.Array:
  """sum_k mix[..., k] * level_value[rows[..., k]]: (N, D), (B, Lq, H, K), (B, Lq, H, K) ->
  (B, Lq, H, D).

  A multiply-and-reduce (not a dot), so it stays exact float32 (no TF32) and XLA may fuse the
  gather into the reduction. Rematerialised in the backward pass: the (B, Lq, H, K, D) gathered
  values are never kept as a residual (at DeRIS size that is 0.75 GiB per level and layer at
  batch 16).
  """
  gathered = jnp.take(level_value, rows, axis=0, mode="clip")  # (B, Lq, H, K, D)
  return jnp.sum(mix[..., None] * gathered, axis=-2)


# The gathered rows of one chunk of queries, at most this many bytes (`_gather_then_dot`).
GATHER_CHUNK_BYTES = 64 << 20


def _query_chunks(num_queries: int, gathered_bytes: int) -> int:
  """The fewest chunks, a divisor of num_queries, whose gathered rows fit GATHER_CHUNK_BYTES."""
  for chunks in range(1, num_queries + 1):
    if num_queries % chunks == 0 and gathered_bytes <= chunks * GATHER_CHUNK_BYTES:
      return chunks
  return num_queries


def _gather_then_dot(level_value: jax.Array, rows: jax.Array, mix: jax.Array) -> jax.Array:
  """`_gather_and_mix_checkpointed` as XLA:CPU runs it fastest without a gradient: the
  gathered rows written out, then a batched (1, K) x (K, D) product in float32; over chunks of
  queries when the rows of all would pass GATHER_CHUNK_BYTES (eval batches)."""
  batch, num_queries, heads, k = rows.shape
  head_dim = level_value.shape[-1]
  level_value = materialize.write_once(level_value)  # (N, D)
  rows = materialize.write_once(rows)  # (B, Lq, H, K), computed once, not per gathered value

  def gather_then_dot(chunk_rows, chunk_mix):  # (B, c, H, K) each -> (B, c, H, D)
    gathered = jnp.take(level_value, chunk_rows, axis=0, mode="clip")  # (B, c, H, K, D)
    return jax.lax.dot_general(chunk_mix, gathered, (((3,), (3,)), ((0, 1, 2), (0, 1, 2))),
                               precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)

  row_bytes = head_dim * jnp.dtype(level_value.dtype).itemsize
  chunks = _query_chunks(num_queries, batch * num_queries * heads * k * row_bytes)
  if chunks == 1:
    return gather_then_dot(rows, mix)
  split = lambda x: jnp.moveaxis(  # noqa: E731  (B, Lq, ...) -> (chunks, B, Lq/chunks, ...)
      x.reshape((batch, chunks, num_queries // chunks) + x.shape[2:]), 1, 0)
  out = jax.lax.map(lambda operands: gather_then_dot(*operands), (split(rows), split(mix)))
  return jnp.moveaxis(out, 0, 1).reshape(batch, num_queries, heads, head_dim)


@jax.custom_vjp
def _gather_and_mix(level_value: jax.Array, rows: jax.Array, mix: jax.Array) -> jax.Array:
  """`_gather_and_mix_checkpointed`; without a gradient, on the CPU, `_gather_then_dot`
  (module docstring). A gradient is that of the checkpointed function, unchanged."""
  return jax.lax.platform_dependent(level_value, rows, mix, cpu=_gather_then_dot,
                                    default=_gather_and_mix_checkpointed)


def _gather_and_mix_forward(level_value, rows, mix):
  return jax.vjp(_gather_and_mix_checkpointed, level_value, rows, mix)  # (out, vjp function)


def _gather_and_mix_backward(vjp_fn, cotangent):
  return vjp_fn(cotangent)


_gather_and_mix.defvjp(_gather_and_mix_forward, _gather_and_mix_backward)


def ms_deform_attn_core(value: jax.Array, spatial_shapes: SpatialShapes,
                        sampling_locations: jax.Array, attention_weights: jax.Array) -> jax.Array:
  """Bilinear multi-scale sampling and weighted sum.

  Args:
    value: (B, S, heads, D) values of all levels, flattened row-major and concatenated in the
      order of `spatial_shapes` (S = sum h*w). Sampled in float32 whatever its dtype.
    spatial_shapes: static ((h, w), ...) per level.
    sampling_locations: (B, Lq, heads, levels, points, 2) normalised (x, y); (0, 0) is the
      top-left corner of the map and (1, 1) the bottom-right one; points outside read zeros.
    attention_weights: (B, Lq, heads, levels, points), normally softmax-ed over levels*points.
  Returns:
    (B, Lq, heads * D) in value.dtype, channel index head * D + d.
  """
  batch, total, heads, head_dim = value.shape
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
  if sum(h * w for h, w in spatial_shapes) != total:
    raise ValueError(f"ms_deform_attn_core: value has {total} tokens but spatial_shapes "
                     f"{spatial_shapes} sum to {sum(h * w for h, w in spatial_shapes)}")
  if num_levels != len(spatial_shapes) or attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(f"ms_deform_attn_core: sampling_locations {sampling_locations.shape}, "
                     f"attention_weights {attention_weights.shape} and {len(spatial_shapes)} "
                     "levels do not agree")
  value32 = value.astype(jnp.float32)
  locations = sampling_locations.astype(jnp.float32)
  weights = attention_weights.astype(jnp.float32)
  batch_idx = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
  head_idx = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None, None]  # (1, 1, H, 1, 1)
  out = jnp.zeros((batch, num_queries, heads, head_dim), jnp.float32)
  for level, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index(spatial_shapes))):
    level_value = value32[:, start:start + h * w].reshape(batch * h * w * heads, head_dim)
    # (B, Lq, H, P, 4) flat indices into the level and bilinear weights (0 outside the map).
    corner_idx, corner_w = sample.bilinear_corners(locations[:, :, :, level], h, w)
    rows = ((batch_idx * (h * w) + corner_idx) * heads + head_idx).reshape(
        batch, num_queries, heads, num_points * 4)  # (B, Lq, H, P*4)
    mix = (corner_w * weights[:, :, :, level, :, None]).reshape(
        batch, num_queries, heads, num_points * 4)  # (B, Lq, H, P*4)
    out = out + _gather_and_mix(level_value, rows, mix)  # (B, Lq, H, D)
  return out.reshape(batch, num_queries, heads * head_dim).astype(value.dtype)


def _grid_init_bias(num_heads: int, num_levels: int, num_points: int) -> np.ndarray:
  """`MSDeformAttn._reset_parameters` sampling-offset bias: head h points along angle 2*pi*h/H,
  scaled to the unit square's border, point p at distance p+1, same for every level."""
  thetas = np.arange(num_heads, dtype=np.float32) * np.float32(2.0 * math.pi / num_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # (H, 2)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))  # (H, L, P, 2)
  grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
  return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
  """Deformable DETR `MSDeformAttn` (names = official keys: sampling_offsets,
  attention_weights, value_proj, output_proj), 2-D reference points, no padding mask."""

  def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    if dim % num_heads:
      raise ValueError(f"MSDeformAttn: dim {dim} not divisible by {num_heads} heads")
    self.dim, self.num_levels = dim, num_levels
    self.num_heads, self.num_points = num_heads, num_points
    self.dtype = dtype
    slots = num_heads * num_levels * num_points
    self.sampling_offsets = layers.linear(dim, slots * 2, rngs=rngs, dtype=dtype,
                                          kernel_init="zeros", bias_init="zeros")
    self.sampling_offsets.bias[...] = jnp.asarray(_grid_init_bias(num_heads, num_levels,
                                                                  num_points))
    self.attention_weights = layers.linear(dim, slots, rngs=rngs, dtype=dtype,
                                           kernel_init="zeros", bias_init="zeros")
    self.value_proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype, kernel_init="xavier",
                                    bias_init="zeros")
    self.output_proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype, kernel_init="xavier",
                                     bias_init="zeros")

  def __call__(self, query: jax.Array, reference_points: jax.Array, input_flatten: jax.Array,
               spatial_shapes: SpatialShapes, *, taps: Optional[dict] = None,
               tap_prefix: str = "msda") -> jax.Array:
    """Deformable attention of `query` over the multi-scale `input_flatten`.

    Args:
      query: (B, Lq, C).
      reference_points: (B|1, Lq, levels, 2) normalised (x, y).
      input_flatten: (B, S, C) levels flattened in `spatial_shapes` order.
      spatial_shapes: static ((h, w), ...).
      taps: optional dict for intermediates, recorded as `{tap_prefix}.value|
        sampling_locations|attention_weights|core_out`.
    Returns:
      (B, Lq, C) in the compute dtype.
    """
    b, lq, _ = query.shape
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    if len(spatial_shapes) != levels:
      raise ValueError(f"MSDeformAttn: built for {levels} levels, got spatial_shapes "
                       f"{spatial_shapes}")
    value = self.value_proj(input_flatten)
    value = value.reshape(value.shape[:2] + (heads, self.dim // heads))  # (B, S, H, D)
    offsets = self.sampling_offsets(query).astype(jnp.float32).reshape(
        b, lq, heads, levels, points, 2)  # (B, Lq, H, L, P, 2)
    logits = self.attention_weights(query).astype(jnp.float32).reshape(
        b, lq, heads, levels * points)  # (B, Lq, H, L*P)
    weights = jax.nn.softmax(logits, axis=-1).reshape(b, lq, heads, levels, points)
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)  # (L, 2) as (x, y)
    locations = (reference_points.astype(jnp.float32)[:, :, None, :, None, :]
                 + offsets / normalizer[None, None, None, :, None, :])  # (B, Lq, H, L, P, 2)
    core = ms_deform_attn_core(value, spatial_shapes, locations, weights)  # (B, Lq, C)
    layers.tap(taps, f"{tap_prefix}.value", value)
    layers.tap(taps, f"{tap_prefix}.sampling_locations", locations)
    layers.tap(taps, f"{tap_prefix}.attention_weights", weights)
    layers.tap(taps, f"{tap_prefix}.core_out", core)
    return self.output_proj(core.astype(self.dtype))
