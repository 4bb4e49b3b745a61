"""Shared set-up of the evaluation and prediction tests: data, configs, checkpoints, a fake model.

- `prepare_synthetic`: the tiny synthetic set (24 val / 24 test expressions on 32x32 images).
- `tiny_config`: the fixture's DeRIS (its config.json) on that set, images resized to the
  model's 128x128 / 64x64 inputs, with an eval section.
- `write_train_like_checkpoint`: the fixture weights in the layout train.py leaves (params +
  meta items, kind 'train', a later step, plus an extra item the way optimizer state is).
- `FakeDeris`: a cheap stand-in with DeRIS's call signature (compiles in a second), whose
  scores mix the samples of query_SA-like groups, to test the loop itself.
"""
import pathlib
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configs import data_common, eval_common
from deris_jax import checkpoints
from deris_jax.convert import deris_checkpoint
from deris_jax.data import prepare
from tests import fixture_values

TRAIN_STEP = 7


def prepare_synthetic(root: pathlib.Path) -> str:
  data_dir = str(root / "tfds")
  prepare.prepare("synthetic", data_dir=data_dir, config="tiny")
  return data_dir


def synthetic_data(data_dir: str, image_size=(32, 32), cognition_image_size=(32, 32)):
  data = data_common.synthetic_data("tiny")
  data.data_dir = data_dir
  data.image_size = tuple(image_size)
  data.cognition_image_size = tuple(cognition_image_size)
  data.canvas_size = (32, 32)  # the synthetic images are 32x32
  return data


def tiny_config(data_dir: str, **eval_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({"model": fixture_values.model_config()})
  config.data = synthetic_data(data_dir, config.model.image_size,
                               config.model.cognition_image_size)
  config.eval = eval_common.eval_config("synthetic", config.data,
                                        **{"batch_size": 8, **eval_overrides})
  return config


CONFIG_FILE = '''
import sys
sys.path.insert(0, {root!r})
from tests import eval_helpers

def get_config(arg=None):
  return eval_helpers.tiny_config({data_dir!r})
'''


def write_config_file(path: pathlib.Path, data_dir: str) -> str:
  """A config file (for the command lines) returning `tiny_config(data_dir)`."""
  path.write_text(CONFIG_FILE.format(root=str(pathlib.Path(__file__).parents[1]),
                                     data_dir=data_dir))
  return str(path)


def write_train_like_checkpoint(directory: pathlib.Path, state_dict, config) -> str:
  params, _ = deris_checkpoint.convert_state_dict(state_dict, config.model, source="fixture")
  with checkpoints.manager(directory, create=True) as mngr:
    mngr.save(TRAIN_STEP, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"kind": "train", "config": config.to_dict(),
                                "step": TRAIN_STEP}),
        opt_state=ocp.args.StandardSave({"count": np.asarray(TRAIN_STEP, np.int32)})),
        force=True)
    mngr.wait_until_finished()
  return str(directory)


class FakeDeris(nnx.Module):
  """DeRIS's interface with closed-form outputs.

  Query n's mask logit is 4 * (red - blue - offset_n) (red shapes light up); its referring
  logit depends on the expression's ids and, like the official query_SA, on the mean of that
  over each group of `group` consecutive samples (padding included, if it is in the group).
  """

  def __init__(self, num_queries: int = 4, group: int = 1):
    self.offsets = nnx.Param(jnp.linspace(-1.0, 1.5, num_queries))
    self.group = group

  def __call__(self, image, image_mini, text_ids, text_padding, *, train=False, rngs=None,
               taps=None):
    del image_mini, train, rngs, taps
    return types.SimpleNamespace(**fake_outputs(image, text_ids, text_padding,
                                                self.offsets[...], self.group, jnp))


def fake_outputs(image, text_ids, text_padding, offsets, group, xp):
  """FakeDeris's outputs with numpy (xp=np) or jax.numpy (xp=jnp)."""
  b = image.shape[0]
  red = image[..., 0] - image[..., 2]  # (B, H, W)
  pred_masks = 4.0 * (red[:, None] - offsets[None, :, None, None])  # (B, N, H, W)
  text = xp.sum(xp.where(text_padding > 0, 0, text_ids), axis=1).astype(xp.float32)  # (B,)
  g = min(group, b)
  group_mean = xp.repeat(text.reshape(b // g, g).mean(axis=1), g)  # (B,)
  num_queries = offsets.shape[0]
  phase = xp.arange(num_queries, dtype=xp.float32)[None] * 0.3  # (1, N)
  logit = 2.0 * xp.sin(0.53 * text[:, None] + phase) + 0.01 * group_mean[:, None]  # (B, N)
  refer_logits = xp.stack([logit, -logit], axis=-1)  # (B, N, 2)
  existence_logit = (0.5 * (text % 7 - 3))[:, None]  # (B, 1)
  return dict(pred_masks=pred_masks.astype(xp.float32), refer_logits=refer_logits,
              existence_logit=existence_logit)


def fake_config(data_dir: str, *, group: int = 1, batch_size: int = 8,
                **eval_overrides) -> ml_collections.ConfigDict:
  """Synthetic data at 32x32 and the fields of a model section `evaluate` reads."""
  config = ml_collections.ConfigDict()
  config.data = synthetic_data(data_dir)
  config.model = ml_collections.ConfigDict(dict(
      image_size=(32, 32), cognition_image_size=(32, 32), max_tokens=config.data.max_tokens,
      reference_compat=True, compat_group_size=group, existence_veto=False,
      existence_threshold=0.5))
  config.eval = eval_common.eval_config("synthetic", config.data, batch_size=batch_size,
                                        **eval_overrides)
  return config
