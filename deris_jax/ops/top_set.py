"""The indices of each row's k largest values, as a set in increasing index order.

PointRend's importance sampling (`losses.select_uncertain_points`) keeps the k most uncertain
of C candidate points of every mask. The loss is a mean over the kept points, so which points
are kept matters and their order does not. `lax.top_k` also sorts the k values, and XLA:CPU
runs it as a sort-like custom call: 3.4 ms for 128 rows of 768 -> 192 on 2 cores, ~16 ms of the
default job's train step's thread time (BENCHMARKS.md "The loss without a sort and with its
rounds vmapped").

On the CPU `top_set` sorts nothing. Each row's k-th largest value comes from a bitwise binary
search over order-preserving integer keys of the values (32 counting passes). The k chosen
indices are the larger values plus the lowest-indexed ties, as in a stable descending sort.
Their slots come from a prefix sum (two small products) and a binary search (1.4 ms for the
shape above). Other backends take `lax.top_k` and sort its k indices (XLA's TopK keeps the
lower index among equal values), so every backend returns the same indices. Values compare as
numbers (-0.0 equals 0.0); NaN is not supported.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

_BLOCK = 32  # the prefix sum's block: products of (R, C/32, 32) x (32, 32) and (R, C/32)^2
_MAX_ROW = 1 << 24  # float32 counts stay exact below this row length


def _order_keys(values: jax.Array) -> jax.Array:
  """(R, C) float -> (R, C) uint32 whose unsigned order is the values' numeric order."""
  values = values.astype(jnp.float32)
  values = jnp.where(values == 0, jnp.zeros_like(values), values)  # -0.0 -> 0.0
  bits = lax.bitcast_convert_type(values, jnp.uint32)  # (R, C)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))  # (R, C)


def _largest_passing(passes, num_bits: int, rows: int, dtype) -> jax.Array:
  """(rows,) the largest t in [0, 2**num_bits) with passes(t) True, bit by bit from the top.

  passes: (rows,) candidate -> (rows,) bool, True for every t up to some bound (monotone).
  """
  def set_bit(i, prefix):  # prefix (rows,)
    candidate = prefix | (jnp.asarray(1, dtype) << (num_bits - 1 - i).astype(dtype))  # (rows,)
    return jnp.where(passes(candidate), candidate, prefix)

  return lax.fori_loop(0, num_bits, set_bit, jnp.zeros((rows,), dtype))


def _kth_largest(keys: jax.Array, k: int) -> jax.Array:
  """(R, C) uint32 -> (R, 1): the largest t with count(keys >= t) >= k, the k-th largest key."""
  def at_least_k(t):  # (R,) -> (R,)
    return jnp.sum(keys >= t[:, None], axis=1) >= k

  return _largest_passing(at_least_k, 32, keys.shape[0], jnp.uint32)[:, None]  # (R, 1)


def _first_ties(equal: jax.Array, need: jax.Array) -> jax.Array:
  """(R, C) bool, (R, 1) -> (R, C) bool: the first `need` True entries of each row."""
  index = jnp.arange(equal.shape[1], dtype=jnp.int32)  # (C,)

  def at_most_need(cut):  # (R,) -> (R,): count(equal & index < cut) <= need
    return jnp.sum(equal & (index < cut[:, None]), axis=1) <= need[:, 0]

  cut = _largest_passing(at_most_need, equal.shape[1].bit_length(), equal.shape[0],
                         jnp.int32)  # (R,)
  return equal & (index < cut[:, None])  # (R, C)


def _prefix_sums(chosen: jax.Array) -> jax.Array:
  """(R, C) bool -> (R, C) int32 inclusive running counts, by blockwise products."""
  rows, length = chosen.shape
  num_blocks = -(-length // _BLOCK)
  padded = jnp.pad(chosen.astype(jnp.float32), ((0, 0), (0, num_blocks * _BLOCK - length)))
  blocks = padded.reshape(rows, num_blocks, _BLOCK)  # (R, nb, 32)
  upper = jnp.triu(jnp.ones((_BLOCK, _BLOCK), jnp.float32))  # (32, 32)
  within = jnp.einsum("rbi,ij->rbj", blocks, upper,
                      precision=lax.Precision.HIGHEST)  # (R, nb, 32)
  strictly_upper = jnp.triu(jnp.ones((num_blocks, num_blocks), jnp.float32), 1)  # (nb, nb)
  before = jnp.einsum("rb,bc->rc", within[:, :, -1], strictly_upper,
                      precision=lax.Precision.HIGHEST)  # (R, nb)
  sums = (within + before[:, :, None]).reshape(rows, num_blocks * _BLOCK)[:, :length]
  return sums.astype(jnp.int32)  # (R, C)


def _top_set_by_search(values: jax.Array, k: int) -> jax.Array:
  keys = _order_keys(values)  # (R, C)
  threshold = _kth_largest(keys, k)  # (R, 1)
  greater = keys > threshold  # (R, C)
  need = k - jnp.sum(greater, axis=1, keepdims=True, dtype=jnp.int32)  # (R, 1), >= 1
  chosen = greater | _first_ties(keys == threshold, need)  # (R, C), k per row
  running = _prefix_sums(chosen)  # (R, C)
  slots = jnp.arange(1, k + 1, dtype=jnp.int32)  # (k,)
  return jax.vmap(lambda row: jnp.searchsorted(row, slots))(running).astype(jnp.int32)


def _top_set_by_top_k(values: jax.Array, k: int) -> jax.Array:
  return jnp.sort(lax.top_k(values, k)[1], axis=-1).astype(jnp.int32)  # (R, k)


def top_set(values: jax.Array, k: int) -> jax.Array:
  """(..., C) floating values -> (..., k) int32: the indices of each row's k largest values,
  ties to the lower index, in increasing order (the set `lax.top_k` chooses)."""
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise ValueError(f"top_set: values must be floating point, got {values.dtype}")
  if values.ndim < 1:
    raise ValueError("top_set: values must have at least one axis (the row), got a scalar")
  length = values.shape[-1]
  if not isinstance(k, int) or not 0 <= k <= length:
    raise ValueError(f"top_set: k={k!r} must be an int in [0, {length}] (the row length)")
  if length >= _MAX_ROW:
    raise ValueError(f"top_set: rows of {length} values are too long (at most {_MAX_ROW - 1})")
  batch_shape = values.shape[:-1]
  if k == length:
    return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), batch_shape + (k,))
  if k == 0:
    return jnp.zeros(batch_shape + (0,), jnp.int32)
  rows = values.reshape(-1, length)  # (R, C)
  indices = lax.platform_dependent(
      rows, cpu=functools.partial(_top_set_by_search, k=k),
      default=functools.partial(_top_set_by_top_k, k=k))  # (R, k)
  return indices.reshape(batch_shape + (k,))
