"""Mask2Former `MSDeformAttnPixelDecoder` as DeRIS builds it (docs/design.md §2), NHWC.

res5, res4, res3 -> `input_proj` (1x1 conv + GroupNorm) -> flattened + sine position code +
`level_embed` -> `num_layers` post-norm MSDeformAttn encoder layers -> three maps (1/32, 1/16,
1/8: the `multi_scale_features`). One FPN level on res2: `adapter_1` (1x1 conv + GN + ReLU)
plus the bilinear (align_corners=False) upsampled 1/8 map -> `layer_1` (3x3 conv + GN + ReLU)
-> `mask_features` (1x1 conv) at 1/4.

Attribute names equal the official state-dict names relative to `perception_branch.
pixel_decoder.` (`input_proj[i][0|1]`, `transformer.level_embed`, `transformer.encoder.
layers[e].self_attn.*`, `mask_features`, `adapter_1[0|1]`, `layer_1[0|1]`). Initialisers follow
the official ones, so a decoder trained from scratch starts like the official one. Dropout is
not implemented: DeRIS runs the encoder with `MASK_FORMER.DROPOUT = 0.0`.
"""
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import initializers, layers
from deris_jax.models import scan as scan_lib
from deris_jax.models.deform_attn import MSDeformAttn, SpatialShapes, level_start_index
from deris_jax.models.position import sine_position_2d
from deris_jax.ops.materialize import materialize
from deris_jax.ops.resize import resize_bilinear

TAP = "perception.pixel_decoder"
# Backbone outputs the deformable encoder reads, from low to high resolution.
ENCODER_LEVELS = ("res5", "res4", "res3")


def reference_points(spatial_shapes: SpatialShapes) -> np.ndarray:
  """(1, S, levels, 2) float32 pixel centres of every level's tokens, normalised (x, y).

  Without padding all valid ratios are 1, so every query has the same point on every level.
  """
  points = []
  for h, w in spatial_shapes:
    ys, xs = np.meshgrid((np.arange(h, dtype=np.float32) + np.float32(0.5)) / np.float32(h),
                         (np.arange(w, dtype=np.float32) + np.float32(0.5)) / np.float32(w),
                         indexing="ij")
    points.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))  # (h*w, 2)
  flat = np.concatenate(points, 0)  # (S, 2)
  return np.broadcast_to(flat[None, :, None, :], (1, flat.shape[0], len(spatial_shapes), 2))


class EncoderLayer(nnx.Module):
  """`MSDeformAttnTransformerEncoderLayer`: post-norm deformable self-attention + ReLU FFN."""

  def __init__(self, dim: int, ffn_dim: int, num_levels: int, num_heads: int, num_points: int,
               *, rngs: nnx.Rngs, dtype):
    self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points, rngs=rngs, dtype=dtype)
    self.norm1 = layers.LayerNorm(dim)
    # Official: xavier_uniform on every >1-D transformer parameter, biases keep torch's default.
    self.linear1 = layers.linear(dim, ffn_dim, rngs=rngs, dtype=dtype, kernel_init="xavier")
    self.linear2 = layers.linear(ffn_dim, dim, rngs=rngs, dtype=dtype, kernel_init="xavier")
    self.norm2 = layers.LayerNorm(dim)

  def __call__(self, src: jax.Array, pos: jax.Array, ref_points: jax.Array,
               spatial_shapes: SpatialShapes, *, taps: Optional[dict], tap_prefix: str
               ) -> jax.Array:
    """src (B, S, C), pos (1|B, S, C), ref_points (1|B, S, levels, 2) -> (B, S, C)."""
    attn = self.self_attn(src + pos, ref_points, src, spatial_shapes, taps=taps,
                          tap_prefix=f"{tap_prefix}.msda")
    layers.tap(taps, f"{tap_prefix}.self_attn_out", attn)
    src = materialize(self.norm1(src + attn))
    src = materialize(self.norm2(src + self.linear2(jax.nn.relu(self.linear1(src)))))
    layers.tap(taps, f"{tap_prefix}.out", src)
    return src


class DeformableEncoder(nnx.Module):
  """`MSDeformAttnTransformerEncoder`: a stack of encoder layers."""

  def __init__(self, num_layers: int, **layer_kwargs):
    self.layers = nnx.List([EncoderLayer(**layer_kwargs) for _ in range(num_layers)])


class DeformableTransformer(nnx.Module):
  """`MSDeformAttnTransformerEncoderOnly`: holds `level_embed` and the `encoder`."""

  def __init__(self, *, dim: int, num_levels: int, num_layers: int, rngs: nnx.Rngs, **kwargs):
    self.encoder = DeformableEncoder(num_layers, dim=dim, num_levels=num_levels, rngs=rngs,
                                     **kwargs)
    self.level_embed = nnx.Param(initializers.normal(1.0)(rngs.params(), (num_levels, dim)))


def _conv_norm(in_dim: int, out_dim: int, kernel_size: int, num_groups: int, kernel_init: str, *,
               rngs: nnx.Rngs, dtype) -> nnx.List:
  """A torch `nn.Sequential(Conv2d, GroupNorm)` (names `0`, `1`); bias initialised to 0."""
  return nnx.List([
      layers.conv(in_dim, out_dim, kernel_size, padding=kernel_size // 2, rngs=rngs, dtype=dtype,
                  kernel_init=kernel_init, bias_init="zeros"),
      layers.GroupNorm(num_groups, out_dim)])


def _apply(conv_norm: nnx.List, x: jax.Array) -> jax.Array:
  conv, norm = conv_norm
  return norm(conv(x))


class MSDeformAttnPixelDecoder(nnx.Module):
  """Backbone maps [res2..res5] -> (mask_features at 1/4, [1/32, 1/16, 1/8] maps), NHWC."""

  def __init__(self, *, in_channels: Sequence[int], conv_dim: int, mask_dim: int, num_heads: int,
               num_points: int, num_layers: int, ffn_dim: int, num_groups: int = 32,
               scan: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    """`scan`: the encoder layers (identical shapes) as one `lax.scan` (config
    `model.scan_layers`; same numbers, the program holds one layer)."""
    in_channels = tuple(int(c) for c in in_channels)
    if len(in_channels) != 4:
      raise ValueError(f"MSDeformAttnPixelDecoder: in_channels must list the channels of "
                       f"res2, res3, res4, res5 (4 ints), got {in_channels}")
    if conv_dim % 2:
      raise ValueError(f"MSDeformAttnPixelDecoder: conv_dim must be even (sine code), got "
                       f"{conv_dim}")
    dtype = jnp.dtype(dtype)  # also accepts the config's 'float32' / 'bfloat16'
    self.conv_dim, self.dtype = conv_dim, dtype
    self.scan = scan
    res_channels = dict(zip(("res2", "res3", "res4", "res5"), in_channels))
    self.input_proj = nnx.List([
        _conv_norm(res_channels[name], conv_dim, 1, num_groups, "xavier", rngs=rngs, dtype=dtype)
        for name in ENCODER_LEVELS])
    self.transformer = DeformableTransformer(
        dim=conv_dim, num_levels=len(ENCODER_LEVELS), num_layers=num_layers, ffn_dim=ffn_dim,
        num_heads=num_heads, num_points=num_points, rngs=rngs, dtype=dtype)
    self.mask_features = layers.conv(conv_dim, mask_dim, 1, rngs=rngs, dtype=dtype,
                                     kernel_init="c2_xavier", bias_init="zeros")
    self.adapter_1 = _conv_norm(res_channels["res2"], conv_dim, 1, num_groups, "c2_xavier",
                                rngs=rngs, dtype=dtype)
    self.layer_1 = _conv_norm(conv_dim, conv_dim, 3, num_groups, "c2_xavier", rngs=rngs,
                              dtype=dtype)

  def scan_groups(self) -> List[List[nnx.Module]]:
    """The encoder layers that run as one scan, as its one group; [] for a loop."""
    stack = list(self.transformer.encoder.layers)
    return [stack] if self.scan and len(stack) > 1 else []

  def __call__(self, features: Sequence[jax.Array], *, taps: Optional[dict] = None
               ) -> Tuple[jax.Array, List[jax.Array]]:
    """features: [res2, res3, res4, res5] NHWC backbone maps.

    Returns:
      mask_features: (B, H2, W2, mask_dim) at res2's resolution.
      multi_scale_features: encoder output maps at res5, res4, res3 resolution (B, h, w, C).
    """
    if len(features) != 4:
      raise ValueError(f"MSDeformAttnPixelDecoder: expected [res2, res3, res4, res5], got "
                       f"{len(features)} maps")
    by_name = dict(zip(("res2", "res3", "res4", "res5"), features))
    batch, c = by_name["res2"].shape[0], self.conv_dim
    srcs, pos = [], []
    level_embed = self.transformer.level_embed[...]  # (levels, C)
    for level, (name, proj) in enumerate(zip(ENCODER_LEVELS, self.input_proj)):
      x = _apply(proj, by_name[name].astype(self.dtype))  # (B, h, w, C)
      layers.tap(taps, f"{TAP}.input_proj.{name}", x)
      h, w = x.shape[1:3]
      srcs.append(x.reshape(batch, h * w, c))
      code = jnp.asarray(sine_position_2d(h, w, c // 2).reshape(1, h * w, c))
      pos.append(code.astype(self.dtype).astype(jnp.float32) + level_embed[level])  # (1, h*w, C)
    spatial_shapes = tuple((f.shape[1], f.shape[2]) for f in
                           (by_name[name] for name in ENCODER_LEVELS))
    src = jnp.concatenate(srcs, axis=1)  # (B, S, C)
    pos_flat = jnp.concatenate(pos, axis=1)  # (1, S, C) float32
    ref_points = jnp.asarray(reference_points(spatial_shapes))  # (1, S, levels, 2)
    layers.tap(taps, f"{TAP}.encoder.src_flatten", src)
    layers.tap(taps, f"{TAP}.encoder.pos_flatten", jnp.broadcast_to(pos_flat, src.shape))
    layers.tap(taps, f"{TAP}.encoder.reference_points",
               jnp.broadcast_to(ref_points, (batch,) + ref_points.shape[1:]))
    pos_flat = pos_flat.astype(self.dtype)
    encoder_layers = list(self.transformer.encoder.layers)
    if self.scan_groups():
      def body(src, modules, _):
        layer_taps = None if taps is None else {}  # per-layer taps leave the scan stacked
        src = modules[0](src, pos_flat, ref_points, spatial_shapes, taps=layer_taps,
                         tap_prefix="")
        return src, layer_taps

      src, stacked = scan_lib.scan_modules([encoder_layers], body, src)
      scan_lib.unstack_taps(taps, stacked, lambda j, key: f"{TAP}.encoder.layer{j}{key}")
    else:
      for j, layer in enumerate(encoder_layers):
        src = layer(src, pos_flat, ref_points, spatial_shapes, taps=taps,
                    tap_prefix=f"{TAP}.encoder.layer{j}")
    maps = []
    for (h, w), start in zip(spatial_shapes, level_start_index(spatial_shapes)):
      maps.append(src[:, start:start + h * w].reshape(batch, h, w, c))  # (B, h, w, C)
    for i, m in enumerate(maps):
      layers.tap(taps, f"{TAP}.multi_scale_features.{i}", m)

    res2 = by_name["res2"].astype(self.dtype)
    lateral = jax.nn.relu(_apply(self.adapter_1, res2))  # (B, H2, W2, C)
    layers.tap(taps, f"{TAP}.fpn.lateral_res2", lateral)
    up = resize_bilinear(maps[-1].astype(jnp.float32), lateral.shape[1:3], align_corners=False,
                         axes=(1, 2)).astype(lateral.dtype)  # (B, H2, W2, C)
    fpn = jax.nn.relu(_apply(self.layer_1, lateral + up))  # (B, H2, W2, C)
    layers.tap(taps, f"{TAP}.fpn.output_res2", fpn)
    mask_features = self.mask_features(fpn)  # (B, H2, W2, mask_dim)
    layers.tap(taps, f"{TAP}.mask_features", mask_features)
    return mask_features, maps
