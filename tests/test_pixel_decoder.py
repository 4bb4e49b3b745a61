"""MSDeformAttn pixel decoder: the fixture's backbone maps and weights in, every pixel-decoder
tap of the official model out; the sine position code; the official initialisation."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deris_jax.convert.torch_to_nnx import load_into
from deris_jax.models import deform_attn, pixel_decoder, position
from tests import fixture_values

PREFIX = "perception_branch.pixel_decoder."
TAP = "perception.pixel_decoder."
MAP_KEYS = ("input_proj.", "fpn.", "mask_features", "multi_scale_features.")  # NCHW in fixture
STATIC_KEYS = ("spatial_shapes", "level_start_index", "valid_ratios")


def decoder_kwargs(cfg: dict) -> dict:
  pd = cfg["pixel_decoder"]
  return dict(in_channels=cfg["swin"]["stage_channels"], conv_dim=pd["conv_dim"],
              mask_dim=pd["mask_dim"], num_heads=pd["nheads"], num_points=pd["n_points"],
              num_layers=pd["encoder_layers"], ffn_dim=pd["dim_feedforward"],
              num_groups=pd["groupnorm_groups"])


@pytest.fixture(scope="module")
def cfg(tiny_dir):
  return json.loads((tiny_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def features(tiny_outputs):
  return [np.transpose(tiny_outputs[f"perception.backbone.res{i}"], (0, 2, 3, 1))
          for i in range(2, 6)]  # NCHW -> NHWC


@pytest.fixture(scope="module")
def loaded_state(cfg, tiny_state_dict):
  """(graphdef, fp32 state) of the decoder with the fixture weights."""
  model = nnx.eval_shape(lambda: pixel_decoder.MSDeformAttnPixelDecoder(
      **decoder_kwargs(cfg), rngs=nnx.Rngs(0)))
  sub = {k[len(PREFIX):]: v for k, v in tiny_state_dict.items() if k.startswith(PREFIX)}
  plan = load_into(model, sub, source="deris_tiny/state_dict.safetensors")
  assert not plan.dropped and len(plan.assignments) == len(sub) > 0
  return nnx.split(model)


def run(graphdef, state, features):
  taps = {}
  mask_features, multi_scale = nnx.merge(graphdef, state)(features, taps=taps)
  return mask_features, multi_scale, taps


@pytest.fixture(scope="module")
def outputs(loaded_state, features):
  graphdef, state = loaded_state
  return jax.jit(lambda s, f: run(graphdef, s, f))(state, features)


def test_every_pixel_decoder_tap_matches_fixture(outputs, tiny_outputs):
  mask_features, multi_scale, taps = outputs
  keys = sorted(k for k in tiny_outputs if k.startswith(TAP) and not k.endswith(STATIC_KEYS))
  assert keys and set(keys) <= set(taps)  # every pixel-decoder tap the fixture holds
  fixture_values.assert_taps_match(taps, tiny_outputs, keys,
                                   lambda key: key[len(TAP):].startswith(MAP_KEYS))
  np.testing.assert_array_equal(np.asarray(mask_features), np.asarray(taps[TAP + "mask_features"]))
  for i, m in enumerate(multi_scale):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(taps[f"{TAP}multi_scale_features.{i}"]))


def test_static_metadata_matches_fixture(features, tiny_outputs):
  pre = TAP + "encoder."
  shapes = tuple((f.shape[1], f.shape[2]) for f in features[:0:-1])  # res5, res4, res3
  np.testing.assert_array_equal(shapes, tiny_outputs[pre + "spatial_shapes"])
  np.testing.assert_array_equal(deform_attn.level_start_index(shapes),
                                tiny_outputs[pre + "level_start_index"])
  assert np.all(tiny_outputs[pre + "valid_ratios"] == 1.0)  # no padding: the port assumes it
  np.testing.assert_array_equal(pixel_decoder.reference_points(shapes)[0],
                                tiny_outputs[pre + "reference_points"][0])


def test_sine_position_2d():
  code = position.sine_position_2d(3, 5, 4)  # (H, W, 8): 4 row channels, then 4 column ones
  assert code.shape == (3, 5, 8) and code.dtype == np.float32
  row = (np.arange(1, 4) / (3 + 1e-6) * 2 * math.pi)[:, None]  # (3, 1)
  col = (np.arange(1, 6) / (5 + 1e-6) * 2 * math.pi)[None, :]  # (1, 5)
  dim_t = 10000.0 ** (np.array([0, 0, 2, 2]) / 4)
  for c, fn in enumerate((np.sin, np.cos, np.sin, np.cos)):
    np.testing.assert_allclose(code[:, :, c], np.broadcast_to(fn(row / dim_t[c]), (3, 5)),
                               atol=1e-6)
    np.testing.assert_allclose(code[:, :, 4 + c], np.broadcast_to(fn(col / dim_t[c]), (3, 5)),
                               atol=1e-6)
  raw = position.sine_position_2d(2, 2, 2, normalize=False)
  np.testing.assert_allclose(raw[1, 0], [np.sin(2.0), np.cos(2.0), np.sin(1.0), np.cos(1.0)],
                             atol=1e-6)
  with pytest.raises(ValueError, match="even"):
    position.sine_position_2d(2, 2, 3)


def test_bfloat16_compute_stays_close(cfg, loaded_state, features, outputs):
  # Same float32 weights, bf16 compute dtype.
  g16, _ = nnx.split(nnx.eval_shape(lambda: pixel_decoder.MSDeformAttnPixelDecoder(
      **decoder_kwargs(cfg), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
  mask16, multi16, _ = jax.jit(lambda s, f: run(g16, s, f))(loaded_state[1], features)
  assert mask16.dtype == jnp.bfloat16 and multi16[0].dtype == jnp.bfloat16
  ref = np.asarray(outputs[0])
  err = np.abs(np.asarray(mask16.astype(jnp.float32)) - ref).max() / np.abs(ref).max()
  assert err < 0.05, err


def test_initialisation_is_official(cfg):
  kwargs = {**decoder_kwargs(cfg), "num_layers": 1}
  # rbg keys: eager random init compiles much faster on CPU than with threefry.
  model = pixel_decoder.MSDeformAttnPixelDecoder(
      **kwargs, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")))
  c = kwargs["conv_dim"]
  zero_biases = [model.mask_features.bias, model.adapter_1[0].bias, model.layer_1[0].bias]
  zero_biases += [proj[0].bias for proj in model.input_proj]
  assert all(not np.any(np.asarray(b[...])) for b in zero_biases)
  # xavier on input_proj (fan_in + fan_out = Cin + C), c2_xavier (kaiming a=1) elsewhere.
  res5_in = kwargs["in_channels"][3]
  kernel = np.asarray(model.input_proj[0][0].kernel[...])
  assert kernel.shape == (1, 1, res5_in, c)
  bound = math.sqrt(6 / (res5_in + c))
  assert 0.8 * bound < np.abs(kernel).max() <= bound
  kernel = np.asarray(model.layer_1[0].kernel[...])
  bound = math.sqrt(3 / (9 * c))
  assert 0.8 * bound < np.abs(kernel).max() <= bound
  level_embed = np.asarray(model.transformer.level_embed[...])
  assert level_embed.shape == (3, c) and 0.5 < level_embed.std() < 1.5  # normal(0, 1)
  layer = model.transformer.encoder.layers[0]
  linear1 = np.asarray(layer.linear1.kernel[...])
  assert np.abs(linear1).max() <= math.sqrt(6 / (c + kwargs["ffn_dim"]))
  assert np.any(np.asarray(layer.linear1.bias[...]))  # torch default bias, not zeroed
  np.testing.assert_allclose(np.asarray(layer.self_attn.sampling_offsets.bias[...]),
                             deform_attn._grid_init_bias(kwargs["num_heads"], 3,
                                                         kwargs["num_points"]))


def test_rejects_wrong_inputs(cfg):
  with pytest.raises(ValueError, match="res2, res3, res4, res5"):
    pixel_decoder.MSDeformAttnPixelDecoder(**{**decoder_kwargs(cfg), "in_channels": [16, 32, 64]},
                                           rngs=nnx.Rngs(0))
