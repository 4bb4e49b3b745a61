"""The scanned stacks held stacked in the train state (deris_jax/models/stack_layout.py).

Unit checks on abstract models (where the stacks are, exact round trips, shardings, the rules
that must treat every layer alike), a checkpoint of a stacked state (one subtree per layer on
disk, as eval.py, the predictor and the converter read it; restored exactly), then the
training loop of a micro DeRIS whose stacks scan (2 BEiT-3 layers, 2 encoder layers, a Swin
stage of 2 pairs), stopped and resumed: its losses and parameters equal the loop layout's run.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs import deris as deris_config
from deris_jax import checkpoints
from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.config_loader import load_config
from deris_jax.data import prepare
from deris_jax.models import stack_layout
from deris_jax.models.deris import abstract_model
from deris_jax.train import checkpointing
from deris_jax.train import loop
from deris_jax.train import params as params_lib
from deris_jax.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The micro DeRIS with stacks to scan; no drop path, so the scan's keys (other draws than the
# loop's) do not enter and the two layouts must give the same numbers.
STACKS = ["model.beit3.num_layers=2", "model.pixel_decoder.num_layers=2",
          "model.swin.depths=(1,1,4,1)", "model.beit3.drop_path_rate=0.0",
          "model.swin.drop_path_rate=0.0"]


def _micro(*overrides):
  return load_config(str(ROOT / "configs" / "deris_micro.py"), [*STACKS, *overrides])


def _trainer(config, devices=None):
  mesh = S.make_mesh(config.mesh, devices or jax.devices()[:1])
  return state_lib.make_trainer(config, mesh, steps_per_epoch=9)


def test_the_released_model_holds_its_three_stacks_stacked():
  config = deris_config.get_config("variant=b,data=refcoco")
  trainer = _trainer(config)
  assert [(s.name(), [len(g) for g in s.groups]) for s in trainer.layout.stacks] == [
      ("beit3.encoder.layers", [12]), ("pixel_decoder.transformer.encoder.layers", [6]),
      ("swin.layers.2.blocks", [9, 9])]
  stacked = trees.named_leaves(trainer.abstract_state.params)
  stored = trees.named_leaves(trainer.stored_abstract_state().params)
  assert len(stored) == len(trees.named_leaves(params_lib.model_params(
      abstract_model(config.model))))
  assert sum(np.prod(a.shape) for a in stacked.values()) == sum(
      np.prod(a.shape) for a in stored.values())
  qkv = "swin.layers.2.blocks.scan1.attn.qkv.kernel"  # the shifted blocks 1, 3, ..., 17
  assert stacked[qkv].shape == (9,) + stored["swin.layers.2.blocks.1.attn.qkv.kernel"].shape
  assert not [n for n in stacked if ".layers.0." in n and n.startswith("beit3.encoder")]
  # Without the switch nothing is stacked: the state's layout is the stored one.
  assert not _trainer(_micro("model.scan_layers=false")).layout


def test_stack_and_unstack_are_exact_inverses():
  model = abstract_model(_micro("model.scan_layers=true").model)
  layout = stack_layout.StackLayout.of(model)
  assert [s.name() for s in layout.stacks] == [
      "beit3.encoder.layers", "pixel_decoder.transformer.encoder.layers", "swin.layers.2.blocks"]
  rng = np.random.default_rng(0)
  stored = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                        params_lib.model_params(model))
  stacked = layout.stack(stored)
  swin = stacked["swin"]["layers"][2]["blocks"]
  assert sorted(swin) == ["scan0", "scan1"]
  np.testing.assert_array_equal(swin["scan1"]["mlp"]["fc1"]["kernel"][1],
                                stored["swin"]["layers"][2]["blocks"][3]["mlp"]["fc1"]["kernel"])
  back = layout.unstack(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(stored)
  for name, value in trees.named_leaves(stored).items():
    np.testing.assert_array_equal(trees.named_leaves(back)[name], value, err_msg=name)
  # Device arrays, and the moments inside an optimizer-like state (dicts under tuples).
  state = (jnp.zeros(()), {"mu": jax.tree.map(jnp.asarray, stored)})
  round_trip = layout.unstack(layout.stack(state))
  np.testing.assert_array_equal(
      round_trip[1]["mu"]["beit3"]["encoder"]["layers"][1]["ffn"]["A"]["fc1"]["kernel"],
      stored["beit3"]["encoder"]["layers"][1]["ffn"]["A"]["fc1"]["kernel"])
  with pytest.raises(ValueError, match=r"stack beit3.encoder.layers: 'scan0' is missing"):
    layout.unstack(stored)  # already per layer: a layout mix-up, not a silent no-op


def test_the_gradient_of_unstack_is_the_layers_gradients_stacked():
  split = stack_layout.ARRAYS[1]
  x = jnp.arange(24.0).reshape(3, 2, 4)
  weights = jnp.arange(24.0).reshape(3, 2, 4) * 0.5 - 3.0
  used = lambda x, layers: sum(jnp.sum(split(x, 3)[i] * weights[i]) for i in layers)  # noqa
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: used(x, (0, 1, 2))))(x), weights)
  want = weights.at[1].set(0.0)  # a layer the loss does not read gets a zero gradient
  np.testing.assert_array_equal(jax.grad(lambda x: used(x, (0, 2)))(x), want)


def test_an_odd_swin_stage_stays_per_layer():
  model = abstract_model(_micro("model.scan_layers=true", "model.swin.depths=(1,1,5,1)").model)
  layout = stack_layout.StackLayout.of(model)
  assert "swin.layers.2.blocks" not in [s.name() for s in layout.stacks]


def test_a_stacked_leaf_is_sharded_like_its_layers_with_the_layer_axis_whole():
  config = _micro("model.scan_layers=true", "mesh.data=1", "mesh.fsdp=8",
                  "sharding.fsdp_min_size=1")
  trainer = _trainer(config, jax.devices())
  stacked = trees.named_leaves(trainer.state_shardings.params)
  stored = trees.named_leaves(trainer.stored_abstract_state().params)
  name = "beit3.encoder.layers.{}.ffn.A.fc1.kernel"
  per_layer = stored[name.format(1)].sharding
  assert FSDP_AXIS in tuple(per_layer.spec)  # sharded per layer by the config's rule
  assert stacked[name.format("scan0")] == NamedSharding(
      per_layer.mesh, PartitionSpec(None, *per_layer.spec))
  moments = trees.named_leaves(trainer.state_shardings.opt_state)
  assert moments["1.mu." + name.format("scan0")] == stacked[name.format("scan0")]
  with pytest.raises(ValueError, match="sharded differently"):
    stack_layout.SHARDINGS[0]([per_layer, S.replicated(per_layer.mesh)])


FSDP_AXIS = S.FSDP


@pytest.mark.parametrize("field,value", [
    ("frozen", (r"^swin\.", r"beit3\.encoder\.layers\.0\.")),
    ("lr_multipliers", ((r"layers\.1\.ffn", 0.1),))])
def test_a_rule_that_tells_the_layers_of_a_stack_apart_is_refused(field, value):
  for scan in (True, False):
    config = _micro(f"model.scan_layers={scan}")
    config.optimizer[field] = value
    if scan:
      with pytest.raises(ValueError, match=f"config optimizer.{field} treats the layers of a "
                                           "scanned stack differently"):
        _trainer(config)
    else:
      _trainer(config)  # per layer, as before


def test_a_checkpoint_holds_the_stacked_state_per_layer_and_restores_it_exactly(tmp_path):
  config = _micro("model.scan_layers=true", "mesh.data=2", "mesh.fsdp=1")
  trainer = _trainer(config, jax.devices()[:2])
  stored = trainer.stored_abstract_state().params
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), stored)
  state = state_lib.init_state(trainer, seed=0, params=params)
  # Moments that differ per layer, so that a mixed-up layer would show.
  state = state.replace(opt_state=jax.tree.map(
      lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) if x.ndim else x,
      state.opt_state))
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  ckpt.save(trainer.to_stored(state), config=config, data_position=dict(epoch=0, batch=0))
  on_disk, _ = checkpoints.restore_params(tmp_path / "checkpoints")
  assert sorted(trees.named_leaves(on_disk)) == sorted(trees.named_leaves(params))
  np.testing.assert_array_equal(
      trees.named_leaves(on_disk)["beit3.encoder.layers.1.ffn.A.fc1.kernel"],
      params["beit3"]["encoder"]["layers"][1]["ffn"]["A"]["fc1"]["kernel"])
  restored, _ = ckpt.restore(trainer)
  ckpt.close()
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(state),
                               jax.tree.leaves(restored)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    assert got.sharding == want.sharding, jax.tree_util.keystr(path)


# The training loop on 8 devices: the loop layout, and the stacked state stopped and resumed.
STEPS, STOP_AT = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("stacked")
  data_dir = root / "tfds"
  prepare.prepare("synthetic", data_dir=str(data_dir), config="tiny")

  def config(scan, *overrides):
    return _micro(f"model.scan_layers={scan}", f"data.data_dir={data_dir}",
                  f"train.max_steps={STEPS}", "train.checkpoint_every_steps=2", *overrides)

  return dict(root=root,
              loop=loop.train(config("false", "eval.train_splits=()"), root / "loop"),
              first=loop.train(config("true", "train.eval_every_steps=4"), root / "scan",
                               stop_at_step=STOP_AT),
              second=loop.train(config("true", "train.eval_every_steps=4"), root / "scan"))


def test_the_stacked_state_trains_and_resumes_as_the_loop_layout(runs):
  loop_run, first, second = runs["loop"], runs["first"], runs["second"]
  assert loop_run.steps_done == second.steps_done == STEPS
  assert first.steps_done == STOP_AT and second.resumed_from == STOP_AT
  losses = {**first.losses, **second.losses}
  np.testing.assert_allclose([losses[s] for s in range(STEPS)],
                             [loop_run.losses[s] for s in range(STEPS)], rtol=1e-4)
  ours, _ = checkpoints.restore_params(runs["root"] / "scan" / "checkpoints")
  theirs, _ = checkpoints.restore_params(runs["root"] / "loop" / "checkpoints")
  ours, theirs = trees.named_leaves(ours), trees.named_leaves(theirs)
  assert sorted(ours) == sorted(theirs)  # the checkpoint holds one subtree per layer
  for name, value in theirs.items():
    np.testing.assert_allclose(ours[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
  # The evaluation inside training read the stacked params per layer, and the best
  # checkpoint holds them per layer too.
  assert [h["step"] for h in second.best["history"]] == [STEPS]
  best, _ = checkpoints.restore_params(runs["root"] / "scan" / "checkpoints" / "best")
  assert sorted(trees.named_leaves(best)) == sorted(theirs)
