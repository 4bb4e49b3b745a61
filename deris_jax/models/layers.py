"""Building blocks shared by every DeRIS module, with PyTorch numerics and initialisers.

Conventions (docs/design.md and the README):
- Parameters are float32; `dtype` is the compute dtype of matmuls and convolutions.
- Norms and softmax run in float32 and return the input dtype.
- Sub-module names follow the official PyTorch keys (`in_proj`, `out_proj`, `layers`), so
  `deris_jax.convert` maps checkpoints with a small table of name rules.
- Stochastic layers (dropout, drop path) take `rngs` at call time and are active only when
  `train=True`; the model itself holds no RNG state. Their masks come from a keyed hash of
  the element index (`ops/keyed_bits.py`: the law of `jax.random.bernoulli`, other draws).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import initializers
from deris_jax.ops import group_norm
from deris_jax.ops import keyed_bits
from deris_jax.ops import layer_norm
from deris_jax.ops import sum_rows

Dtype = jnp.dtype

# Initialisers named after the PyTorch code that the official model runs.
KERNEL_INITS = {
    # nn.Linear / nn.Conv2d default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
    "torch": initializers.variance_scaling_uniform(1.0 / 3.0, "fan_in"),
    "xavier": initializers.variance_scaling_uniform(1.0, "fan_avg"),
    # fvcore c2_xavier_fill: kaiming_uniform(a=1) = U(-sqrt(3/fan_in), ..).
    "c2_xavier": initializers.variance_scaling_uniform(1.0, "fan_in"),
    # timm trunc_normal_(std=.02) with its default absolute bounds +-2 (Swin Linear layers).
    "trunc02": initializers.truncated_normal(0.02, 2.0),
    # BEiT-3 `_init_weights`: trunc_normal_(std=.02, a=-std, b=std), cut at one sigma.
    "beit_trunc": initializers.truncated_normal(0.02, 0.02),
    "zeros": initializers.zeros,
}


def dense(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """x (..., I) @ kernel (I, O) -> (..., O), as one (N, I) x (I, O) product.

  The same values as the dot over x's last axis, but its weight gradient is then a 2-D product
  (x^T g, both contracted over their rows) that XLA:CPU computes in place, where the
  multi-axis contraction of (..., I) with (..., O) made it write a transposed copy of g first
  (the Swin MLP's fc1 backward: 6.4-6.9 -> 4.6-5.0 ms, BENCHMARKS.md).
  """
  rows = x.reshape(-1, x.shape[-1])  # (N, I)
  y = jax.lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())), precision=precision)  # (N, O)
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


class Linear(nnx.Linear):
  """`nnx.Linear` (same parameters, same value) with the product as `dense` computes it and the
  bias gradient of `sum_rows.add_bias` (on the CPU a product with a ones vector instead of a
  column reduction)."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.preferred_element_type is not None or self.dot_general is not jax.lax.dot_general:
      raise ValueError("layers.Linear computes its product with `dense`: it takes no "
                       "preferred_element_type or dot_general (use nnx.Linear for those)")
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    y = dense(inputs, kernel, self.precision)  # (..., out_features)
    return y if bias is None else sum_rows.add_bias(y, bias)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
           use_bias: bool = True, kernel_init: str = "torch", bias_init: str = "torch") -> Linear:
  """A Dense layer; `kernel_init`/`bias_init` name the PyTorch initialiser to imitate."""
  return Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=KERNEL_INITS[kernel_init],
      bias_init=(initializers.torch_bias(in_features) if bias_init == "torch"
                 else initializers.zeros),
      rngs=rngs)


class Conv(nnx.Conv):
  """`nnx.Conv` on (B, H, W, C) maps (same parameters, same value) whose bias gradient is
  `sum_rows.add_bias`'s. Takes what `conv` builds: explicit padding, no dilation, no mask."""

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if inputs.ndim != 4:
      raise ValueError(f"Conv: expected a (B, H, W, C) map, got shape {inputs.shape}")
    if self.mask is not None or any(d is not None and np.any(np.asarray(d) != 1)
                                    for d in (self.kernel_dilation, self.input_dilation)):
      raise ValueError("layers.Conv takes no dilation and no mask (use nnx.Conv for those)")
    if isinstance(self.padding, (str, int)) or len(self.padding) != 2:
      raise ValueError(f"layers.Conv takes padding as two (low, high) pairs, got {self.padding!r}")
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    kernel = self.kernel[...]  # (kh, kw, C_in, C_out)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    y = jax.lax.conv_general_dilated(
        inputs, kernel, strides, self.padding, precision=self.precision,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.feature_group_count)  # (B, H', W', C_out)
    return y if bias is None else sum_rows.add_bias(y, bias)


def conv(in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs,
         stride: int = 1, padding: int = 0, dtype: Dtype = jnp.float32, use_bias: bool = True,
         kernel_init: str = "torch", bias_init: str = "torch") -> Conv:
  """An NHWC convolution with PyTorch-style symmetric zero padding."""
  fan_in = in_features * kernel_size * kernel_size
  return Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=[(padding, padding), (padding, padding)], use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=KERNEL_INITS[kernel_init],
      bias_init=initializers.torch_bias(fan_in) if bias_init == "torch" else initializers.zeros,
      rngs=rngs)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (PyTorch eps 1e-5), computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm.layer_norm(x, self.scale[...], self.bias[...], self.eps)


class GroupNorm(nnx.Module):
  """GroupNorm on NHWC maps (PyTorch `nn.GroupNorm(groups, C)`, eps 1e-5), in float32."""

  def __init__(self, num_groups: int, dim: int, *, eps: float = 1e-5):
    if dim % num_groups:
      raise ValueError(f"GroupNorm: {dim} channels do not split into {num_groups} groups")
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.num_groups = num_groups
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.scale.shape[0]:
      raise ValueError(f"GroupNorm: expected (B, H, W, {self.scale.shape[0]}), got {x.shape}")
    return group_norm.group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.eps)


def dropout(x: jax.Array, rate: float, *, train: bool, rngs: Optional[nnx.Rngs]) -> jax.Array:
  """Inverted dropout, active only in training with rate > 0."""
  if not train or rate <= 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout in training needs `rngs` with a 'dropout' stream")
  keep = keyed_bits.bernoulli(rngs.dropout, 1.0 - rate, x.shape)  # x's shape
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x: jax.Array, rate, *, train: bool, rngs: Optional[nnx.Rngs]) -> jax.Array:
  """Stochastic depth (timm `DropPath`): drops the whole residual branch per sample.

  `rate` is a Python float, or a traced scalar (layers scanned with per-layer rates).
  """
  if not train or (isinstance(rate, (int, float)) and rate <= 0.0):
    return x
  if rngs is None:
    raise ValueError("drop path in training needs `rngs` with a 'dropout' stream")
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = keyed_bits.bernoulli(rngs.dropout, 1.0 - rate, shape)  # (B, 1, ...)
  keep_prob = 1.0 - rate
  if not isinstance(keep_prob, (int, float)):  # a traced float32 rate: keep x's dtype (bf16)
    keep_prob = jnp.asarray(keep_prob, x.dtype)
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
                          scale: Optional[float] = None, dropout_rate: float = 0.0,
                          train: bool = False, rngs: Optional[nnx.Rngs] = None) -> jax.Array:
  """Softmax attention as PyTorch computes it (q scaled first, softmax in float32).

  Args:
    q: (B, Lq, H, D); k, v: (B, Lk, H, D).
    mask: bool, True = blocked, broadcastable to (B, H, Lq, Lk).
    bias: additive, broadcastable to (B, H, Lq, Lk).
  Returns:
    (B, Lq, H, D) in v.dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q = q * jnp.asarray(scale, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, H, Lq, Lk)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, jnp.finfo(jnp.float32).min, logits)
  weights = jax.nn.softmax(logits, axis=-1)
  weights = dropout(weights, dropout_rate, train=train, rngs=rngs)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)  # (B, Lq, H, D)


class MultiheadAttention(nnx.Module):
  """`torch.nn.MultiheadAttention` (packed q/k/v `in_proj`, `out_proj`), batch-first API."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
               dropout_rate: float = 0.0, kernel_init: str = "xavier"):
    if dim % num_heads:
      raise ValueError(f"MultiheadAttention: dim {dim} not divisible by {num_heads} heads")
    # PyTorch: in_proj_weight is xavier_uniform over the packed (3C, C) matrix and the biases
    # are 0; out_proj.weight keeps nn.Linear's default unless the owner re-initialises it
    # (Mask2Former layers apply xavier to every matrix): `kernel_init` names that choice.
    self.in_proj = nnx.Linear(
        dim, 3 * dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        kernel_init=KERNEL_INITS["xavier"], bias_init=initializers.zeros)
    self.out_proj = linear(dim, dim, rngs=rngs, dtype=dtype, kernel_init=kernel_init,
                           bias_init="zeros")
    self.num_heads = num_heads
    self.dim = dim
    self.dropout_rate = dropout_rate
    self.dtype = dtype

  def _project(self, x: jax.Array, part: int) -> jax.Array:
    c = self.dim
    kernel = self.in_proj.kernel[:, part * c:(part + 1) * c].astype(self.dtype)
    bias = self.in_proj.bias[part * c:(part + 1) * c].astype(self.dtype)
    y = sum_rows.add_bias(dense(x.astype(self.dtype), kernel), bias)  # (B, L, C)
    return y.reshape(y.shape[:-1] + (self.num_heads, c // self.num_heads))

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               mask: Optional[jax.Array] = None, train: bool = False,
               rngs: Optional[nnx.Rngs] = None) -> jax.Array:
    """query (B, Lq, C), key/value (B, Lk, C); mask True = blocked, (B|1, H|1, Lq, Lk)."""
    q = self._project(query, 0)
    k = self._project(key, 1)
    v = self._project(value, 2)
    out = dot_product_attention(q, k, v, mask=mask, dropout_rate=self.dropout_rate, train=train,
                                rngs=rngs)  # (B, Lq, H, D)
    return self.out_proj(out.reshape(out.shape[:2] + (self.dim,)))


class MLP(nnx.Module):
  """Mask2Former `MLP`: `num_layers` Linear layers with ReLU between them."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *,
               rngs: nnx.Rngs, dtype: Dtype = jnp.float32):
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    self.layers = nnx.List([linear(a, b, rngs=rngs, dtype=dtype)
                            for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as `nn.GELU()` / `F.gelu` default."""
  return jax.nn.gelu(x, approximate=False)


def tap(taps: Optional[dict], name: str, value: jax.Array) -> None:
  """Records an intermediate under its fixture name when `taps` is a dict (parity checks).

  Names follow ../shared/fixtures/deris_tiny/README.md; maps are stored in our layout (NHWC).
  With `taps=None` (training, inference) this does nothing and costs nothing.
  """
  if taps is not None:
    taps[name] = value
