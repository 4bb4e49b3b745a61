"""`model.scan_layers`: repeated stacks as one lax.scan give the loop's numbers.

Swin stages scan over (regular, shifted) block pairs: the fixture's Swin has one pair per
stage (nothing to scan), so the Swin checks use a small random-weight Swin of depths
(2, 2, 6, 2) (stage 3: three pairs). The pixel decoder uses the fixture's converted weights;
the whole scanned model is checked against the fixture by tests/test_parity.py.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import deris as deris_config
from deris_jax.convert.torch_to_nnx import load_into
from deris_jax.models import pixel_decoder, swin
from deris_jax.models.deris import abstract_model
from tests import fixture_values
from tests import test_pixel_decoder as pd_tests

SWIN = dict(embed_dim=16, depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), window_size=7)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_trees_close(got, want, *, rtol=1e-5, atol=1e-5):
  got = jax.tree_util.tree_flatten_with_path(got)[0]
  want = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def _swin(scan: bool, drop_path_rate: float = 0.3) -> swin.SwinTransformer:
  """The small Swin with the same random weights for both layouts."""
  model = nnx.eval_shape(lambda: swin.SwinTransformer(
      **SWIN, drop_path_rate=drop_path_rate, scan=scan, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


def _swin_loss_fn(model):
  """(params, images, key or None) -> (sum of squares of all outputs, outputs)."""
  graphdef, params = nnx.split(model)

  def loss(params, images, key):
    rngs = None if key is None else nnx.Rngs(dropout=key)
    outs = nnx.merge(graphdef, params)(images, train=key is not None, rngs=rngs)
    return sum(jnp.mean(o.astype(jnp.float32) ** 2) for o in outs), outs

  return loss, params


@pytest.fixture(scope="module")
def swin_images():
  rng = np.random.default_rng(1)
  return jnp.asarray(rng.normal(size=(2, 56, 56, 3)), jnp.float32)


def test_swin_pairs_scan_gives_the_loop_numbers(swin_images):
  """Eval outputs, loss and gradients of the scanned stages equal the loop's."""
  results = []
  for scan in (False, True):
    model = _swin(scan)
    assert [s.scan for s in model.layers] == [scan] * 4
    loss, params = _swin_loss_fn(model)
    (value, outs), grads = jax.jit(jax.value_and_grad(
        lambda p, x: loss(p, x, None), has_aux=True))(params, swin_images)
    results.append((value, outs, grads))
  (v0, o0, g0), (v1, o1, g1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  _assert_trees_close(o1, o0)
  _assert_trees_close(g1, g0, rtol=1e-4, atol=1e-6)
  # The gradients reach every block of the scanned stage, as stored per block.
  assert len(g1["layers"][2]["blocks"]) == 6
  assert all(np.abs(np.asarray(g1["layers"][2]["blocks"][i]["attn"]["qkv"]["kernel"])).max() > 0
             for i in range(6))


def test_swin_pairs_scan_applies_stochastic_depth(swin_images):
  """In training the scanned stage draws drop path per sample and per key: samples that are
  equal in eval differ in training, and different keys give different outputs."""
  images = jnp.broadcast_to(swin_images[:1], (8,) + swin_images.shape[1:])  # 8 equal samples
  model = _swin(True, drop_path_rate=0.5)
  loss, params = _swin_loss_fn(model)
  run = jax.jit(lambda p, x, k: loss(p, x, k)[1])
  evaluated = jax.jit(lambda p, x: loss(p, x, None)[1])(params, images)
  a = run(params, images, jax.random.key(0))[2]  # stage-3 output (B, h, w, C)
  b = run(params, images, jax.random.key(1))[2]
  e = evaluated[2]
  e, a, b = np.asarray(e), np.asarray(a), np.asarray(b)
  assert np.all(np.isfinite(a))
  assert np.abs(e - e[:1]).max() < 1e-5  # equal samples in eval
  assert np.abs(a - a[:1]).max() > 1e-3  # per-sample draws in training
  assert np.abs(a - b).max() > 1e-3  # per-key draws
  assert np.abs(a - e).max() > 1e-3


# --- pixel decoder: the fixture's weights and backbone maps ---------------------------------


@pytest.fixture(scope="module")
def fixture_cfg(tiny_dir):
  return json.loads((tiny_dir / "config.json").read_text())


def _pixel_decoder_run(cfg, state_dict, features, scan: bool):
  """(loss, outputs, taps, grads) of the fixture's pixel decoder; loss = mean squares."""
  model = nnx.eval_shape(lambda: pixel_decoder.MSDeformAttnPixelDecoder(
      **pd_tests.decoder_kwargs(cfg), scan=scan, rngs=nnx.Rngs(0)))
  sub = {k[len(pd_tests.PREFIX):]: v for k, v in state_dict.items()
         if k.startswith(pd_tests.PREFIX)}
  load_into(model, sub, source="deris_tiny/state_dict.safetensors")
  graphdef, params = nnx.split(model)

  def loss(params, features):
    taps = {}
    mask_features, maps = nnx.merge(graphdef, params)(features, taps=taps)
    value = jnp.mean(mask_features ** 2) + sum(jnp.mean(m ** 2) for m in maps)
    return value, ((mask_features, maps), taps)

  (value, (outs, taps)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params,
                                                                                  features)
  return value, outs, taps, grads


def test_pixel_decoder_scan_gives_the_loop_numbers(fixture_cfg, tiny_state_dict, tiny_outputs):
  """The scanned encoder layers: outputs, every tap (the per-layer ones leave the scan
  stacked), loss and gradients equal the loop's, and the taps still match the fixture."""
  assert fixture_cfg["pixel_decoder"]["encoder_layers"] > 1  # else the loop runs anyway
  features = [np.transpose(tiny_outputs[f"perception.backbone.res{i}"], (0, 2, 3, 1))
              for i in range(2, 6)]
  v0, o0, t0, g0 = _pixel_decoder_run(fixture_cfg, tiny_state_dict, features, scan=False)
  v1, o1, t1, g1 = _pixel_decoder_run(fixture_cfg, tiny_state_dict, features, scan=True)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  _assert_trees_close(o1, o0)
  assert sorted(t1) == sorted(t0) and any(".encoder.layer1.msda." in k for k in t1)
  _assert_trees_close(t1, t0)
  _assert_trees_close(g1, g0, rtol=1e-4, atol=1e-6)
  keys = sorted(k for k in tiny_outputs if k.startswith(pd_tests.TAP)
                and not k.endswith(pd_tests.STATIC_KEYS))
  is_map = lambda key: key[len(pd_tests.TAP):].startswith(pd_tests.MAP_KEYS)  # noqa: E731
  fixture_values.assert_taps_match(t1, tiny_outputs, keys, is_map)


# --- the whole model: the switch reaches every stack ----------------------------------------
# The whole scanned model's numbers are checked against the official fixture, every per-layer
# tap included, by tests/test_parity.py (run with the switch off and on); the gradients of each
# scanned stack against its loop above and in tests/test_model_options.py (BEiT-3).


@pytest.mark.parametrize("scan", [False, True])
def test_the_switch_reaches_every_stack(scan):
  """`model.scan_layers` of a released config sets every stack's switch (built abstractly)."""
  config = deris_config.get_config("variant=b,data=refcoco")
  config.model.scan_layers = scan
  model = abstract_model(config.model)
  assert model.beit3.scan_layers is scan and model.pixel_decoder.scan is scan
  assert [stage.scan for stage in model.swin.layers] == [scan] * 4
  assert len(model.swin.layers[2].blocks) == 18  # stage 3: the 9 pairs that are scanned
  assert len(model.pixel_decoder.transformer.encoder.layers) == 6


def test_scanned_swin_and_pixel_decoder_train_in_bfloat16(fixture_cfg, tiny_outputs):
  """bf16 compute with the Swin pairs and encoder layers scanned: the training gradients lower
  (lax.scan needs one carry dtype, so nothing in a body may promote the bf16 stream) and the
  outputs stay bf16. Lowered and shape-evaluated only: nothing is compiled."""
  key = jax.random.key(0)
  model = nnx.eval_shape(lambda: swin.SwinTransformer(
      **SWIN, drop_path_rate=0.3, scan=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  loss, params = _swin_loss_fn(model)
  images = jax.ShapeDtypeStruct((2, 56, 56, 3), jnp.float32)
  _, outs = jax.eval_shape(loss, params, images, key)
  assert {o.dtype for o in outs} == {jnp.dtype(jnp.bfloat16)}
  jax.jit(jax.grad(lambda p, x, k: loss(p, x, k)[0])).lower(params, images, key)

  decoder = nnx.eval_shape(lambda: pixel_decoder.MSDeformAttnPixelDecoder(
      **pd_tests.decoder_kwargs(fixture_cfg), scan=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(decoder)
  features = [jax.ShapeDtypeStruct(np.transpose(tiny_outputs[f"perception.backbone.res{i}"],
                                                (0, 2, 3, 1)).shape, jnp.float32)
              for i in range(2, 6)]

  def decoder_loss(params, features):
    mask_features, maps = nnx.merge(graphdef, params)(features)
    return jnp.mean(mask_features.astype(jnp.float32) ** 2), (mask_features, maps)

  _, (mask_features, maps) = jax.eval_shape(decoder_loss, params, features)
  assert {x.dtype for x in [mask_features, *maps]} == {jnp.dtype(jnp.bfloat16)}
  jax.jit(jax.grad(lambda p, f: decoder_loss(p, f)[0])).lower(params, features)
