"""The existence ("no-target") head: a 3-layer query -> text aligner and a mean logit.

Official `MultiGrainAligner` (a `DetrTransformerDecoder`, batch-first, post-norm order
self-attn, LN, cross-attn, LN, FFN, LN, plus a final LayerNorm) over the final loopback queries,
with the projected text as keys/values and -inf on padded text; then
`pred_existence = mean_n nt_embed(q_n)` (docs/design.md §4). The head is trained (existence BCE)
but the reference inference ignores it; `logit_embed` is computed by the reference and unused.
"""
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deris_jax.models import layers
from deris_jax.ops.materialize import materialize


class AlignerLayer(nnx.Module):
  """Post-norm decoder layer: self-attention, text cross-attention, FFN (dropout 0.1)."""

  def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, *, dtype, rngs):
    self.self_attn = layers.MultiheadAttention(dim, num_heads, rngs=rngs, dtype=dtype,
                                               dropout_rate=dropout, kernel_init="torch")
    self.norm1 = layers.LayerNorm(dim)
    self.cross_attn = layers.MultiheadAttention(dim, num_heads, rngs=rngs, dtype=dtype,
                                                dropout_rate=dropout, kernel_init="torch")
    self.norm2 = layers.LayerNorm(dim)
    self.fc1 = layers.linear(dim, ffn_dim, rngs=rngs, dtype=dtype)
    self.fc2 = layers.linear(ffn_dim, dim, rngs=rngs, dtype=dtype)
    self.norm3 = layers.LayerNorm(dim)
    self.dropout = dropout

  def __call__(self, q, text, text_padding, *, train, rngs):
    drop = lambda y: layers.dropout(y, self.dropout, train=train, rngs=rngs)
    q = materialize(self.norm1(q + self.self_attn(q, q, q, train=train, rngs=rngs)))
    mask = text_padding[:, None, None, :]  # (B, 1, 1, L): True = padded text
    q = materialize(self.norm2(q + self.cross_attn(q, text, text, mask=mask, train=train,
                                                   rngs=rngs)))
    hidden = drop(jax.nn.relu(self.fc1(q)))
    return materialize(self.norm3(q + drop(self.fc2(hidden))))


class Aligner(nnx.Module):

  def __init__(self, dim, num_layers, num_heads, ffn_dim, dropout, *, dtype, rngs):
    self.layers = nnx.List([AlignerLayer(dim, num_heads, ffn_dim, dropout, dtype=dtype, rngs=rngs)
                            for _ in range(num_layers)])
    self.post_norm = layers.LayerNorm(dim)


class ExistenceHead(nnx.Module):
  """Aligner + `nt_embed` (existence logit) + `logit_embed` (per-query logits, unused)."""

  def __init__(self, *, hidden_dim: int, num_layers: int, num_heads: int, ffn_dim: int,
               dropout: float, dtype=jnp.float32, rngs: nnx.Rngs):
    self.aligner = Aligner(hidden_dim, num_layers, num_heads, ffn_dim, dropout, dtype=dtype,
                           rngs=rngs)
    self.nt_embed = layers.linear(hidden_dim, 1, rngs=rngs, dtype=dtype)
    self.logit_embed = layers.linear(hidden_dim, 2, rngs=rngs, dtype=dtype)

  def __call__(self, queries: jax.Array, text: jax.Array, text_padding: jax.Array, *,
               train: bool = False, rngs: Optional[nnx.Rngs] = None,
               taps: Optional[dict] = None):
    """queries (B, N, C), text (B, L, C), text_padding (B, L) bool ->
    (existence logit (B, 1), per-query class logits (B, N, 2))."""
    q = queries
    for i, layer in enumerate(self.aligner.layers):
      q = layer(q, text, text_padding, train=train, rngs=rngs)
      layers.tap(taps, f"understanding.aligner.layer{i}.out", q)
    q = self.aligner.post_norm(q)
    layers.tap(taps, "understanding.aligner_query", q)
    class_logits = self.logit_embed(q).astype(jnp.float32)  # (B, N, 2)
    existence = jnp.mean(self.nt_embed(q).astype(jnp.float32), axis=1)  # (B, 1)
    layers.tap(taps, "understanding.pred_logits", class_logits)
    layers.tap(taps, "understanding.pred_existence", existence)
    return existence, class_logits
