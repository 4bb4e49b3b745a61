"""Initial train state (host-drawn parameters have the model's tree and follow the seed) and
one jitted train step per program."""
import dataclasses
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deris_jax import batch as batch_lib
from deris_jax import cpu_options
from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.config_loader import load_config
from deris_jax.models.deris import abstract_model
from deris_jax.train import state as state_lib
from deris_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def test_abstract_params_are_what_the_jitted_initialiser_returns(trainer):
  # make_trainer reads them off the one abstract model it builds; train.init='jit' writes the
  # initialiser's output into shardings made from them: same tree, shapes and dtypes.
  want = jax.eval_shape(state_lib.init_params_fn(trainer.config.model), jax.random.key(0))
  assert jax.tree.structure(trainer.abstract_state.params) == jax.tree.structure(want)
  got = trees.named_leaves(trainer.abstract_state.params)
  for name, leaf in trees.named_leaves(want).items():
    assert type(got[name]) is jax.ShapeDtypeStruct, name
    assert (got[name].shape, got[name].dtype) == (leaf.shape, leaf.dtype), name


def test_init_state_from_host_params_lands_in_the_state_shardings(trainer):
  state = state_lib.init_state(trainer, seed=0)
  assert int(state.step) == 0 and int(state.first_nonfinite_step) == -1
  assert int(state.steps_per_epoch) == trainer.steps_per_epoch == 9
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


@pytest.mark.parametrize("spe", [0, -3, 2.5])
def test_steps_per_epoch_below_one_is_refused(trainer, spe):
  with pytest.raises(ValueError, match=f"steps_per_epoch={spe} must be an integer >= 1"):
    state_lib.make_trainer(trainer.config, trainer.mesh, steps_per_epoch=spe)


def test_the_step_program_does_not_depend_on_the_steps_per_epoch(trainer):
  # Steps per epoch is a value of the state: the lowered step (built apart from the memo of
  # `jit_train_step`) is the same module for 1 step per epoch (train.py --dry_run) and for 9
  # (the tiny synthetic set), so a dry run compiles the run's own program.
  batch = batch_lib.abstract(trainer.config.data, trainer.config.data.batch_size,
                             S.batch_sharding(trainer.mesh))

  def lowered_text(spe):
    other = state_lib.make_trainer(trainer.config, trainer.mesh, steps_per_epoch=spe)
    jitted = jax.jit(step_lib.train_step_fn(other), donate_argnums=(0,),
                     in_shardings=(other.state_shardings, S.batch_sharding(other.mesh)))
    return jitted.lower(other.sharded_abstract_state(), batch).as_text()

  assert lowered_text(1) == lowered_text(9)


def test_one_jitted_step_per_program(monkeypatch):
  """Trainers of the same program share one jitted step (compiled once per process); a
  change the program reads (loss, schedule length, model, XLA:CPU options) gives another, and
  what it does not read (evaluation, checkpoints, the steps per epoch of the data: a value of
  the state) does not."""
  def step_of(*overrides, spe=9):
    config = load_config("configs/deris_micro.py", list(overrides))
    return step_lib.jit_train_step(
        state_lib.make_trainer(config, S.make_mesh(config.mesh), steps_per_epoch=spe))

  monkeypatch.setenv(cpu_options.ENV, "off")
  first = step_of()
  assert step_of() is first
  assert step_of("train.checkpoint_every_steps=3", "train.max_steps=5") is first
  assert step_of(spe=10) is first and step_of(spe=1) is first
  monkeypatch.setenv(cpu_options.ENV, "on")
  assert step_of() is not first
  monkeypatch.setenv(cpu_options.ENV, "off")
  assert step_of() is first
  for other in (step_of("loss.num_points=32"), step_of("train.epochs=7"),
                step_of("model.dtype=bfloat16")):
    assert other is not first
  # The same config with another model structure (benchmarks swap the graphdef).
  config = load_config("configs/deris_micro.py")
  trainer = state_lib.make_trainer(config, S.make_mesh(config.mesh), steps_per_epoch=9)
  config.model.scan_layers = True
  scanned, _ = nnx.split(abstract_model(config.model))
  assert step_lib.jit_train_step(dataclasses.replace(trainer, graphdef=scanned)) is not (
      step_lib.jit_train_step(trainer))


class _FakeTrainer:
  """What `step.Precompile` reads of a Trainer: the sharded abstract state."""

  def __init__(self, sharding):
    self.sharding = sharding

  def sharded_abstract_state(self):
    return jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=self.sharding)


def test_precompile_gives_a_compiled_step_and_reraises_a_compile_error(monkeypatch, caplog):
  sharding = S.replicated(S.data_mesh(jax.devices()[:1]))
  jitted = jax.jit(lambda s, b: (s + b["x"][0], b["x"].sum()),  # s (4, 4) + row (4,)
                   in_shardings=(sharding, sharding), out_shardings=(sharding, sharding),
                   donate_argnums=(0,))
  monkeypatch.setattr(step_lib, "jit_train_step", lambda trainer: jitted)
  monkeypatch.setattr(step_lib, "program_description", lambda trainer: "s + x[0], sum(x)")
  monkeypatch.setattr(step_lib, "_compiler_options", lambda trainer: None)
  batch = {"x": jax.ShapeDtypeStruct((2, 4), jnp.float32, sharding=sharding)}
  precompile = step_lib.Precompile(_FakeTrainer(sharding), batch)
  compiled = precompile.wait()
  assert isinstance(compiled, jax.stages.Compiled) and precompile.origin in (
      "compiled", "memory", "disk")
  state, x = jax.device_put((np.zeros((4, 4), np.float32), np.ones((2, 4), np.float32)),
                            sharding)
  with jax.log_compiles(), caplog.at_level(logging.DEBUG, logger="jax"):
    new_state, total = compiled(state, {"x": x})
  assert not [r for r in caplog.records if "lambda" in r.getMessage()], caplog.text  # no trace,
  assert float(total) == 8.0 and float(new_state[0, 0]) == 1.0  # no lowering, no compile
  assert state.is_deleted()  # donated, as by the jitted step
  wrong = {"x": jax.ShapeDtypeStruct((2, 5), jnp.float32, sharding=sharding)}  # (4, 4) + (5,)
  with pytest.raises((TypeError, ValueError), match="ncompatible shapes for broadcasting"):
    step_lib.Precompile(_FakeTrainer(sharding), wrong).wait()


_EXIT_DURING_PRECOMPILE = """
import sys, time
import jax, jax.numpy as jnp
from deris_jax import sharding as S
from deris_jax.train import step as step_lib
sharding = S.replicated(S.data_mesh(jax.devices()[:1]))

def slow(s, b):  # ~4 s of XLA compile
  for i in range(400):
    s = jnp.sin(s @ s) * (i + 1.0) + b["x"]
  return s, s.sum()

step_lib.jit_train_step = lambda trainer: jax.jit(
    slow, in_shardings=(sharding, sharding), out_shardings=(sharding, sharding))
step_lib.program_description = lambda trainer: "slow"
step_lib._compiler_options = lambda trainer: None

class Trainer:
  def sharded_abstract_state(self):
    return jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sharding)

step_lib.Precompile(Trainer(), {"x": Trainer().sharded_abstract_state()})
time.sleep(1.0)  # the thread is inside XLA's compile now
raise SystemExit("error: a problem found before the first step")
"""


@pytest.mark.slow  # a subprocess or several processes
def test_an_error_during_the_precompile_exits_cleanly():
  # An error before the first step (bad data, say) ends the process with its own message and
  # status once the compile ends; a daemon thread inside XLA at exit would abort the process.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  proc = subprocess.run([sys.executable, "-c", _EXIT_DURING_PRECOMPILE], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  assert "error: a problem found before the first step" in proc.stderr
  assert "FATAL" not in proc.stderr
