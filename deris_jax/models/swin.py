"""Swin Transformer backbone (the official `swin_trans.SwinTransformer` of DeRIS), NHWC.

Reproduces the official numerics exactly (docs/design.md §2): every block pads its map
right/bottom with zeros to a multiple of the window *after* `norm1` (padded tokens still get
the qkv bias and act as keys), shifted blocks roll by -window//2 and add the -100 mask of the
official `BasicLayer`, PatchMerging pads odd maps, and each stage output goes through its own
LayerNorm `norm{i}`. Stochastic depth (linear schedule over all blocks) is active whenever
`train=True`, also when the backbone is frozen, as in the official training.

Attribute names equal the official state-dict names (`patch_embed.proj`, `layers[i].blocks[j]
.attn.qkv`, `norm0`, ...) so the converter loads the checkpoint without rename rules. The
`relative_position_index` buffer is not stored: it is `relative_position_index(window)`.
"""
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import layers
from deris_jax.models import scan as scan_lib
from deris_jax.ops import sum_rows
from deris_jax.ops.materialize import materialize

SHIFT_MASK_VALUE = -100.0  # official BasicLayer attention mask between shifted regions


def relative_position_index(window_size: int) -> np.ndarray:
  """(w*w, w*w) int64 index into the (2w-1)^2 bias table (the official buffer)."""
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size),
                                indexing="ij")).reshape(2, -1)  # (2, w*w) as (row, col)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window_size - 1)
  return (rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]).astype(np.int64)  # (w*w, w*w)


def padded_size(size: int, window_size: int) -> int:
  return -(-size // window_size) * window_size


def shift_attention_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """(nH, nW, w*w, w*w) float32 additive mask of shifted windows (0 or -100), as the official
  `BasicLayer.forward` builds it on the padded (Hp, Wp) map."""
  hp, wp = padded_size(height, window_size), padded_size(width, window_size)
  img = np.zeros((hp, wp), np.float32)
  cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
  region = 0
  for hs in cuts:
    for ws in cuts:
      img[hs, ws] = region
      region += 1
  nh, nw = hp // window_size, wp // window_size
  windows = img.reshape(nh, window_size, nw, window_size).transpose(0, 2, 1, 3).reshape(
      nh, nw, window_size * window_size)  # (nH, nW, N)
  diff = windows[:, :, None, :] - windows[:, :, :, None]  # (nH, nW, N, N) [query, key]
  return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def drop_path_rates(rate: float, depths: Sequence[int]) -> List[float]:
  """Linear stochastic-depth schedule over all blocks (torch.linspace in float32)."""
  return [float(x) for x in np.linspace(0.0, rate, sum(depths), dtype=np.float32)]


class WindowAttention(nnx.Module):
  """Window multi-head self-attention with a learned relative position bias."""

  def __init__(self, dim: int, window_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype):
    if dim % num_heads:
      raise ValueError(f"WindowAttention: dim {dim} not divisible by {num_heads} heads")
    self.dim, self.window_size, self.num_heads, self.dtype = dim, window_size, num_heads, dtype
    table = (2 * window_size - 1) ** 2
    self.relative_position_bias_table = nnx.Param(
        layers.KERNEL_INITS["trunc02"](rngs.params(), (table, num_heads), jnp.float32))
    self.qkv = layers.linear(dim, 3 * dim, rngs=rngs, dtype=dtype, kernel_init="trunc02",
                             bias_init="zeros")
    self.proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype, kernel_init="trunc02",
                              bias_init="zeros")

  def __call__(self, windows: jax.Array, mask: Optional[np.ndarray]) -> jax.Array:
    """windows: (B, nH, nW, N, C); mask: (nH, nW, N, N) additive or None."""
    heads, n = self.num_heads, self.window_size ** 2
    head_dim = self.dim // heads
    qkv = self.qkv(windows)
    qkv = qkv.reshape(qkv.shape[:-1] + (3, heads, head_dim))  # (B, nH, nW, N, 3, h, d)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (B, nH, nW, N, h, d)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum("bijqhd,bijkhd->bijhqk", q, k,
                        preferred_element_type=jnp.float32)  # (B, nH, nW, h, N, N)
    index = relative_position_index(self.window_size).reshape(-1)
    bias = self.relative_position_bias_table[...][index].reshape(n, n, heads)
    logits = sum_rows.add_bias(logits, jnp.transpose(bias, (2, 0, 1)))  # (h, N, N) broadcast
    if mask is not None:
      logits = logits + jnp.asarray(mask)[None, :, :, None]  # (1, nH, nW, 1, N, N)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bijhqk,bijkhd->bijqhd", weights, v)  # (B, nH, nW, N, h, d)
    return self.proj(out.reshape(out.shape[:-2] + (self.dim,)))  # (B, nH, nW, N, C)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype):
    self.fc1 = layers.linear(dim, hidden, rngs=rngs, dtype=dtype, kernel_init="trunc02",
                             bias_init="zeros")
    self.fc2 = layers.linear(hidden, dim, rngs=rngs, dtype=dtype, kernel_init="trunc02",
                             bias_init="zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.fc1(x)))


class SwinTransformerBlock(nnx.Module):
  """(Shifted-)window attention block, pre-norm, with stochastic depth on both branches."""

  def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int,
               mlp_ratio: float, drop_path_rate: float, *, rngs: nnx.Rngs, dtype):
    if not 0 <= shift_size < window_size:
      raise ValueError(f"SwinTransformerBlock: shift {shift_size} not in [0, {window_size})")
    self.window_size, self.shift_size, self.drop_path_rate = window_size, shift_size, drop_path_rate
    self.norm1 = layers.LayerNorm(dim)
    self.attn = WindowAttention(dim, window_size, num_heads, rngs=rngs, dtype=dtype)
    self.norm2 = layers.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, height: int, width: int, *, train: bool,
               rngs: Optional[nnx.Rngs], drop_path_rate=None) -> jax.Array:
    """x: (B, H*W, C) tokens of an (height, width) map. `drop_path_rate` overrides the
    block's own (a traced per-block rate when the stage is scanned)."""
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    b, _, c = x.shape
    ws, shift = self.window_size, self.shift_size
    hp, wp = padded_size(height, ws), padded_size(width, ws)
    y = self.norm1(x).reshape(b, height, width, c)
    y = jnp.pad(y, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))  # (B, Hp, Wp, C)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    nh, nw = hp // ws, wp // ws
    windows = y.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, nh, nw, ws * ws, c)  # (B, nH, nW, N, C)
    mask = shift_attention_mask(height, width, ws, shift) if shift else None
    windows = self.attn(windows, mask)
    y = windows.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :height, :width, :].reshape(b, height * width, c)  # (B, H*W, C)
    x = materialize(x + layers.drop_path(y, rate, train=train, rngs=rngs))
    return materialize(x + layers.drop_path(self.mlp(self.norm2(x)), rate, train=train,
                                            rngs=rngs))


class PatchMerging(nnx.Module):
  """2x2 neighbour concat (order x00, x10, x01, x11) -> LayerNorm(4C) -> Linear(4C, 2C)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype):
    self.norm = layers.LayerNorm(4 * dim)
    self.reduction = layers.linear(4 * dim, 2 * dim, rngs=rngs, dtype=dtype, use_bias=False,
                                   kernel_init="trunc02")

  def __call__(self, x: jax.Array, height: int, width: int) -> jax.Array:
    """x: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""
    b, _, c = x.shape
    x = x.reshape(b, height, width, c)
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)  # (B, H/2, W/2, 4C)
    return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class BasicLayer(nnx.Module):
  """One stage: `depth` blocks alternating plain and shifted windows, then PatchMerging.

  `scan=True` runs the blocks as one `lax.scan` over (regular, shifted) pairs (deris_jax/
  models/scan.py) when the stage has at least two pairs (Swin-S/B stage 3: 18 blocks = 9
  pairs); a stage of one pair runs as a loop, which compiles the same two blocks.
  """

  def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
               drop_path_rates: Sequence[float], downsample: bool, *, rngs: nnx.Rngs, dtype,
               scan: bool = False):
    self.blocks = nnx.List([
        SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                             mlp_ratio, drop_path_rates[i], rngs=rngs, dtype=dtype)
        for i in range(depth)])
    self.downsample = PatchMerging(dim, rngs=rngs, dtype=dtype) if downsample else None
    self.scan = scan

  def scan_groups(self) -> List[List[nnx.Module]]:
    """The blocks that run as one scan, as its groups (regular, shifted); [] for a loop."""
    blocks = list(self.blocks)
    pairs = len(blocks) // 2
    if not (self.scan and pairs >= 2):
      return []
    return [blocks[0:2 * pairs:2], blocks[1:2 * pairs:2]]

  def __call__(self, x: jax.Array, height: int, width: int, *, train: bool,
               rngs: Optional[nnx.Rngs]) -> jax.Array:
    """Runs the blocks on (B, H*W, C) tokens; the caller norms/taps the result and then
    applies `downsample` (the official BasicLayer returns both)."""
    blocks = list(self.blocks)
    groups = self.scan_groups()
    if groups:
      x = self._scan_pairs(*groups, x, height, width, train=train, rngs=rngs)
      blocks = blocks[2 * len(groups[0]):]  # an odd last block (no released depth has one)
    for block in blocks:
      x = block(x, height, width, train=train, rngs=rngs)
    return x

  def _scan_pairs(self, regular, shifted, x, height, width, *, train, rngs):
    """The blocks as a scan over (regular, shifted) pairs: the even blocks' parameters stacked
    as one group and the odd blocks' as the other; the per-block drop-path rates are scanned
    (pairs, 2) arrays and every block draws its own key (other draws than the loop's, same
    law). Same numbers as the loop in eval."""
    blocks = regular + shifted
    if any(b.shift_size != regular[0].shift_size for b in regular) or any(
        b.shift_size != shifted[0].shift_size for b in shifted):
      raise ValueError("Swin scan: blocks of a stage must alternate two window shifts")
    rates = jnp.asarray([[a.drop_path_rate, b.drop_path_rate] for a, b in zip(regular, shifted)],
                        jnp.float32)  # (pairs, 2)
    use_rng = train and any(b.drop_path_rate > 0 for b in blocks)
    keys = scan_lib.step_keys(rngs, (len(regular), 2), use_rng)

    def body(x, modules, per_pair):
      rate, key = per_pair
      for j, block in enumerate(modules):
        x = block(x, height, width, train=use_rng, drop_path_rate=rate[j],
                  rngs=nnx.Rngs(dropout=key[j]) if use_rng else None)
      return x, None

    x, _ = scan_lib.scan_modules([regular, shifted], body, x, (rates, keys))
    return x


class PatchEmbed(nnx.Module):
  """Conv(patch, stride patch) on the right/bottom zero-padded image, then LayerNorm."""

  def __init__(self, patch_size: int, embed_dim: int, *, rngs: nnx.Rngs, dtype):
    self.patch_size = patch_size
    self.proj = layers.conv(3, embed_dim, patch_size, stride=patch_size, rngs=rngs, dtype=dtype)
    self.norm = layers.LayerNorm(embed_dim)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) -> (B, ceil(H/p), ceil(W/p), C)."""
    p = self.patch_size
    _, h, w, _ = images.shape
    images = jnp.pad(images, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    return self.norm(self.proj(images))


class SwinTransformer(nnx.Module):
  """The DeRIS perception backbone; returns [res2, res3, res4, res5] NHWC after norm0..3."""

  def __init__(self, *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
               window_size: int, patch_size: int = 4, mlp_ratio: float = 4.0,
               drop_path_rate: float = 0.3, scan: bool = False, dtype=jnp.float32,
               rngs: nnx.Rngs):
    """`scan`: each stage of at least two (regular, shifted) pairs runs as one `lax.scan`
    (config `model.scan_layers`; same numbers, the program holds one pair per stage)."""
    depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
    if len(depths) != len(num_heads):
      raise ValueError(f"SwinTransformer: depths {depths} and num_heads {num_heads} must have "
                       "one entry per stage")
    dtype = jnp.dtype(dtype)  # also accepts the config's 'float32' / 'bfloat16'
    self.dtype = dtype
    self.num_features = tuple(embed_dim * 2 ** i for i in range(len(depths)))
    self.patch_embed = PatchEmbed(patch_size, embed_dim, rngs=rngs, dtype=dtype)
    rates = drop_path_rates(drop_path_rate, depths)
    starts = np.concatenate([[0], np.cumsum(depths)]).astype(int)
    self.layers = nnx.List([
        BasicLayer(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                   rates[starts[i]:starts[i + 1]], downsample=i < len(depths) - 1, rngs=rngs,
                   dtype=dtype, scan=scan)
        for i in range(len(depths))])
    for i, dim in enumerate(self.num_features):
      setattr(self, f"norm{i}", layers.LayerNorm(dim))

  def __call__(self, images: jax.Array, *, train: bool = False, rngs: Optional[nnx.Rngs] = None,
               taps: Optional[dict] = None) -> List[jax.Array]:
    """images: (B, H, W, 3) normalised RGB -> [(B, H/4, W/4, C), ..., (B, H/32, W/32, 8C)]."""
    x = self.patch_embed(images.astype(self.dtype))  # (B, Wh, Ww, C)
    layers.tap(taps, "perception.backbone.patch_embed", x)
    b, height, width, c = x.shape
    x = x.reshape(b, height * width, c)
    outs = []
    for i, stage in enumerate(self.layers):
      x = stage(x, height, width, train=train, rngs=rngs)
      layers.tap(taps, f"perception.backbone.stage{i}.tokens", x)
      out = getattr(self, f"norm{i}")(x).reshape(b, height, width, self.num_features[i])
      layers.tap(taps, f"perception.backbone.res{i + 2}", out)
      outs.append(out)
      if stage.downsample is not None:
        x = stage.downsample(x, height, width)
        height, width = (height + 1) // 2, (width + 1) // 2
        layers.tap(taps, f"perception.backbone.stage{i}.downsampled", x)
    return outs
