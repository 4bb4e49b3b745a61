"""ops/materialize: the identity in value and gradient, written once on the CPU, absent elsewhere.

The structural test compiles the gradient of a post-norm residual chain (the loopback
decoder's query stream in small) and reads XLA's fused computations: without `materialize`
each layer's fusion recomputes the layers before it (fusions grow with depth); with it, none
does. If a later XLA stops duplicating on its own, the first assertion says so.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax.ops.materialize import materialize, write_once

DEPTH = 8


def _post_norm_chain_loss(params, x, wrap):
  for w, scale in params:
    y = x + jnp.maximum(x @ w, 0.0) @ w.T
    mean = jnp.mean(y, -1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), -1, keepdims=True)
    x = wrap((y - mean) * jax.lax.rsqrt(var + 1e-5) * scale)
  return jnp.sum(x ** 2)


def _chain_inputs(dim=16):
  rng = np.random.default_rng(0)
  params = [(jnp.asarray(rng.normal(0, 0.1, (dim, dim)), jnp.float32),
             jnp.asarray(rng.normal(1, 0.1, (dim,)), jnp.float32)) for _ in range(DEPTH)]
  return params, jnp.asarray(rng.normal(0, 1, (2, 5, dim)), jnp.float32)


def _largest_fusion(wrap) -> int:
  """Instructions in the largest fused computation of the chain's compiled gradient."""
  params, x = _chain_inputs()
  grad = jax.jit(jax.grad(lambda p, v: _post_norm_chain_loss(p, v, wrap)))
  text = grad.lower(params, x).compile().as_text()
  bodies = re.findall(r"^%?fused[\w.\-]* \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", text, re.S | re.M)
  assert bodies, "no fused computations found in the compiled program"
  return max(body.count("\n") + 1 for body in bodies)


def test_values_and_gradients_are_the_identity():
  params, x = _chain_inputs()
  for dtype in (jnp.float32, jnp.bfloat16):
    v = x.astype(dtype) * 3.7
    np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(v), np.float32),
                                  np.asarray(v, np.float32))
  plain = jax.jit(jax.value_and_grad(_post_norm_chain_loss, argnums=(0, 1)), static_argnums=2)
  value, grads = plain(params, x, lambda y: y)
  value_m, grads_m = plain(params, x, materialize)
  assert float(value) == float(value_m)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_m)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_write_once_keeps_integers_and_booleans():
  bits = jnp.arange(2 ** 32 - 10, 2 ** 32, dtype=jnp.uint32)
  np.testing.assert_array_equal(np.asarray(jax.jit(write_once)(bits)), np.asarray(bits))
  mask = jnp.asarray([True, False, True])
  np.testing.assert_array_equal(np.asarray(jax.jit(write_once)(mask)), np.asarray(mask))


def test_residual_chain_fusions_stay_per_layer_on_the_cpu():
  unmaterialized = _largest_fusion(lambda y: y)
  materialized = _largest_fusion(materialize)
  assert unmaterialized > 3 * materialized, (unmaterialized, materialized)
  assert materialized < 80, materialized


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_backends_get_the_plain_identity(platform):
  """Lowered for another platform, the program holds no reduction (no extra pass)."""
  exported = jax.export.export(jax.jit(materialize), platforms=[platform])(
      jax.ShapeDtypeStruct((4, 8), jnp.float32))
  assert "reduce" not in exported.mlir_module()
  cpu = jax.export.export(jax.jit(materialize), platforms=["cpu"])(
      jax.ShapeDtypeStruct((4, 8), jnp.float32))
  assert "reduce" in cpu.mlir_module()
