"""The keyed-hash bits of dropout, drop path and the loss's points (deris_jax/ops/keyed_bits.py):
uniform, independent, reproducible, drawn per shard, and no threefry in the programs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from deris_jax import losses
from deris_jax.models import layers
from deris_jax.ops import keyed_bits

N = 1 << 20
# chi-square with 255 degrees of freedom: mean 255, sd sqrt(510) ~ 22.6; 8 sd above the mean
# (a broken hash lands in the thousands).
CHI2_LIMIT = 255 + 8 * np.sqrt(510)


def _bits(key: int = 0, count: int = 0, shape=(N,)) -> np.ndarray:
  return np.asarray(jax.jit(keyed_bits.hash_bits, static_argnums=2)(
      jax.random.key(key), jnp.uint32(count), shape))


def _chi2_bytes(values: np.ndarray) -> float:
  counts = np.bincount(values.astype(np.int64), minlength=256)
  expected = values.size / 256
  return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("shift", [0, 8, 16, 24])
def test_bits_are_uniform_in_every_byte(shift):
  bits = _bits()
  assert bits.dtype == np.uint32 and bits.shape == (N,)
  assert _chi2_bytes((bits >> shift) & 0xFF) < CHI2_LIMIT


def test_bits_are_uniform_for_a_small_shape_and_high_counter():
  # drop path draws a handful of bits per call: pool many calls of one stream
  draws = np.concatenate([_bits(3, c, (8,)) for c in range(0, 4096 * 8, 8)])
  assert _chi2_bytes(draws >> 24) < CHI2_LIMIT


def test_neighbours_draws_and_keys_are_independent():
  base = _bits(0, 0)  # (N,) uint32
  others = {"next element": np.roll(base, 1), "next draw": _bits(0, 1), "next key": _bits(1, 0),
            "next column": _bits(0, 0, (1024, 1024)).T.reshape(-1)}
  for name, other in others.items():
    corr = np.corrcoef(base.astype(np.float64), other.astype(np.float64))[0, 1]
    assert abs(corr) < 5 / np.sqrt(N), (name, corr)
    # the bits agree half the time, as for independent draws
    same = np.unpackbits((base ^ ~other).view(np.uint8))
    assert abs(same.mean() - 0.5) < 5 * 0.5 / np.sqrt(same.size), name
  # the bits are a function of the flat index, whatever the shape
  np.testing.assert_array_equal(_bits(0, 0, (1024, 1024)).reshape(-1), base)


def test_keep_rate_and_traced_probability():
  shape = (256, 4096)
  stream = nnx.Rngs(dropout=7).dropout
  keep = np.asarray(keyed_bits.bernoulli(stream, 0.9, shape))
  assert abs(keep.mean() - 0.9) < 5 * np.sqrt(0.09 / keep.size)
  traced = jax.jit(lambda p: keyed_bits.bernoulli(nnx.Rngs(dropout=7).dropout, p, shape))
  np.testing.assert_array_equal(np.asarray(traced(jnp.float32(0.9))), keep)  # same draw
  assert np.asarray(traced(jnp.float32(1.0))).all()
  assert not np.asarray(traced(jnp.float32(0.0))).any()


def test_stream_counter_advances_as_rngs_dropout_does():
  rngs = nnx.Rngs(dropout=0)
  first = np.asarray(layers.dropout(jnp.ones((64, 64)), 0.5, train=True, rngs=rngs))
  assert int(rngs.dropout.count[...]) == 1
  second = np.asarray(layers.dropout(jnp.ones((64, 64)), 0.5, train=True, rngs=rngs))
  assert 0.4 < (first == second).mean() < 0.6  # another draw
  key_after = rngs.dropout()  # the stream goes on where the draws left it
  assert jax.random.key_data(key_after).tolist() == jax.random.key_data(
      jax.random.fold_in(jax.random.key(0), 2)).tolist()
  again = np.asarray(layers.dropout(jnp.ones((64, 64)), 0.5, train=True,
                                    rngs=nnx.Rngs(dropout=0)))
  np.testing.assert_array_equal(again, first)  # a key reproduces its draws (exact resume)
  assert set(np.unique(first)) == {0.0, 2.0}


def test_drop_path_draws_per_sample():
  x = jnp.ones((4096, 3, 5))
  out = np.asarray(layers.drop_path(x, 0.25, train=True, rngs=nnx.Rngs(dropout=1)))
  kept = out[:, 0, 0] > 0
  assert (out == out[:, :1, :1]).all()  # one decision per sample
  assert abs(kept.mean() - 0.75) < 5 * np.sqrt(0.75 * 0.25 / kept.size)


def test_dropout_program_draws_without_threefry():
  """The reason for the hash: the masks compile to elementwise ops, not threefry's loops."""
  x = jnp.ones((8, 16))
  fn = jax.jit(lambda x, k: layers.dropout(x, 0.1, train=True, rngs=nnx.Rngs(dropout=k)))
  lowered = fn.lower(x, jax.random.key(0))
  assert "threefry2x32" not in lowered.as_text()
  assert " while(" not in lowered.compile().as_text()  # XLA:CPU loops over threefry's rounds


def test_sharded_draw_computes_only_its_shard():
  """On a pod each device draws its own rows of the mask (not the global array, then a
  slice), and the draw is the unsharded one."""
  devices = np.array(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  mesh = jax.sharding.Mesh(devices, ("data",))
  rows = NamedSharding(mesh, P("data"))
  x = jax.device_put(jnp.ones((1024, 64)), rows)
  fn = jax.jit(lambda x, k: layers.dropout(x, 0.5, train=True, rngs=nnx.Rngs(dropout=k)),
               out_shardings=rows)
  compiled = fn.lower(x, jax.random.key(0)).compile().as_text()
  assert "[1024,64]" not in compiled and "[128,64]" in compiled
  np.testing.assert_array_equal(
      np.asarray(fn(x, jax.random.key(0))),
      np.asarray(layers.dropout(jnp.ones((1024, 64)), 0.5, train=True,
                                rngs=nnx.Rngs(dropout=0))))


def test_too_many_elements_is_an_error():
  with pytest.raises(ValueError, match="2\\^32"):
    jax.eval_shape(lambda k: keyed_bits.hash_bits(k, jnp.uint32(0), (1 << 16, 1 << 16)),
                   jax.random.key(0))


def test_loss_points_are_uniform_and_drawn_without_threefry():
  counts = losses.point_counts(losses.default_loss_config())
  draw = jax.jit(lambda key: losses.random_points(key, batch_size=2, num_targets=2, num_rounds=4,
                                                  counts=counts))
  assert "threefry2x32" not in draw.lower(jax.random.key(0)).as_text()
  matcher = np.asarray(draw(jax.random.key(0))[0])  # (R, B, P, 2)
  assert matcher.min() >= 0.0 and matcher.max() < 1.0
  assert _chi2_bytes((matcher.reshape(-1) * 256).astype(np.int64)) < CHI2_LIMIT
  # example 1's points are the draw of counter 1 (the batch size does not enter)
  per_round = counts.num_points + 2 * (counts.num_candidates + counts.num_random)
  example_1 = np.asarray(keyed_bits.uniform(jax.random.key(0), jnp.uint32(1), (4, per_round, 2)))
  np.testing.assert_array_equal(matcher[:, 1], example_1[:, :counts.num_points])
