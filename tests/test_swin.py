"""Swin backbone: fixture weights in, every backbone tap of the official model out; the
relative position index buffer; stochastic depth in training only."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deris_jax.convert.torch_to_nnx import load_into
from deris_jax.models import swin
from tests import fixture_values

PREFIX = "perception_branch.hier_vision_encoder."
NCHW_KEYS = ("perception.backbone.patch_embed", "perception.backbone.res")


def build(cfg: dict, drop_path_rate: float = 0.3, dtype="float32") -> swin.SwinTransformer:
  """An abstract model (shapes only: eager random init is slow on CPU), to be loaded."""
  return nnx.eval_shape(lambda: swin.SwinTransformer(
      embed_dim=cfg["embed_dim"], depths=cfg["depths"], num_heads=cfg["num_heads"],
      window_size=cfg["window_size"], patch_size=cfg["patch_size"], mlp_ratio=cfg["mlp_ratio"],
      drop_path_rate=drop_path_rate, dtype=dtype, rngs=nnx.Rngs(0)))


def random_weights(model: nnx.Module, seed: int) -> nnx.Module:
  """Fills an abstract model with small random numpy weights (no jax RNG compile)."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


def jitted_forward(model: swin.SwinTransformer):
  """(state, images, dropout_key or None) -> (outputs, taps); one compile per train flag."""
  graphdef, state = nnx.split(model)

  def forward(state, images, key):
    taps = {}
    rngs = None if key is None else nnx.Rngs(dropout=key)
    outs = nnx.merge(graphdef, state)(images, train=key is not None, rngs=rngs, taps=taps)
    return outs, taps

  return jax.jit(forward), state


@pytest.fixture(scope="module")
def swin_cfg(tiny_dir):
  return json.loads((tiny_dir / "config.json").read_text())["swin"]


@pytest.fixture(scope="module")
def loaded(swin_cfg, tiny_state_dict):
  model = build(swin_cfg)
  sub = {k[len(PREFIX):]: v for k, v in tiny_state_dict.items() if k.startswith(PREFIX)}
  buffers = [k for k in sub if k.endswith("attn.relative_position_index")]
  want = swin.relative_position_index(swin_cfg["window_size"])
  assert len(buffers) == sum(swin_cfg["depths"])
  for k in buffers:
    np.testing.assert_array_equal(sub.pop(k), want, err_msg=k)
  plan = load_into(model, sub, source="deris_tiny/state_dict.safetensors")
  assert not plan.dropped and len(plan.assignments) == len(sub)
  return model


@pytest.fixture(scope="module")
def forward(loaded):
  return jitted_forward(loaded)


@pytest.fixture(scope="module")
def images(tiny_inputs):
  return np.transpose(tiny_inputs["perception_image"], (0, 2, 3, 1))  # NCHW -> NHWC


@pytest.fixture(scope="module")
def eval_run(forward, images):
  fn, state = forward
  return fn(state, images, None)


def test_relative_position_index_values():
  index = swin.relative_position_index(2)
  # Tokens (0,0),(0,1),(1,0),(1,1); index = (dr + 1) * 3 + (dc + 1).
  np.testing.assert_array_equal(index, [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  assert swin.relative_position_index(12).shape == (144, 144)
  assert swin.relative_position_index(12).max() == 23 * 23 - 1


def test_every_backbone_tap_matches_fixture(eval_run, tiny_outputs):
  outs, taps = eval_run
  keys = sorted(k for k in tiny_outputs if k.startswith("perception.backbone."))
  assert keys and set(keys) <= set(taps)  # every backbone tap the fixture holds
  fixture_values.assert_taps_match(taps, tiny_outputs, keys,
                                   lambda key: key.startswith(NCHW_KEYS))
  for i, out in enumerate(outs):
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(taps[f"perception.backbone.res{i + 2}"]))


def test_every_stage_is_padded_and_shifted(swin_cfg, images):
  # The fixture covers the padding path: each stage grid is not a multiple of the window.
  grid = images.shape[1] // swin_cfg["patch_size"]
  sizes = [grid // 2 ** i for i in range(len(swin_cfg["depths"]))]
  assert all(s % swin_cfg["window_size"] for s in sizes), sizes
  mask = swin.shift_attention_mask(sizes[-1], sizes[-1], swin_cfg["window_size"],
                                   swin_cfg["window_size"] // 2)
  assert set(np.unique(mask)) == {0.0, -100.0}


def test_drop_path_schedule(swin_cfg):
  rates = swin.drop_path_rates(0.3, (2, 2, 18, 2))
  assert len(rates) == 24 and rates[0] == 0.0
  np.testing.assert_allclose(rates, np.linspace(0, 0.3, 24), atol=1e-7)
  model = build(swin_cfg)
  got = [blk.drop_path_rate for stage in model.layers for blk in stage.blocks]
  np.testing.assert_allclose(got, np.linspace(0, 0.3, sum(swin_cfg["depths"])), atol=1e-7)


def test_eval_is_deterministic(forward, images, eval_run):
  fn, state = forward
  again, _ = fn(state, images, None)
  for a, b in zip(eval_run[0], again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stochastic_depth_only_in_training():
  # A one-stage model keeps the extra (training) compile cheap; block 1 drops with rate 0.3
  # (the fixture's config.json says "0.3 (inactive in eval)", the official value).
  cfg = dict(embed_dim=8, depths=[2], num_heads=[1], window_size=4, patch_size=4,
             mlp_ratio=2.0)
  fn, state = jitted_forward(random_weights(build(cfg), seed=0))
  images = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype(np.float32)
  eval_a, _ = fn(state, images, None)
  train_a, _ = fn(state, images, jax.random.key(1))
  train_a2, _ = fn(state, images, jax.random.key(1))
  train_b, _ = fn(state, images, jax.random.key(2))
  last = np.asarray(eval_a[-1])
  assert np.abs(np.asarray(train_a[-1]) - last).max() > 1e-2  # paths were dropped
  np.testing.assert_array_equal(np.asarray(train_a[-1]), np.asarray(train_a2[-1]))
  assert np.abs(np.asarray(train_a[-1]) - np.asarray(train_b[-1])).max() > 1e-2
  graphdef, state = nnx.split(build(cfg))
  with pytest.raises(ValueError, match="rngs"):  # training without rngs is an error
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, train=True), state, images)


def test_odd_sizes_are_padded(swin_cfg):
  # 30x42 image, patch 4 -> 8x11 grid (padded from 7.5x10.5), odd maps merged with padding.
  graphdef, state = nnx.split(build(swin_cfg))
  outs = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                        jax.ShapeDtypeStruct((1, 30, 42, 3), jnp.float32))
  assert [o.shape for o in outs] == [(1, 8, 11, 16), (1, 4, 6, 32), (1, 2, 3, 64), (1, 1, 2, 128)]


def test_bfloat16_compute_keeps_float32_params(swin_cfg):
  graphdef, state = nnx.split(build(swin_cfg, dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
  outs = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert all(o.dtype == jnp.bfloat16 for o in outs)


def test_initialisation_is_official():
  # rbg keys: eager random init compiles much faster on CPU than with threefry.
  attn = swin.WindowAttention(96, 7, 3, rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")),
                              dtype=jnp.float32)
  for weight in (attn.qkv.kernel, attn.proj.kernel, attn.relative_position_bias_table):
    np.testing.assert_allclose(np.std(np.asarray(weight[...])), 0.02, rtol=0.1)
  assert attn.relative_position_bias_table.shape == (169, 3)
  assert not np.any(np.asarray(attn.qkv.bias[...])) and not np.any(np.asarray(attn.proj.bias[...]))
