"""Parameter initialisers that draw on the host (numpy) or in JAX, with the same distributions.

XLA compiles every random-number draw of an initialisation program into its own kernel; on a
CPU that is ~0.1-0.2 s per parameter, i.e. about a minute for even the tiny DeRIS. Building a
model with `HostKey`s instead (see `deris.KeySequence`) draws each parameter with numpy and
compiles nothing. Under `jax.eval_shape` / `jax.jit` the same initialisers receive real JAX
keys and use `jax.random`.

Distributions follow the PyTorch initialisers the official model uses (see layers.KERNEL_INITS);
fans are computed like flax's `variance_scaling` (kernels are (..., in, out)).
"""
import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class HostKey:
  """Identifies one host-side draw: numpy's generator seeded with (seed, index)."""
  seed: int
  index: int

  def generator(self) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.index])


def _fans(shape: Sequence[int]):
  if len(shape) < 2:
    raise ValueError(f"fan-based initialiser needs a kernel of rank >= 2, got shape {shape}")
  receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
  return shape[-2] * receptive, shape[-1] * receptive


def uniform(bound: float) -> Initializer:
  """U(-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    if isinstance(key, HostKey):
      return jnp.asarray(key.generator().uniform(-bound, bound, shape), dtype)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal(std: float) -> Initializer:
  """N(0, std^2)."""

  def init(key, shape, dtype=jnp.float32):
    if isinstance(key, HostKey):
      return jnp.asarray(std * key.generator().standard_normal(shape), dtype)
    return std * jax.random.normal(key, shape, dtype)

  return init


def truncated_normal(std: float, bound: float) -> Initializer:
  """timm `trunc_normal_(std=std, a=-bound, b=bound)`: N(0, std^2) cut at absolute +-bound."""

  def init(key, shape, dtype=jnp.float32):
    if isinstance(key, HostKey):
      rng = key.generator()
      out = std * rng.standard_normal(shape)
      bad = np.abs(out) > bound
      while bad.any():  # resample the tail (the cut is at >= 1 sigma: few rounds)
        out[bad] = std * rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > bound
      return jnp.asarray(out, dtype)
    return (std * jax.random.truncated_normal(key, -bound / std, bound / std, shape)).astype(dtype)

  return init


def variance_scaling_uniform(scale: float, mode: str) -> Initializer:
  """U(-b, b), b = sqrt(3 * scale / fan) with fan = fan_in | fan_out | fan_avg."""

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = _fans(shape)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    return uniform(math.sqrt(3.0 * scale / max(fan, 1)))(key, shape, dtype)

  return init


def torch_bias(fan_in: int) -> Initializer:
  """nn.Linear / nn.Conv2d default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return uniform(1.0 / math.sqrt(max(fan_in, 1)))


def zeros(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)
