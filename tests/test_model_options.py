"""Model options that must not change the numbers: rematerialisation, scanned BEiT-3 layers."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deris_jax.models import layers
from deris_jax.parity import check


def _beit3_loss_and_grads(fixture, inputs, *, train: bool, **options):
  config = fixture.model_config.copy_and_resolve_references()
  config.update(options)
  model = check.build_converted_model(fixture, config)
  graphdef, params = nnx.split(model.beit3)

  def loss(params):
    tokens = nnx.merge(graphdef, params)(inputs["image_mini"], inputs["text_ids"],
                                         inputs["text_padding_mask"], train=train,
                                         rngs=nnx.Rngs(dropout=0) if train else None)
    return jnp.sum(tokens ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), jax.tree_util.tree_leaves(grads)


def _assert_same_loss_and_grads(got, want):
  (got_value, got_grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(got_value, want_value, rtol=1e-6)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_gives_the_same_loss_and_gradients(tiny_dir):
  fixture = check.load_fixture(tiny_dir)
  inputs = check.model_inputs(fixture.inputs)
  v0, g0 = _beit3_loss_and_grads(fixture, inputs, train=True, remat=False)
  v1, g1 = _beit3_loss_and_grads(fixture, inputs, train=True, remat=True)
  _assert_same_loss_and_grads((v1, g1), (v0, g0))


def test_scanned_layers_give_the_loop_numbers(tiny_dir):
  """scan_layers: the BEiT-3 stack as one lax.scan; eval loss and gradients equal the loop's."""
  fixture = check.load_fixture(tiny_dir)
  assert fixture.model_config.beit3.num_layers > 1  # else the loop runs anyway
  inputs = check.model_inputs(fixture.inputs)
  v0, g0 = _beit3_loss_and_grads(fixture, inputs, train=False, scan_layers=False)
  v1, g1 = _beit3_loss_and_grads(fixture, inputs, train=False, scan_layers=True)
  _assert_same_loss_and_grads((v1, g1), (v0, g0))


def test_scanned_layers_train_with_drop_path_and_remat(tiny_dir):
  """In training the scan draws its own drop-path keys: remat must not change them, and drop
  path must be applied (the loss differs from eval's)."""
  fixture = check.load_fixture(tiny_dir)
  assert fixture.model_config.beit3.drop_path_rate > 0
  inputs = check.model_inputs(fixture.inputs)
  v_eval, _ = _beit3_loss_and_grads(fixture, inputs, train=False, scan_layers=True)
  v0, g0 = _beit3_loss_and_grads(fixture, inputs, train=True, scan_layers=True)
  v1, g1 = _beit3_loss_and_grads(fixture, inputs, train=True, scan_layers=True, remat=True)
  assert np.isfinite(v0) and v0 != v_eval
  _assert_same_loss_and_grads((v1, g1), (v0, g0))


def test_scanned_layers_train_in_bfloat16(tiny_dir):
  """bf16 compute with scanned layers in training: the per-layer drop-path rate is a traced
  float32 scalar and must not promote the bf16 stream (lax.scan needs one carry dtype)."""
  fixture = check.load_fixture(tiny_dir)
  inputs = check.model_inputs(fixture.inputs)
  value, grads = _beit3_loss_and_grads(fixture, inputs, train=True, scan_layers=True,
                                       dtype="bfloat16")
  assert np.isfinite(value)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_drop_path_keeps_the_dtype_with_a_traced_rate():
  x = jnp.ones((4, 3), jnp.bfloat16)
  out = jax.jit(lambda x, rate: layers.drop_path(x, rate, train=True,
                                                 rngs=nnx.Rngs(dropout=0)))(x, jnp.float32(0.5))
  assert out.dtype == jnp.bfloat16 and set(np.unique(np.asarray(out, np.float32))) <= {0.0, 2.0}
