"""BEiT-3 multiway transformer (the cognition branch), as torchscale 0.3.0 computes it.

One joint self-attention runs over [CLS, image patches, text tokens]; every projection and norm
has two experts, `A` for vision tokens and `B` for text tokens, split at a static position
(docs/design.md §3). Layers are pre-LN with subLN (`inner_attn_ln` before the attention output
projection, `ffn_layernorm` inside the FFN), and the encoder ends with a multiway LayerNorm.
Positions are learned per modality and start at index 2 (the fairseq offset); padded text keys
get -inf and padded token embeddings are zeroed before the first layer.

Attribute names equal the official state-dict names under `understanding_branch.vis_enc.beit3.`.
"""
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import initializers, layers
from deris_jax.models import scan as scan_lib
from deris_jax.ops.materialize import materialize

POSITION_OFFSET = 2  # fairseq: position ids start at 2 for both modalities


class Multiway(nnx.Module):
  """Two copies of a layer: `A` on tokens [0, split), `B` on tokens [split, T)."""

  def __init__(self, make: Callable[[], nnx.Module]):
    self.A = make()
    self.B = make()

  def __call__(self, x: jax.Array, split: int) -> jax.Array:
    return jnp.concatenate([self.A(x[:, :split]), self.B(x[:, split:])], axis=1)


class MultiwayAttention(nnx.Module):
  """torchscale `MultiheadAttention` with multiway q/k/v/out projections and subLN."""

  def __init__(self, dim: int, num_heads: int, *, eps: float, dtype, rngs: nnx.Rngs):
    lin = lambda: layers.linear(dim, dim, rngs=rngs, dtype=dtype, kernel_init="beit_trunc",
                                bias_init="zeros")
    self.q_proj = Multiway(lin)
    self.k_proj = Multiway(lin)
    self.v_proj = Multiway(lin)
    self.out_proj = Multiway(lin)
    self.inner_attn_ln = Multiway(lambda: layers.LayerNorm(dim, eps=eps))
    self.num_heads = num_heads

  def __call__(self, x: jax.Array, key_padding: jax.Array, split: int) -> jax.Array:
    b, t, c = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)
    q = heads(self.q_proj(x, split))  # (B, T, H, D)
    k = heads(self.k_proj(x, split))
    v = heads(self.v_proj(x, split))
    mask = key_padding[:, None, None, :]  # (B, 1, 1, T): True = padded key
    out = layers.dot_product_attention(q, k, v, mask=mask).reshape(b, t, c)  # (B, T, C)
    return self.out_proj(self.inner_attn_ln(out, split), split)


class FeedForward(nnx.Module):
  """torchscale `FeedForwardNetwork` with subLN: fc1 -> GELU -> ffn_layernorm -> fc2."""

  def __init__(self, dim: int, ffn_dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
    self.fc1 = layers.linear(dim, ffn_dim, rngs=rngs, dtype=dtype, kernel_init="beit_trunc",
                             bias_init="zeros")
    self.ffn_layernorm = layers.LayerNorm(ffn_dim, eps=eps)
    self.fc2 = layers.linear(ffn_dim, dim, rngs=rngs, dtype=dtype, kernel_init="beit_trunc",
                             bias_init="zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.gelu(self.fc1(x).astype(jnp.float32)).astype(x.dtype)
    return self.fc2(self.ffn_layernorm(h))


class EncoderLayer(nnx.Module):
  """Pre-LN multiway block: x + attn(LN(x)), then x + ffn(LN(x)), each with drop path."""

  def __init__(self, dim: int, num_heads: int, ffn_dim: int, drop_path_rate: float, *,
               eps: float, dtype, rngs: nnx.Rngs):
    self.self_attn = MultiwayAttention(dim, num_heads, eps=eps, dtype=dtype, rngs=rngs)
    self.self_attn_layer_norm = Multiway(lambda: layers.LayerNorm(dim, eps=eps))
    self.ffn = Multiway(lambda: FeedForward(dim, ffn_dim, eps=eps, dtype=dtype, rngs=rngs))
    self.final_layer_norm = Multiway(lambda: layers.LayerNorm(dim, eps=eps))
    self.drop_path_rate = drop_path_rate

  def __call__(self, x, key_padding, split, *, train, rngs, drop_path_rate=None):
    """`drop_path_rate` overrides the layer's own (a traced per-layer rate when scanned)."""
    rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
    y = self.self_attn(self.self_attn_layer_norm(x, split), key_padding, split)
    x = materialize(x + layers.drop_path(y, rate, train=train, rngs=rngs))
    y = self.ffn(self.final_layer_norm(x, split), split)
    return materialize(x + layers.drop_path(y, rate, train=train, rngs=rngs))


class VisionEmbedding(nnx.Module):
  """Patch embedding (Conv k=s=patch) with a prepended CLS token."""

  def __init__(self, dim: int, patch_size: int, *, dtype, rngs: nnx.Rngs):
    self.proj = layers.conv(3, dim, patch_size, stride=patch_size, rngs=rngs, dtype=dtype)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, dim), jnp.float32))

  def __call__(self, images: jax.Array) -> jax.Array:
    patches = self.proj(images)  # (B, h, w, D)
    b, h, w, d = patches.shape
    cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b, 1, d))
    return jnp.concatenate([cls, patches.reshape(b, h * w, d)], axis=1)  # (B, 1+h*w, D)


class Encoder(nnx.Module):
  """Position embeddings, the layer stack and the final multiway LayerNorm."""

  def __init__(self, *, dim, num_layers, num_heads, ffn_dim, num_vision_positions,
               max_source_positions, drop_path_rate, eps, dtype, rngs):
    embed = lambda n: nnx.Embed(n, dim, param_dtype=jnp.float32, dtype=dtype, rngs=rngs,
                                embedding_init=initializers.normal(1.0))
    self.embed_positions = nnx.Dict(A=embed(num_vision_positions), B=embed(max_source_positions))
    rates = np.linspace(0.0, drop_path_rate, num_layers) if drop_path_rate > 0 else [0.0] * num_layers
    self.layers = nnx.List([
        EncoderLayer(dim, num_heads, ffn_dim, float(rates[i]), eps=eps, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    self.layer_norm = Multiway(lambda: layers.LayerNorm(dim, eps=eps))


class BEiT3(nnx.Module):
  """BEiT-3 over an image and a text; returns the encoder output tokens.

  Args (constructor): sizes from `config.model.beit3` plus the cognition image size.
  Call:
    images: (B, H, W, 3) normalised, H and W multiples of patch_size.
    text_ids: (B, L) int token ids; text_padding: (B, L) bool, True = padding.
  Returns:
    (B, 1 + h*w + L, D) encoder output: [CLS, patches, text].
  """

  def __init__(self, *, embed_dim: int, num_layers: int, num_heads: int, ffn_dim: int,
               vocab_size: int, patch_size: int, image_size, max_source_positions: int = 1024,
               drop_path_rate: float = 0.0, layernorm_eps: float = 1e-5, remat: bool = False,
               scan_layers: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    h, w = image_size
    if h % patch_size or w % patch_size:
      raise ValueError(f"BEiT-3 image size {image_size} is not a multiple of patch {patch_size}")
    self.num_patches = (h // patch_size) * (w // patch_size)
    self.text_embed = nnx.Embed(vocab_size, embed_dim, param_dtype=jnp.float32, dtype=dtype,
                                embedding_init=initializers.normal(embed_dim ** -0.5),
                                rngs=rngs)
    self.vision_embed = VisionEmbedding(embed_dim, patch_size, dtype=dtype, rngs=rngs)
    self.encoder = Encoder(
        dim=embed_dim, num_layers=num_layers, num_heads=num_heads, ffn_dim=ffn_dim,
        num_vision_positions=self.num_patches + 1 + POSITION_OFFSET,
        max_source_positions=max_source_positions, drop_path_rate=drop_path_rate,
        eps=layernorm_eps, dtype=dtype, rngs=rngs)
    self.max_source_positions = max_source_positions
    self.remat = remat  # recompute each layer in the backward pass (activation memory)
    self.scan_layers = scan_layers  # one compiled layer body for the whole stack
    self.dtype = dtype

  def __call__(self, images: jax.Array, text_ids: jax.Array, text_padding: jax.Array, *,
               train: bool = False, rngs: Optional[nnx.Rngs] = None,
               taps: Optional[dict] = None) -> jax.Array:
    vision = self.vision_embed(images.astype(self.dtype))  # (B, 1+P, D)
    text = self.text_embed(text_ids)  # (B, L, D)
    split = vision.shape[1]
    length = text.shape[1]
    if length + POSITION_OFFSET > self.max_source_positions:
      raise ValueError(f"text length {length} exceeds BEiT-3 max_source_positions "
                       f"{self.max_source_positions} - {POSITION_OFFSET}")
    x = jnp.concatenate([vision, text.astype(vision.dtype)], axis=1)  # (B, T, D)
    layers.tap(taps, "cognition.beit3.embed_tokens", x)
    pos_a = self.encoder.embed_positions["A"].embedding[POSITION_OFFSET:POSITION_OFFSET + split]
    pos_b = self.encoder.embed_positions["B"].embedding[POSITION_OFFSET:POSITION_OFFSET + length]
    x = x + jnp.concatenate([pos_a, pos_b], axis=0)[None].astype(x.dtype)
    layers.tap(taps, "cognition.beit3.embed_with_pos", x)
    key_padding = jnp.concatenate(
        [jnp.zeros(vision.shape[:2], bool), text_padding.astype(bool)], axis=1)  # (B, T)
    layers.tap(taps, "cognition.beit3.encoder.padding_mask", key_padding.astype(jnp.int32))
    x = x * (1 - key_padding[..., None].astype(x.dtype))
    layers.tap(taps, "cognition.beit3.encoder.layer_input", x)
    if self.scan_groups():
      x = self._scan_layers(x, key_padding, split, train=train, rngs=rngs, taps=taps)
    else:
      run = lambda layer, x, rngs: layer(x, key_padding, split, train=train, rngs=rngs)
      if self.remat:
        run = nnx.remat(run)
      for i, layer in enumerate(self.encoder.layers):
        x = run(layer, x, rngs)
        layers.tap(taps, f"cognition.beit3.encoder.layer{i}.out", x)
    x = self.encoder.layer_norm(x, split)
    layers.tap(taps, "cognition.beit3.encoder_out", x)
    return x

  def scan_groups(self) -> List[List[nnx.Module]]:
    """The layers that run as one scan, as its one group; [] for a loop."""
    stack = list(self.encoder.layers)
    return [stack] if self.scan_layers and len(stack) > 1 else []

  def _scan_layers(self, x, key_padding, split, *, train, rngs, taps):
    """The layer stack as one `lax.scan` over the layers' stacked parameters (same numbers
    as the loop; the program holds one layer body, so it compiles in a fraction of the time).

    Drop path draws one key per layer from `rngs` (other draws than the loop's, same law).
    With `taps`, every layer's output leaves the scan stacked and is recorded per layer.
    """
    stack, = self.scan_groups()
    rates = jnp.asarray([layer.drop_path_rate for layer in stack], jnp.float32)  # (num_layers,)
    use_rng = train and rngs is not None and any(layer.drop_path_rate > 0 for layer in stack)
    keys = scan_lib.step_keys(rngs, (len(stack),), use_rng)

    def body(x, modules, per_layer):
      rate, key = per_layer
      layer_rngs = nnx.Rngs(dropout=key) if use_rng else None
      x = modules[0](x, key_padding, split, train=use_rng, rngs=layer_rngs, drop_path_rate=rate)
      return x, (None if taps is None else {"out": x})

    x, stacked = scan_lib.scan_modules([stack], body, x, (rates, keys), remat=self.remat)
    scan_lib.unstack_taps(taps, stacked, lambda i, key: f"cognition.beit3.encoder.layer{i}.{key}")
    return x
