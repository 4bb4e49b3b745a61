"""benchmarks/kernels.py: fused computations counted as XLA:CPU compiles them, once per distinct
computation (equal up to value names and metadata; a called reduction counts by its body)."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import kernels


def _stats(fn, *shapes):
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  return kernels.fusion_stats(jax.jit(fn).lower(*args).compile().as_text())


def test_copies_of_one_computation_count_once():
  twice = lambda x, y: (jnp.sin(x) * 2 + 1, jnp.sin(y) * 2 + 1)  # noqa: E731
  assert _stats(twice, (64, 64), (64, 64)) == dict(fusions=2, distinct_fusions=1)
  assert _stats(twice, (64, 64), (32, 64)) == dict(fusions=2, distinct_fusions=2)  # shapes


def test_a_called_reduction_counts_by_its_body():
  sums = lambda x, y: (jnp.exp(x).sum(-1), jnp.exp(y).sum(-1))  # noqa: E731
  sum_and_max = lambda x, y: (jnp.exp(x).sum(-1), jnp.exp(y).max(-1))  # noqa: E731
  assert _stats(sums, (64, 64), (64, 64)) == dict(fusions=2, distinct_fusions=1)
  assert _stats(sum_and_max, (64, 64), (64, 64)) == dict(fusions=2, distinct_fusions=2)


def test_a_fusion_of_a_missing_computation_is_an_error():
  text = ("ENTRY %main (p: f32[4]) -> f32[4] {\n"
          "  %p = f32[4]{0} parameter(0)\n"
          "  ROOT %f = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_missing\n}")
  with pytest.raises(ValueError, match="fused_missing"):
    kernels.fusion_stats(text)
