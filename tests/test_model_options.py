"""Model options that must not change the numbers: rematerialisation."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax import parity


def test_remat_gives_the_same_loss_and_gradients(tiny_dir):
  fixture = parity.load_fixture(tiny_dir)
  inputs = parity.model_inputs(fixture.inputs)
  results = []
  for remat in (False, True):
    config = fixture.model_config.copy_and_resolve_references()
    config.remat = remat
    model = parity.build_converted_model(fixture, config)
    graphdef, params = nnx.split(model.beit3)

    def loss(params):
      tokens = nnx.merge(graphdef, params)(inputs[1], inputs[2], inputs[3], train=True,
                                           rngs=nnx.Rngs(dropout=0))
      return jnp.sum(tokens ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    results.append((float(value), jax.tree_util.tree_leaves(grads)))
  (v0, g0), (v1, g1) = results
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
