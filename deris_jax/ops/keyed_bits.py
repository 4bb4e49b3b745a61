"""Random bits from a keyed integer hash for dropout and the loss's points: no threefry.

Why (issue 14, BENCHMARKS.md "Random bits from a keyed hash"): `jax.random.bernoulli` draws
through threefry, which XLA:CPU runs as a `while` loop of 5 iterations per hash, each its own
kernels, and a stream's `rngs.dropout()` is a second threefry (`fold_in`): 231 of the scanned
DeRIS-B gradient's 3,355 fused computations. Drawn by the hash, the training programs compile
in ~10% less time (the default job's step 38 -> 33 s, the tiny one 36 -> 31 s, the scanned
DeRIS-B gradient 24.4 -> 22.8 s on average, alternating runs). Here a draw is
an integer hash of the element's flat index, keyed by the stream's key and counter: a few
multiplies and shifts that XLA fuses into the mask's consumer. The loss's random points
(`losses.random_points`, ~2% of the default job's step in threefry) draw the same way.

The hash is `lowbias32` (a 32-bit bijection: xor-shift, multiply, twice) applied in three
keyed rounds. Dropout needs independent, uniform, reproducible bits, not a cryptographic
stream; tests/test_keyed_bits.py checks uniformity, the keep rate, independence across
elements, draws and keys, and that a sharded draw computes only its own shard (iota is
partitioned like any elementwise op, so on a pod each device draws only its own masks).

Streams: a draw reads the `nnx.RngStream`'s key and counter and advances the counter, as
`rngs.dropout()` does, so successive draws differ and a key reproduces its draws exactly
(exact resume). The bits differ from `jax.random`'s: the same law, other draws.
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads counters and key words apart
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers


def _lowbias32(x: jax.Array) -> jax.Array:
  """A bijection of uint32 with low avalanche bias (x's shape)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(_MUL1)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(_MUL2)
  return x ^ (x >> 16)


def _seeds(key: jax.Array, count: jax.Array):
  """Three uint32 scalars from a PRNG key (any implementation's words) and a draw counter."""
  words = jax.random.key_data(key).reshape(-1)  # (2,) threefry, (4,) rbg
  seed = _lowbias32(count.astype(jnp.uint32) + jnp.uint32(_GOLDEN))
  for i in range(words.shape[0]):
    seed = _lowbias32(seed ^ words[i])
  return seed, _lowbias32(seed + jnp.uint32(_GOLDEN)), _lowbias32(seed ^ jnp.uint32(_MUL2))


def hash_bits(key: jax.Array, count: jax.Array, shape: Sequence[int]) -> jax.Array:
  """uint32 bits of `shape`, a function of (key, count, flat element index) only."""
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f"keyed_bits: {size} elements in {shape}; the index hash counts to 2^32")
  s0, s1, s2 = _seeds(key, count)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)  # flat element index
  x = _lowbias32(index ^ s0)
  x = _lowbias32(x + s1)
  return _lowbias32(x ^ s2)  # shape


def draw_bits(stream: nnx.RngStream, shape: Sequence[int]) -> jax.Array:
  """uint32 bits of `shape` from the stream's key and counter; advances the counter."""
  count = stream.count[...]
  bits = hash_bits(stream.key[...], count, shape)
  # Not `stream.count[...] = ...`: flax then compares the new value's sharding with the old
  # one's, and a tracer asked for its sharding builds an error message (~20 ms of tracing).
  stream.count.set_value(count + 1)
  return bits


def _to_unit(bits: jax.Array) -> jax.Array:
  """float32 in [0, 1) from the top 23 bits (a float32's mantissa), as `jax.random.uniform`."""
  return (bits >> 9).astype(jnp.float32) * (1.0 / (1 << 23))


def uniform(key: jax.Array, count: jax.Array, shape: Sequence[int]) -> jax.Array:
  """float32 uniform in [0, 1) of `shape`, a function of (key, count, flat index) only."""
  return _to_unit(hash_bits(key, count, shape))


def bernoulli(stream: nnx.RngStream, p, shape: Sequence[int]) -> jax.Array:
  """bool of `shape`, True with probability `p` (a float or a traced scalar), as
  `jax.random.bernoulli` decides it: a uniform in [0, 1) below `p`."""
  return _to_unit(draw_bits(stream, shape)) < jnp.asarray(p, jnp.float32)  # shape
