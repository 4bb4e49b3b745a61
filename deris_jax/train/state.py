"""The train state, its abstract shapes and shardings, and its jit-initialisation into them.

Everything training needs to continue exactly lives in one pytree, donated to every step:
  step                  () int32, steps taken (= the next step's 0-based index)
  params                every model parameter (NNX pure dict; `deris_jax.train.params`), the
                        scanned stacks held stacked (`Trainer.layout`; checkpoints, eval and
                        the predictor take them per layer: `Trainer.to_stored`)
  opt_state             optimizer state of the trainable parameters only (frozen: none)
  rng                   key data (uint32) of the training key (dropout, drop path, points)
  first_nonfinite_step  () int32, -1 while every loss and gradient was finite; else the first
                        step that was not (that step's update was skipped)
  steps_per_epoch       () int32, the input stream's (the learning-rate schedule's epoch of a
                        step); a value, not a constant of the program, so datasets of any size
                        share one compiled step. Not checkpointed: the run's input stream gives
                        it (a resume checks that it did not change).
"""
import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.models import deris as deris_model
from deris_jax.models import stack_layout
from deris_jax.train import optimizer as opt_lib
from deris_jax.train import params as params_lib
from deris_jax.train import schedule as sched_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  first_nonfinite_step: jax.Array
  steps_per_epoch: jax.Array


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The static pieces shared by init, the step and checkpointing (no arrays inside)."""
  config: mlc.ConfigDict
  graphdef: Any  # nnx.GraphDef of DeRIS
  tx: optax.GradientTransformation
  lr_schedule: Callable[[jax.Array, jax.Array], jax.Array]  # (step, spe) -> base lr x factor
  frozen_patterns: tuple
  abstract_state: TrainState  # ShapeDtypeStructs
  state_shardings: TrainState  # NamedShardings
  mesh: jax.sharding.Mesh
  steps_per_epoch: int  # the input stream's; the state carries it (not part of the program)
  # The scanned stacks, held stacked in `params` and `opt_state` (`stack_layout`); empty when
  # nothing scans (then the stored layout is the state's).
  layout: stack_layout.StackLayout = stack_layout.StackLayout()
  _conversions: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def split_params(self, params):
    """(trainable, frozen) parameter trees."""
    return params_lib.split_frozen(params, self.frozen_patterns)

  def sharded_abstract_state(self) -> TrainState:
    """The train state as ShapeDtypeStructs carrying the state's shardings."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def stored_abstract_state(self) -> TrainState:
    """`sharded_abstract_state` in the stored layout (one subtree per layer): what
    checkpoints hold."""
    return self.layout.unstack(self.sharded_abstract_state(), stack_layout.ABSTRACT)

  def stored_state_shardings(self) -> TrainState:
    """`state_shardings` in the stored layout (one subtree per layer)."""
    return self.layout.unstack(self.state_shardings, stack_layout.SHARDINGS)

  def stored_params(self, params):
    """Parameters of the state's layout (arrays or ShapeDtypeStructs) -> the stored layout
    the model, eval and checkpoints take (one subtree per layer)."""
    if not self.layout:
      return params
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
      return self.layout.unstack(params, stack_layout.ABSTRACT)
    return self._convert("params to stored", params)

  def to_stored(self, state: TrainState) -> TrainState:
    """The state with params and opt_state in the stored layout (one jitted program of
    slices, compiled once per process)."""
    return self._convert("state to stored", state) if self.layout else state

  def from_stored(self, state: TrainState) -> TrainState:
    """A state of the stored layout -> the state's layout, in the state's shardings."""
    return self._convert("state from stored", state) if self.layout else state

  def _convert(self, what: str, tree):
    if what not in self._conversions:
      stored = self.stored_state_shardings()
      programs = {  # what -> (function, its output's shardings)
          "params to stored": (self.layout.unstack, stored.params),
          "state to stored": (self.layout.unstack, stored),
          "state from stored": (self.layout.stack, self.state_shardings)}
      fn, out_shardings = programs[what]
      self._conversions[what] = jax.jit(fn, out_shardings=out_shardings)
    with jax.transfer_guard("allow"):
      return self._conversions[what](tree)


def frozen_patterns(config: mlc.ConfigDict) -> tuple:
  """The `optimizer.frozen` regexes, checked against `model.freeze_swin`."""
  patterns = tuple(config.optimizer.frozen)
  swin_frozen = any(params_lib.matches_any("swin.patch_embed.proj.kernel", (p,)) for p in patterns)
  if bool(config.model.get("freeze_swin", True)) != swin_frozen:
    raise ValueError(
        f"config model.freeze_swin={config.model.get('freeze_swin', True)} but "
        f"optimizer.frozen={patterns} {'freezes' if swin_frozen else 'trains'} the Swin "
        "backbone: set both consistently (the model stops its gradient when frozen)")
  return patterns


def init_params_fn(model_config: mlc.ConfigDict) -> Callable[[jax.Array], Any]:
  """key -> freshly initialised params (the official initialisers; jit it)."""
  def init(key):
    model = deris_model.DeRIS(model_config, rngs=deris_model.KeySequence(key))
    return params_lib.model_params(model)
  return init


def make_trainer(config: mlc.ConfigDict, mesh: jax.sharding.Mesh, *, steps_per_epoch: int,
                 model: Optional[nnx.Module] = None) -> Trainer:
  """Builds the optimizer, the abstract state and its shardings (no parameter is allocated).

  `model`: the abstract model to train (default: `config.model`'s); benchmarks pass one whose
  stacks scan differently from the config's."""
  patterns = frozen_patterns(config)
  if model is None:
    model = deris_model.abstract_model(config.model)  # built once: structure and shapes
  graphdef, _ = nnx.split(model)
  layout = stack_layout.StackLayout.of(model)
  stored_params = params_lib.model_params(model)  # ShapeDtypeStructs, as init_params_fn's
  _check_rules_per_stack(config, layout, stored_params, patterns)
  abstract_params = layout.stack(stored_params, stack_layout.ABSTRACT)
  trainable, _ = params_lib.split_frozen(abstract_params, patterns)
  steps_per_epoch = sched_lib.check_steps_per_epoch(steps_per_epoch)
  lr_schedule = sched_lib.make_lr_schedule(config.optimizer.lr, config.schedule,
                                           epochs=config.train.epochs)
  tx = opt_lib.build_optimizer(config.optimizer, lr_schedule, trainable)
  abstract_state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=abstract_params,
      opt_state=jax.eval_shape(tx.init, trainable),
      rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
      first_nonfinite_step=jax.ShapeDtypeStruct((), jnp.int32),
      steps_per_epoch=jax.ShapeDtypeStruct((), jnp.int32))
  # The sharding rules see every layer's own name and shape (the stored layout); a stacked
  # leaf takes its layers' sharding with the layer axis unsharded.
  stored_trainable, _ = params_lib.split_frozen(stored_params, patterns)
  stored_shardings = dict(
      params=S.tree_shardings(stored_params, mesh, config.sharding, "params."),
      opt_state=S.tree_shardings(jax.eval_shape(tx.init, stored_trainable), mesh,
                                 config.sharding, "opt_state."))
  shardings = TrainState(
      step=S.replicated(mesh),
      params=layout.stack(stored_shardings["params"], stack_layout.SHARDINGS),
      opt_state=layout.stack(stored_shardings["opt_state"], stack_layout.SHARDINGS),
      rng=S.replicated(mesh),
      first_nonfinite_step=S.replicated(mesh),
      steps_per_epoch=S.replicated(mesh))
  return Trainer(config=config, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                 frozen_patterns=patterns, abstract_state=abstract_state,
                 state_shardings=shardings, mesh=mesh, steps_per_epoch=steps_per_epoch,
                 layout=layout)


def _check_rules_per_stack(config: mlc.ConfigDict, layout: stack_layout.StackLayout,
                           stored_params, patterns) -> None:
  """The optimizer's rules (frozen, learning-rate multipliers) name parameters; a stacked leaf
  has one name for all its layers, so each rule must treat every layer of a stack alike, and
  the stacked name alike."""
  names = list(trees.named_leaves(stored_params))
  for stacked, per_layer in layout.stored_names(names).items():
    for what, rule in (("optimizer.frozen", lambda n: params_lib.matches_any(n, patterns)),
                       ("optimizer.lr_multipliers",
                        lambda n: opt_lib.lr_multiplier(n, config.optimizer))):
      found = {n: rule(n) for n in per_layer + [stacked]}
      if len(set(found.values())) > 1:
        raise ValueError(
            f"config {what} treats the layers of a scanned stack differently ({found}); with "
            "model.scan_layers=true the stack's parameters are held stacked and share one "
            "rule: write the rule for all its layers, or set model.scan_layers=false")


def _state_from(trainer: Trainer, params, rng_key, steps_per_epoch) -> TrainState:
  trainable, _ = trainer.split_params(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=trainer.tx.init(trainable),
                    rng=jax.random.key_data(rng_key),
                    first_nonfinite_step=jnp.full((), -1, jnp.int32),
                    steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32))


def keys_from_seed(seed: int):
  """(model init key, training key) of a seed."""
  init_key, train_key = jax.random.split(jax.random.key(seed))
  return init_key, train_key


INIT_MODES = ("host", "jit")  # config train.init


def fresh_params(trainer: Trainer, seed: int) -> Any:
  """Freshly initialised params (the official initialisers) per `config.train.init`.

  'host': drawn with numpy from `seed` (`deris_model.build_model`: seconds, nothing to
  compile; every process draws the same numbers) -> host arrays.
  'jit': one jitted initialiser writing straight into the params' shardings (for models too
  big for host memory; compiling it takes ~40 s on a CPU) -> sharded arrays.
  Either way in the stored layout (one subtree per layer; `init_state` stacks them).
  """
  mode = trainer.config.train.get("init", "host")
  if mode not in INIT_MODES:
    raise ValueError(f"unknown config train.init '{mode}'; known: {INIT_MODES}")
  if mode == "host":
    model = deris_model.build_model(trainer.config.model, seed)
    return jax.tree.map(np.asarray, params_lib.model_params(model))
  init_key, _ = keys_from_seed(seed)
  return jax.jit(init_params_fn(trainer.config.model),
                 out_shardings=trainer.stored_state_shardings().params)(init_key)


def init_state(trainer: Trainer, seed: int, params: Optional[Any] = None) -> TrainState:
  """A fresh train state built directly into its shardings by one jitted program.

  Args:
    seed: config.train.seed; it gives the initial params (unless `params`, see
      `fresh_params`) and the train key.
    params: start from these parameters (e.g. `--init_from`) in the stored layout (one
      subtree per layer), host or device arrays; None initialises them with the official
      initialisers.
  """
  _, train_key = keys_from_seed(seed)
  train_key_data = jax.random.key_data(train_key)
  if params is None:
    params = fresh_params(trainer, seed)
  params = jax.device_put(params, trainer.stored_state_shardings().params)
  fn = lambda p, t, spe: _state_from(  # noqa: E731
      trainer, trainer.layout.stack(p), jax.random.wrap_key_data(t), spe)
  return jax.jit(fn, out_shardings=trainer.state_shardings)(params, train_key_data,
                                                            np.int32(trainer.steps_per_epoch))
