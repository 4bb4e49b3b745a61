"""Initial train state: host-drawn parameters have the model's tree and follow the seed."""
import jax
import numpy as np
import pytest

from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.config_loader import load_config
from deris_jax.train import state as state_lib


@pytest.fixture(scope="module")
def trainer():
  config = load_config("configs/deris_micro.py")
  return state_lib.make_trainer(config, S.make_mesh(config.mesh), steps_per_epoch=9)


def test_host_params_have_the_abstract_tree_and_follow_the_seed(trainer):
  params = state_lib.fresh_params(trainer, seed=3)
  got = trees.named_leaves(params)
  want = trees.named_leaves(trainer.abstract_state.params)
  assert got.keys() == want.keys()
  for name, leaf in want.items():
    assert got[name].shape == leaf.shape and got[name].dtype == leaf.dtype, name
  again = trees.named_leaves(state_lib.fresh_params(trainer, seed=3))
  other = trees.named_leaves(state_lib.fresh_params(trainer, seed=4))
  name = "decoder.SEG_cls.kernel"
  np.testing.assert_array_equal(got[name], again[name])
  assert not np.array_equal(got[name], other[name])


def test_init_state_from_host_params_lands_in_the_state_shardings(trainer):
  state = state_lib.init_state(trainer, seed=0)
  assert int(state.step) == 0 and int(state.first_nonfinite_step) == -1
  shardings = trees.named_leaves(trainer.state_shardings.params)
  for name, leaf in trees.named_leaves(state.params).items():
    assert leaf.sharding == shardings[name], name
  trainable, _ = trainer.split_params(state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(trainer.tx.init(trainable))


def test_unknown_init_mode_is_refused(trainer):
  config = trainer.config.copy_and_resolve_references()
  config.train.init = "lazy"
  bad = state_lib.make_trainer(config, trainer.mesh, steps_per_epoch=9)
  with pytest.raises(ValueError, match="unknown config train.init 'lazy'"):
    state_lib.fresh_params(bad, seed=0)
