"""The loopback decoder: perception layers, loopback (cognition) modules and prediction heads.

This is the official `MultiScaleMaskedTransformerDecoderForOPTPreTrain.forward_woconcat`
(docs/design.md §4). With C = hidden dim and N queries:

  fm = channel_proj_conv([mask_features, up(f_v)])                      # (B, H4, W4, C)
  round 0:   heads(Q0) -> masks M0, attention mask for level 0; loopback 0 -> Q
  layer i:   Q = FFN(SelfAttn(MaskedCrossAttn(Q, level i % 3)))
             heads(Q) -> M_{i+1}, attention mask for level (i+1) % 3; loopback i+1 -> Q
  loopback k: instance pooling fs = mean(sigmoid(down(M)) * avgpool4(fm))
              Qp = query_SA[k](Q, pos=fs)         (QUIRK: attends across the batch)
              Qc = Q2TCA[k](Qp, text)             (self-attn, text cross-attn, FFN)
              Sr = SEG_cls(Qc); Q = refer_proj[k]([Qp, Qc])

Attribute names equal the official state-dict names under `perception_branch.predictor.`
(Q2TCA = query-to-text layer, SEG_cls = referring-score head, refer_proj = fusion).
Unused official parameters (SEG_proj, Q2TCA.*.cross_attn.mapmlp) are not built.
"""
import dataclasses
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import initializers, layers
from deris_jax.models.position import sine_position_2d
from deris_jax.ops import resize
from deris_jax.ops.materialize import materialize


def sine_position_1d(length: int, dim: int, *, reference_compat: bool) -> np.ndarray:
  """(length, dim) text position code of `PositionEmbeddingSine1D`.

  The official code casts the inverse frequencies 1/10000^(2i/dim) to integers, which turns
  them into [1, 0, 0, ...] and the code into [sin p, cos p, 0, 1, 0, 1, ...] (QUIRK, §4);
  `reference_compat=False` keeps the real frequencies.
  """
  if dim % 2:
    raise ValueError(f"text position code needs an even dim, got {dim}")
  inv_freq = 1.0 / np.power(10000.0, np.arange(dim // 2, dtype=np.float32) / (dim / 2))
  if reference_compat:
    inv_freq = inv_freq.astype(np.int64).astype(np.float64)
  angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]  # (L, dim/2)
  code = np.zeros((length, dim), np.float32)
  code[:, 0::2] = np.sin(angles)
  code[:, 1::2] = np.cos(angles)
  return code


class SelfAttentionLayer(nnx.Module):
  """Post-norm self-attention: LN(x + MHA(q=k=x+pos, v=x))."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.self_attn = layers.MultiheadAttention(dim, num_heads, rngs=rngs, dtype=dtype)
    self.norm = layers.LayerNorm(dim)

  def __call__(self, x: jax.Array, pos: Optional[jax.Array] = None) -> jax.Array:
    qk = x if pos is None else x + pos
    return materialize(self.norm(x + self.self_attn(qk, qk, x)))


class CrossAttentionLayer(nnx.Module):
  """Post-norm masked cross-attention: LN(x + MHA(q=x+qpos, k=mem+pos, v=mem, mask))."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.multihead_attn = layers.MultiheadAttention(dim, num_heads, rngs=rngs, dtype=dtype)
    self.norm = layers.LayerNorm(dim)

  def __call__(self, x, memory, *, pos, query_pos, mask):
    out = self.multihead_attn(x + query_pos, memory + pos, memory, mask=mask)
    return materialize(self.norm(x + out))


class FFNLayer(nnx.Module):
  """Post-norm FFN: LN(x + linear2(relu(linear1(x))))."""

  def __init__(self, dim: int, ffn_dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear1 = layers.linear(dim, ffn_dim, rngs=rngs, dtype=dtype, kernel_init="xavier")
    self.linear2 = layers.linear(ffn_dim, dim, rngs=rngs, dtype=dtype, kernel_init="xavier")
    self.norm = layers.LayerNorm(dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return materialize(self.norm(x + self.linear2(jax.nn.relu(self.linear1(x)))))


class GlobalCrossAttention(nnx.Module):
  """Query -> text attention with separate q/k/v/proj; padded text gets an additive -100
  (QUIRK, §4) under reference_compat, a hard mask otherwise."""

  def __init__(self, dim: int, num_heads: int, *, reference_compat: bool, dtype, rngs):
    self.q = layers.linear(dim, dim, rngs=rngs, dtype=dtype)
    self.k = layers.linear(dim, dim, rngs=rngs, dtype=dtype)
    self.v = layers.linear(dim, dim, rngs=rngs, dtype=dtype)
    self.proj = layers.linear(dim, dim, rngs=rngs, dtype=dtype)
    self.num_heads = num_heads
    self.reference_compat = reference_compat

  def __call__(self, query, key_input, value_input, text_padding):
    b, n, c = query.shape
    heads = lambda y: y.reshape(y.shape[0], y.shape[1], self.num_heads, c // self.num_heads)
    q, k, v = heads(self.q(query)), heads(self.k(key_input)), heads(self.v(value_input))
    pad = text_padding[:, None, None, :]  # (B, 1, 1, L)
    if self.reference_compat:
      out = layers.dot_product_attention(q, k, v, bias=pad.astype(jnp.float32) * -100.0)
    else:
      out = layers.dot_product_attention(q, k, v, mask=pad)
    return self.proj(out.reshape(b, n, c))  # (B, N, C)


class QueryTextLayer(nnx.Module):
  """The official `GlobalDecoderLayer` (post-norm): query self-attention, query -> text
  cross-attention, FFN. Named `Q2TCA[k]` in the official state dict."""

  def __init__(self, dim: int, ffn_dim: int, num_heads: int, *, reference_compat: bool, dtype,
               rngs: nnx.Rngs):
    self.self_attn = layers.MultiheadAttention(dim, num_heads, rngs=rngs, dtype=dtype,
                                               kernel_init="torch")
    self.norm2 = layers.LayerNorm(dim)
    self.cross_attn = GlobalCrossAttention(dim, num_heads, reference_compat=reference_compat,
                                           dtype=dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(dim)
    self.linear1 = layers.linear(dim, ffn_dim, rngs=rngs, dtype=dtype)
    self.linear2 = layers.linear(ffn_dim, dim, rngs=rngs, dtype=dtype)
    self.norm3 = layers.LayerNorm(dim)

  def __call__(self, x, text, text_pos, text_padding):
    x = materialize(self.norm2(x + self.self_attn(x, x, x)))
    x = materialize(self.norm1(x + self.cross_attn(x, text + text_pos, text, text_padding)))
    return materialize(self.norm3(x + self.linear2(jax.nn.relu(self.linear1(x)))))


def batch_axis_self_attention(layer: SelfAttentionLayer, x: jax.Array, pos: jax.Array,
                              group_size: int) -> jax.Array:
  """QUIRK (§4): `query_SA` gets (B, N, C) as (seq, batch, C), so each query index attends over
  the samples of the batch. Samples attend within consecutive groups of `group_size` (the
  official per-GPU batch); a batch smaller than the group is one group, as the official last
  batch is."""
  b, n, c = x.shape
  g = min(group_size, b)
  if b % g:
    raise ValueError(f"reference_compat query_SA: batch {b} is not a multiple of "
                     f"compat_group_size {group_size}")
  to_seq = lambda y: y.reshape(b // g, g, n, c).transpose(0, 2, 1, 3).reshape(b // g * n, g, c)
  out = layer(to_seq(x), to_seq(pos))  # (B/g * N, g, C)
  return out.reshape(b // g, n, g, c).transpose(0, 2, 1, 3).reshape(b, n, c)


@dataclasses.dataclass
class RoundOutput:
  """What one prediction round produces (the loss uses masks and refer logits)."""
  mask_logits: jax.Array  # (B, N, H4, W4) stride-4 mask logits
  refer_logits: jax.Array  # (B, N, 2)
  boxes: jax.Array  # (B, N, 4) sigmoid cxcywh (untrained in the reference)
  perception_logits: jax.Array  # (B, N, 2) cls_embed (unused in the reference)


class LoopbackDecoder(nnx.Module):
  """Perception layers + loopback modules + heads (official `predictor`)."""

  def __init__(self, *, hidden_dim: int, num_queries: int, num_heads: int, ffn_dim: int,
               num_layers: int, text_num_heads: int, reference_compat: bool,
               compat_group_size: int, dtype=jnp.float32, rngs: nnx.Rngs):
    c = hidden_dim
    mk = lambda cls, *a, **k: nnx.List([cls(*a, dtype=dtype, rngs=rngs, **k)
                                        for _ in range(num_layers)])
    self.transformer_self_attention_layers = mk(SelfAttentionLayer, c, num_heads)
    self.transformer_cross_attention_layers = mk(CrossAttentionLayer, c, num_heads)
    self.transformer_ffn_layers = mk(FFNLayer, c, ffn_dim)
    self.decoder_norm = layers.LayerNorm(c)
    embed = lambda n: nnx.Embed(n, c, param_dtype=jnp.float32, dtype=dtype, rngs=rngs,
                                embedding_init=initializers.normal(1.0))
    self.query_embed = embed(num_queries)
    self.level_embed = embed(3)
    self.mask_embed = layers.MLP(c, c, c, 3, rngs=rngs, dtype=dtype)
    self.box_embed = layers.MLP(c, c, 4, 3, rngs=rngs, dtype=dtype)
    self.cls_embed = layers.linear(c, 2, rngs=rngs, dtype=dtype)
    loops = num_layers + 1
    self.query_SA = nnx.List([SelfAttentionLayer(c, num_heads, dtype=dtype, rngs=rngs)
                              for _ in range(loops)])
    self.Q2TCA = nnx.List([
        QueryTextLayer(c, ffn_dim, text_num_heads, reference_compat=reference_compat,
                       dtype=dtype, rngs=rngs) for _ in range(loops)])
    self.SEG_cls = layers.linear(c, 2, rngs=rngs, dtype=dtype)
    self.refer_proj = nnx.List([layers.linear(2 * c, c, rngs=rngs, dtype=dtype)
                                for _ in range(loops)])
    self.channel_proj_conv = layers.conv(2 * c, c, 1, rngs=rngs, dtype=dtype)
    self.num_heads = num_heads
    self.num_layers = num_layers
    self.reference_compat = reference_compat
    self.compat_group_size = compat_group_size
    self.dtype = dtype

  def _heads(self, r: int, query, fm, target_hw, taps):
    """Prediction heads on a query state; also the next layer's attention mask."""
    layers.tap(taps, f"decoder.round{r}.query_in", query)
    d = self.decoder_norm(query)
    mask_logits = jnp.einsum("bnc,bhwc->bnhw", self.mask_embed(d), fm,
                             preferred_element_type=jnp.float32)  # (B, N, H4, W4)
    boxes = jax.nn.sigmoid(self.box_embed(d).astype(jnp.float32))  # (B, N, 4)
    cls_logits = self.cls_embed(d).astype(jnp.float32)  # (B, N, 2)
    attn_logits = resize.resize_bilinear(mask_logits, target_hw, align_corners=False)
    blocked = jax.nn.sigmoid(attn_logits) < 0.5  # (B, N, h, w)
    attn_mask = jax.lax.stop_gradient(blocked.reshape(blocked.shape[:2] + (-1,)))  # (B, N, h*w)
    layers.tap(taps, f"decoder.round{r}.mask_logits", mask_logits)
    layers.tap(taps, f"decoder.round{r}.pred_boxes", boxes)
    layers.tap(taps, f"decoder.round{r}.perception_logits", cls_logits)
    layers.tap(taps, f"decoder.round{r}.attn_mask_logits", attn_logits)
    layers.tap(taps, f"decoder.round{r}.attn_mask", attn_mask)
    return mask_logits, boxes, cls_logits, attn_mask

  def _loopback(self, k: int, query, mask_logits, pooled, text, text_pos, text_padding, taps):
    """Loopback module k: instance pooling, query self-attention, query -> text, fusion.

    `pooled` is avgpool4(fm) (B, H4/4, W4/4, C), the same for every round."""
    h4, w4 = mask_logits.shape[-2:]
    small = resize.resize_bilinear(mask_logits, (h4 // 4, w4 // 4), align_corners=False)
    weights = jax.nn.sigmoid(small.astype(jnp.float32))  # (B, N, h, w)
    mask_embedding = jnp.einsum("bnhw,bhwc->bnc", weights, pooled.astype(jnp.float32)) / (
        weights.shape[-1] * weights.shape[-2])  # (B, N, C): plain mean over h*w (§4)
    mask_embedding = mask_embedding.astype(query.dtype)
    layers.tap(taps, f"decoder.round{k}.mask_embedding", mask_embedding)
    if self.reference_compat:
      query = batch_axis_self_attention(self.query_SA[k], query, mask_embedding,
                                        self.compat_group_size)
    else:
      query = self.query_SA[k](query, mask_embedding)
    layers.tap(taps, f"decoder.round{k}.query_after_sa", query)
    query_refer = self.Q2TCA[k](query, text, text_pos, text_padding)  # (B, N, C)
    layers.tap(taps, f"decoder.round{k}.query_refer", query_refer)
    refer_logits = self.SEG_cls(query_refer).astype(jnp.float32)  # (B, N, 2)
    layers.tap(taps, f"decoder.round{k}.refer_logits", refer_logits)
    query = self.refer_proj[k](jnp.concatenate([query, query_refer], axis=-1))
    layers.tap(taps, f"decoder.round{k}.query_feat", query)
    return query, refer_logits

  def __call__(self, multi_scale: Sequence[jax.Array], mask_features: jax.Array,
               query: jax.Array, text: jax.Array, text_padding: jax.Array,
               image_feat: jax.Array, *, taps: Optional[dict] = None):
    """Runs all rounds.

    Args:
      multi_scale: 3 NHWC maps (1/32, 1/16, 1/8 of the input), C channels each.
      mask_features: (B, H4, W4, C) stride-4 pixel-decoder output.
      query: (B, N, C) initial queries Q0.
      text: (B, L, C) projected text features f_t; text_padding: (B, L) bool, True = pad.
      image_feat: (B, hv, wv, C) projected BEiT-3 patch features f_v.
    Returns:
      (rounds: list of RoundOutput, one per round 0..num_layers; final query (B, N, C)).
    """
    dt = self.dtype
    b, n, c = query.shape
    sizes = [x.shape[1:3] for x in multi_scale]
    src, pos = [], []
    for i, x in enumerate(multi_scale):
      h, w = x.shape[1:3]
      code = sine_position_2d(h, w, c // 2)  # (h, w, C)
      layers.tap(taps, f"decoder.pos_embed.level{i}", jnp.broadcast_to(code, (b, h, w, c)))
      pos.append(jnp.asarray(code.reshape(h * w, c), dt)[None])  # (1, h*w, C)
      src.append((x.reshape(b, h * w, c) + self.level_embed.embedding[i]).astype(dt))
    query_pos = self.query_embed.embedding[None].astype(dt)  # (1, N, C)
    h4, w4 = mask_features.shape[1:3]
    image_up = resize.resize_bilinear(image_feat, (h4, w4), align_corners=False, axes=(1, 2))
    layers.tap(taps, "decoder.img_feat_upsampled", image_up)
    fm = self.channel_proj_conv(jnp.concatenate([mask_features, image_up], axis=-1).astype(dt))
    layers.tap(taps, "decoder.mask_features_fused", fm)
    pooled = resize.avg_pool(fm, 4)  # (B, H4/4, W4/4, C): every loopback module's
    text_pos = jnp.asarray(sine_position_1d(text.shape[1], c,
                                            reference_compat=self.reference_compat), dt)[None]
    layers.tap(taps, "decoder.text_pos_embed", jnp.broadcast_to(text_pos, text.shape))
    text = text.astype(dt)
    text_padding = text_padding.astype(bool)
    query = query.astype(dt)

    # The rounds stay a Python loop under model.scan_layers (issue 14): decoder layer i reads
    # level i % 3, so with the released 3 layers no two layers see the same memory, position
    # code or attention-mask shape (1/32, 1/16, 1/8), and the heads of round r resize the mask
    # to the next level's size. Scanning them would need every level padded to the largest
    # (x2.3 the key/value work, and the "fully blocked row attends everywhere" rule rewritten
    # for padded keys) or a lax.switch over the levels, whose branches all compile anyway.
    # The four loopback modules do share shapes, but each sits between two level-specific
    # pieces, and a repeated identical piece costs XLA little to compile: it emits one kernel
    # per distinct fusion and reuses it for the copies (BENCHMARKS.md, "Compile time"). The
    # loss's rounds (all of the same shapes) are one compiled body (`losses._objective`, vmap).
    rounds: List[RoundOutput] = []
    mask_logits, boxes, cls_logits, attn_mask = self._heads(0, query, fm, sizes[0], taps)
    query, refer_logits = self._loopback(0, query, mask_logits, pooled, text, text_pos,
                                         text_padding, taps)
    rounds.append(RoundOutput(mask_logits, refer_logits, boxes, cls_logits))
    for i in range(self.num_layers):
      level = i % len(multi_scale)
      # A query whose mask blocks every location attends everywhere instead.
      attn_mask = attn_mask & ~jnp.all(attn_mask, axis=-1, keepdims=True)
      query = self.transformer_cross_attention_layers[i](
          query, src[level], pos=pos[level], query_pos=query_pos,
          mask=attn_mask[:, None])  # mask (B, 1, N, h*w), shared by the heads
      layers.tap(taps, f"decoder.layer{i}.cross_attn_out", query)
      query = self.transformer_self_attention_layers[i](query, query_pos)
      layers.tap(taps, f"decoder.layer{i}.self_attn_out", query)
      query = self.transformer_ffn_layers[i](query)
      layers.tap(taps, f"decoder.layer{i}.ffn_out", query)
      r = i + 1
      mask_logits, boxes, cls_logits, attn_mask = self._heads(
          r, query, fm, sizes[r % len(multi_scale)], taps)
      query, refer_logits = self._loopback(r, query, mask_logits, pooled, text, text_pos,
                                           text_padding, taps)
      rounds.append(RoundOutput(mask_logits, refer_logits, boxes, cls_logits))
    return rounds, query
