"""The whole DeRIS model: perception and cognition branches wired through the loopback decoder.

  image (B, H, W, 3) --Swin--> res2..res5 --pixel decoder--> mask features + 3 scales --+
  image_mini, text --BEiT-3--> f_v, f_t; learned queries Q0 ----------------------------+
                                                         loopback decoder (4 rounds) ---+--> masks,
                                                         existence head (aligner) -------> scores,
                                                                                           existence
Top-level attribute names (swin, pixel_decoder, beit3, cognition, decoder, existence) map to the
official prefixes through `deris_jax.convert.deris_keys`; inside each, names are the official ones.
"""
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from deris_jax.models import initializers, layers
from deris_jax.models.beit3 import BEiT3
from deris_jax.models.existence import ExistenceHead
from deris_jax.models.loopback import LoopbackDecoder
from deris_jax.models.pixel_decoder import MSDeformAttnPixelDecoder
from deris_jax.models.swin import SwinTransformer
from deris_jax.ops import resize


@flax.struct.dataclass
class DerisOutput:
  """Model outputs. Mask logits are float32; R = number of auxiliary rounds (3)."""
  pred_masks: jax.Array  # (B, N, H, W) final-round mask logits at the input resolution
  refer_logits: jax.Array  # (B, N, 2) final referring logits; softmax[..., 0] = referred
  existence_logit: jax.Array  # (B, 1) existence ("has a target") logit
  aux_pred_masks: jax.Array  # (R, B, N, H, W) rounds 0..R-1, for the auxiliary losses
  aux_refer_logits: jax.Array  # (R, B, N, 2)
  pred_boxes: jax.Array  # (B, N, 4) sigmoid (cx, cy, w, h); untrained in the reference
  perception_logits: jax.Array  # (B, N, 2) cls_embed; unused in the reference
  query_class_logits: jax.Array  # (B, N, 2) existence-head logit_embed; unused in the reference
  query_feat: jax.Array  # (B, N, C) final loopback queries


class KeySequence:
  """A stateless stand-in for `nnx.Rngs` when building a model: `params()` returns the key of
  the next parameter, so construction is deterministic for a seed.

  `host=True` hands out `initializers.HostKey`s: every parameter is drawn with numpy and
  nothing is compiled (an initialisation program under jit compiles one kernel per random
  draw, about a minute for the tiny model on a CPU). `host=False` hands out JAX keys, for
  `jax.eval_shape` / `jax.jit` (nnx.Rngs would also work there, but its counter Variable makes
  every draw cost time linear in the traced program in flax 0.12).
  """

  def __init__(self, seed=0, *, host: bool = False):
    self._host = host
    if host:
      if not isinstance(seed, int):
        raise TypeError(f"host initialisation needs an int seed, got {type(seed)}")
      self._seed = seed
    else:
      self._key = jax.random.key(seed) if isinstance(seed, int) else seed
    self._count = 0

  def params(self):
    self._count += 1
    if self._host:
      return initializers.HostKey(self._seed, self._count)
    return jax.random.fold_in(self._key, self._count)


def abstract_model(config: ml_collections.ConfigDict) -> "DeRIS":
  """A DeRIS whose parameters are `jax.ShapeDtypeStruct`s (no memory, no compute)."""
  return nnx.eval_shape(lambda: DeRIS(config, rngs=KeySequence(0)))


def build_model(config: ml_collections.ConfigDict, seed: int = 0) -> "DeRIS":
  """A DeRIS with freshly initialised parameters (the official initialisers), drawn on the
  host with numpy from `seed` (deterministic, nothing to compile)."""
  return DeRIS(config, rngs=KeySequence(seed, host=True))


def upsample_masks(mask_logits: jax.Array) -> jax.Array:
  """Stride-4 mask logits (..., h, w) -> (..., 4h, 4w), bilinear align_corners=True (§4)."""
  h, w = mask_logits.shape[-2:]
  return resize.resize_bilinear(mask_logits.astype(jnp.float32), (4 * h, 4 * w),
                                align_corners=True)


class CognitionProjections(nnx.Module):
  """Projections of BEiT-3 features to the decoder width and the learned initial queries."""

  def __init__(self, *, beit_dim: int, hidden_dim: int, num_queries: int, dtype, rngs):
    self.vis_embed = layers.linear(beit_dim, hidden_dim, rngs=rngs, dtype=dtype)
    self.text_embed = layers.linear(beit_dim, hidden_dim, rngs=rngs, dtype=dtype)
    self.perception_embed = layers.linear(beit_dim, hidden_dim, rngs=rngs, dtype=dtype)
    self.init_query = nnx.Embed(num_queries, beit_dim, param_dtype=jnp.float32, dtype=dtype,
                                embedding_init=initializers.normal(1.0), rngs=rngs)


class DeRIS(nnx.Module):
  """DeRIS built from a `config.model` section (configs/common.py)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    c = config.hidden_dim
    sw = config.swin
    scan = bool(config.get("scan_layers", False))  # every repeated stack as one lax.scan
    self.swin = SwinTransformer(
        embed_dim=sw.embed_dim, depths=tuple(sw.depths), num_heads=tuple(sw.num_heads),
        window_size=sw.window_size, patch_size=sw.patch_size, mlp_ratio=sw.mlp_ratio,
        drop_path_rate=sw.drop_path_rate, scan=scan, dtype=dtype, rngs=rngs)
    pd = config.pixel_decoder
    self.pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=tuple(sw.embed_dim * 2 ** i for i in range(len(sw.depths))),
        conv_dim=c, mask_dim=c, num_heads=pd.num_heads, num_points=pd.num_points,
        num_layers=pd.num_layers, ffn_dim=pd.ffn_dim, num_groups=pd.num_groups, scan=scan,
        dtype=dtype, rngs=rngs)
    bc = config.beit3
    self.beit3 = BEiT3(
        embed_dim=bc.embed_dim, num_layers=bc.num_layers, num_heads=bc.num_heads,
        ffn_dim=bc.ffn_dim, vocab_size=bc.vocab_size, patch_size=bc.patch_size,
        image_size=tuple(config.cognition_image_size),
        max_source_positions=bc.max_source_positions, drop_path_rate=bc.drop_path_rate,
        layernorm_eps=bc.layernorm_eps, remat=bool(config.get("remat", False)),
        scan_layers=scan, dtype=dtype, rngs=rngs)
    self.cognition = CognitionProjections(beit_dim=bc.embed_dim, hidden_dim=c,
                                          num_queries=config.num_queries, dtype=dtype, rngs=rngs)
    dc = config.decoder
    self.decoder = LoopbackDecoder(
        hidden_dim=c, num_queries=config.num_queries, num_heads=dc.num_heads,
        ffn_dim=dc.ffn_dim, num_layers=dc.num_layers, text_num_heads=dc.text_num_heads,
        reference_compat=config.reference_compat, compat_group_size=config.compat_group_size,
        dtype=dtype, rngs=rngs)
    ec = config.existence
    self.existence = ExistenceHead(hidden_dim=c, num_layers=ec.num_layers,
                                   num_heads=ec.num_heads, ffn_dim=ec.ffn_dim,
                                   dropout=ec.dropout, dtype=dtype, rngs=rngs)
    self.freeze_swin = bool(config.get("freeze_swin", True))
    self.patch_size = bc.patch_size
    self.dtype = dtype

  def __call__(self, image: jax.Array, image_mini: jax.Array, text_ids: jax.Array,
               text_padding: jax.Array, *, train: bool = False,
               rngs: Optional[nnx.Rngs] = None, taps: Optional[dict] = None) -> DerisOutput:
    """Runs DeRIS.

    Args:
      image: (B, H, W, 3) normalised perception (Swin) image.
      image_mini: (B, h, w, 3) normalised cognition (BEiT-3) image.
      text_ids: (B, L) int token ids; text_padding: (B, L), nonzero = padding.
      train: enables stochastic depth and dropout (then `rngs` needs a 'dropout' stream).
      taps: a dict to fill with intermediates under the fixture's names (parity checks).
    """
    text_padding = text_padding.astype(bool)
    features = self.swin(image.astype(self.dtype), train=train, rngs=rngs, taps=taps)
    if self.freeze_swin:  # the backbone is frozen (§2): no gradient flows into it
      features = [jax.lax.stop_gradient(f) for f in features]
    mask_features, multi_scale = self.pixel_decoder(features, taps=taps)

    tokens = self.beit3(image_mini, text_ids, text_padding, train=train, rngs=rngs, taps=taps)
    b = tokens.shape[0]
    num_text = text_ids.shape[1]
    hv, wv = (s // self.patch_size for s in image_mini.shape[1:3])
    layers.tap(taps, "cognition.beit3.cls_token", tokens[:, 0])
    layers.tap(taps, "cognition.beit3.vision_tokens", tokens[:, 1:-num_text])
    layers.tap(taps, "cognition.beit3.text_tokens", tokens[:, -num_text:])
    cog = self.cognition
    image_feat = cog.vis_embed(tokens[:, 1:-num_text]).reshape(b, hv, wv, -1)  # (B, hv, wv, C)
    text_feat = cog.text_embed(tokens[:, -num_text:])  # (B, L, C)
    queries = cog.perception_embed(cog.init_query.embedding.astype(self.dtype))  # (N, C)
    queries = jnp.broadcast_to(queries[None], (b,) + queries.shape)  # (B, N, C)
    layers.tap(taps, "cognition.query_feat", queries)
    layers.tap(taps, "cognition.img_feat", image_feat)
    layers.tap(taps, "cognition.text_feat", text_feat)

    rounds, query_feat = self.decoder(multi_scale, mask_features, queries, text_feat,
                                      text_padding, image_feat, taps=taps)
    existence, class_logits = self.existence(query_feat, text_feat, text_padding, train=train,
                                             rngs=rngs, taps=taps)
    final = rounds[-1]
    pred_masks = upsample_masks(final.mask_logits)  # (B, N, H, W)
    aux = rounds[:-1]
    out = DerisOutput(
        pred_masks=pred_masks,
        refer_logits=final.refer_logits,
        existence_logit=existence,
        aux_pred_masks=upsample_masks(jnp.stack([r.mask_logits for r in aux])),
        aux_refer_logits=jnp.stack([r.refer_logits for r in aux]),
        pred_boxes=final.boxes,
        perception_logits=final.perception_logits,
        query_class_logits=class_logits,
        query_feat=query_feat)
    layers.tap(taps, "decoder.final.pred_boxes", out.pred_boxes)
    layers.tap(taps, "decoder.final.perception_logits", out.perception_logits)
    layers.tap(taps, "decoder.final.refer_logits", out.refer_logits)
    layers.tap(taps, "decoder.final.query_feat", query_feat)
    layers.tap(taps, "final.pred_masks", pred_masks)
    layers.tap(taps, "final.refer_logits", out.refer_logits)
    layers.tap(taps, "final.refer_scores", jax.nn.softmax(out.refer_logits, axis=-1)[..., 0])
    layers.tap(taps, "final.pred_boxes_cxcywh", out.pred_boxes)
    layers.tap(taps, "final.pred_existence", existence)
    layers.tap(taps, "final.existence_prob", jax.nn.sigmoid(existence))
    return out
