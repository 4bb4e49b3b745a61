"""ops/top_set: the indices of each row's k largest values, as a set in index order; the same
set as a stable descending sort (and as lax.top_k), ties to the lower index, any row length."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax.ops import top_set


def _expected(values: np.ndarray, k: int) -> np.ndarray:
  """The first k of a stable descending sort of each row, in increasing index order."""
  rows = values.reshape(-1, values.shape[-1]).astype(np.float64)
  chosen = [np.sort(np.argsort(-row, kind="stable")[:k]) for row in rows]
  return np.asarray(chosen, np.int32).reshape(values.shape[:-1] + (k,))


def _values(shape, seed, ties=False):
  rng = np.random.default_rng(seed)
  values = rng.normal(size=shape).astype(np.float32)
  if ties:  # a third of the entries on a few integers: many ties at the threshold
    values[..., ::3] = np.round(values[..., ::3])
  return values


@pytest.mark.parametrize("shape,k", [((128, 768), 192), ((3, 30), 7), ((2, 5, 37), 9),
                                     ((4, 64), 1), ((4, 64), 63), ((1, 1), 1), ((6, 33), 32)])
@pytest.mark.parametrize("ties", [False, True])
def test_the_set_of_a_stable_descending_sort(shape, k, ties):
  values = _values(shape, sum(shape) + k, ties)
  got = jax.jit(top_set.top_set, static_argnums=1)(jnp.asarray(values), k)
  assert got.dtype == jnp.int32 and got.shape == shape[:-1] + (k,)
  np.testing.assert_array_equal(np.asarray(got), _expected(values, k))


def test_the_same_set_as_lax_top_k():
  values = jnp.asarray(_values((16, 500), 3))
  got = top_set.top_set(values, 125)
  np.testing.assert_array_equal(got, jnp.sort(jax.lax.top_k(values, 125)[1], axis=-1))


def test_equal_values_and_extremes():
  """All-equal rows take the first k; -0.0 equals 0.0; infinities and the largest floats order
  as numbers."""
  big = np.finfo(np.float32).max
  values = np.array([[2.0] * 8,
                     [0.0, -0.0, 0.0, -0.0, -1.0, 1.0, -0.0, 0.0],
                     [-np.inf, big, -big, np.inf, 0.0, 1e-38, -1e-45, 3.0]], np.float32)
  got = np.asarray(top_set.top_set(jnp.asarray(values), 3))
  np.testing.assert_array_equal(got, [[0, 1, 2], [0, 1, 5], [1, 3, 7]])


def test_bfloat16_and_leading_axes():
  values = jnp.asarray(_values((2, 3, 50), 4, ties=True), jnp.bfloat16)
  got = top_set.top_set(values, 11)
  np.testing.assert_array_equal(got, _expected(np.asarray(values, np.float32), 11))


def test_all_and_none():
  values = jnp.asarray(_values((3, 9), 5))
  np.testing.assert_array_equal(top_set.top_set(values, 9), np.tile(np.arange(9), (3, 1)))
  assert top_set.top_set(values, 0).shape == (3, 0)


def test_under_vmap():
  values = _values((4, 3, 40), 6, ties=True)
  got = jax.vmap(lambda v: top_set.top_set(v, 10))(jnp.asarray(values))
  np.testing.assert_array_equal(got, _expected(values, 10))


def test_the_cpu_program_has_no_top_k():
  """The branch this module is for is taken on the CPU: no TopK custom call, no sort."""
  hlo = jax.jit(top_set.top_set, static_argnums=1).lower(
      jnp.zeros((8, 96)), 24).compile().as_text()
  assert "TopK" not in hlo and " sort(" not in hlo


@pytest.mark.parametrize("values,k,match", [
    (jnp.zeros((2, 5), jnp.int32), 2, "floating point, got int32"),
    (jnp.zeros(()), 0, "at least one axis"),
    (jnp.zeros((2, 5)), 6, r"k=6 must be an int in \[0, 5\]"),
    (jnp.zeros((2, 5)), -1, r"k=-1 must be"),
    (jnp.zeros((2, 5)), 2.0, r"k=2.0 must be an int")])
def test_bad_arguments(values, k, match):
  with pytest.raises(ValueError, match=match):
    top_set.top_set(values, k)
