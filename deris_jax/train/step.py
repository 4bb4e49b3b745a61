"""The train step: one jitted, sharded program from (state, batch) to (next state, metrics).

forward (train=True: drop path, dropout) -> `losses.deris_loss` (matching, point sampling,
all terms on the device) -> gradients of the trainable parameters only -> the optimizer
(clip, Adam, per-group learning rate). The state is donated. The step's key is
`fold_in(train key, step)`, so a resumed run draws exactly what an uninterrupted run draws.

Non-finite losses: a step whose loss or gradient norm is not finite records its index in
`first_nonfinite_step` (one scalar; no host round trip per step). The loop reads it at every
log and before every checkpoint, and stops without saving, so a checkpoint never holds the
parameters of a non-finite step and the last one written is good.

Memory: `config.model.remat` recomputes the BEiT-3 layers in the backward pass (the frozen
Swin keeps no activations for the backward at all).

`jit_train_step` hands out one jitted step per program (`program_key`) and process: a second
run of the same program in the same process (a resumed or repeated run, a sweep in a notebook,
the tests) reuses the compiled executable instead of tracing, lowering and compiling again.
`Precompile` gets that step's executable in a background thread from the abstract state and
batch, while the loop initialises or restores the state and starts the input pipeline: read
back from `deris_jax.executable_cache` (no tracing) when this program was compiled before on
this machine, else traced, lowered and compiled (jax's persistent cache may still hold the
compiled program) and written there.
"""
import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Dict, Hashable, Tuple

import jax
import jax.numpy as jnp
import optax

from deris_jax import batch as batch_lib
from deris_jax import cpu_options
from deris_jax import executable_cache
from deris_jax import forward
from deris_jax import losses
from deris_jax import sharding as S
from deris_jax.train import optimizer as opt_lib
from deris_jax.train import params as params_lib
from deris_jax.train.state import Trainer, TrainState


def model_loss_inputs(out) -> Dict[str, jax.Array]:
  """The `DerisOutput` fields `losses.deris_loss` reads."""
  return dict(pred_masks=out.pred_masks, refer_logits=out.refer_logits,
              existence_logit=out.existence_logit, aux_pred_masks=out.aux_pred_masks,
              aux_refer_logits=out.aux_refer_logits)


def make_loss_fn(trainer: Trainer) -> Callable:
  """(trainable, frozen, batch, key) -> (loss, metrics); differentiable in `trainable`.

  The parameters come in the train state's layout (`Trainer.layout`: scanned stacks held
  stacked). The model takes one subtree per layer and its scans stack them again; XLA folds
  that stack of slices back into the stacked array, so neither the forward nor the gradient
  holds per-layer copies."""
  config = trainer.config
  unstack = trainer.layout.unstack

  def loss_fn(trainable, frozen, batch, key):
    dropout_key, loss_key = jax.random.split(key)
    outputs = model_loss_inputs(forward.apply(
        trainer.graphdef, unstack(trainable), batch, frozen=unstack(frozen), train=True,
        dropout_key=dropout_key))
    targets = {k: batch[k] for k in batch_lib.TARGETS}
    return losses.deris_loss(outputs, targets, loss_key, config=config.loss)

  return loss_fn


def train_step_fn(trainer: Trainer) -> Callable[[TrainState, dict], Tuple[TrainState, dict]]:
  """The un-jitted step (see `jit_train_step`)."""
  loss_fn = make_loss_fn(trainer)
  # The gradient norm sums the replicated gradients in one reduction (`opt_lib.global_norm`).
  replicated = jax.tree.map(lambda sharding: sharding.is_fully_replicated,
                            trainer.split_params(trainer.state_shardings.params)[0])

  def step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = trainer.split_params(state.params)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen,
                                                                       batch, key)
    grad_norm = opt_lib.global_norm(grads, replicated)  # () logged, and the clip's
    updates, opt_state = trainer.tx.update(grads, state.opt_state, trainable, grad_norm=grad_norm,
                                           steps_per_epoch=state.steps_per_epoch)
    new_params = params_lib.merge_trees(optax.apply_updates(trainable, updates), frozen)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                          state.first_nonfinite_step)
    metrics = dict(metrics, grad_norm=grad_norm,
                   lr=trainer.lr_schedule(state.step, state.steps_per_epoch))
    new_state = TrainState(step=state.step + 1, params=new_params, opt_state=opt_state,
                           rng=state.rng, first_nonfinite_step=first_bad.astype(jnp.int32),
                           steps_per_epoch=state.steps_per_epoch)
    return new_state, metrics

  return step


# The config sections the step's program reads (with the model structure, the mesh and the
# learning-rate schedule's epochs; `program_key`). Steps per epoch is a value of the state.
PROGRAM_SECTIONS = ("model", "loss", "optimizer", "schedule", "sharding")
MAX_JITTED_STEPS = 4  # programs kept per process (each holds its compiled executables)
_jitted_steps: "collections.OrderedDict[Hashable, Tuple[Any, Callable]]" = (
    collections.OrderedDict())  # key -> (graphdef, jitted step)


def program_key(trainer: Trainer) -> Hashable:
  """What the train step's program depends on besides the model structure (`graphdef`,
  compared apart: it is not hashable): config sections, epochs, mesh and the XLA:CPU options
  (`deris_jax.cpu_options`). Trainers with equal keys and graphdefs build the same program
  (the batch shapes are jit's own cache key), whatever their steps per epoch."""
  config = trainer.config
  sections = tuple(config[name].to_json_best_effort(sort_keys=True) if name in config else None
                   for name in PROGRAM_SECTIONS)
  options = _compiler_options(trainer)
  return (sections, int(config.train.epochs), trainer.mesh,
          tuple(sorted(options.items())) if options else None)


def _compiler_options(trainer: Trainer):
  return cpu_options.compiler_options(trainer.mesh.devices.flat[0].platform)


def jit_train_step(trainer: Trainer):
  """The jitted step: state sharded by its rules, batch over data x fsdp, state donated.

  The same jitted function for trainers of the same program (`program_key`), so it compiles
  once per process."""
  key = program_key(trainer)
  if key in _jitted_steps and _jitted_steps[key][0] == trainer.graphdef:
    _jitted_steps.move_to_end(key)
    return _jitted_steps[key][1]
  # The step traces again for new batch shapes: it keeps its own copy of the config, so a
  # caller changing theirs later cannot change what the key promised.
  trainer = dataclasses.replace(trainer, config=trainer.config.copy_and_resolve_references())
  jitted = jax.jit(train_step_fn(trainer),
                   in_shardings=(trainer.state_shardings, S.batch_sharding(trainer.mesh)),
                   out_shardings=(trainer.state_shardings, S.replicated(trainer.mesh)),
                   donate_argnums=(0,), compiler_options=_compiler_options(trainer))
  _jitted_steps[key] = (trainer.graphdef, jitted)
  while len(_jitted_steps) > MAX_JITTED_STEPS:
    _jitted_steps.popitem(last=False)
  return jitted


def program_description(trainer: Trainer) -> str:
  """What the step's program is built from besides its arguments, as text for
  `executable_cache`: `program_key` and the model structure."""
  return (executable_cache.stable_repr(program_key(trainer)) + "\n" +
          executable_cache.stable_repr(trainer.graphdef))


class Precompile:
  """The train step of `trainer` compiled (or read back from disk) in a background thread.

  `wait()` returns the compiled step (`jax.stages.Compiled`): called on arrays of the abstract
  state's and batch's shapes, dtypes and shardings, it runs without tracing (other arguments
  are an error, not a recompile). It comes from `executable_cache.load_or_compile`: memory,
  disk, or `jit_train_step(trainer).lower(state, batch).compile()`; `origin` says which.
  Start it before the state and the input pipeline are built (XLA compiles and loads
  executables without holding Python's lock) and `wait()` before the first call. `wait()`
  re-raises what the compile raised (a shape error, say), as the first call would.
  """

  def __init__(self, trainer: Trainer, batch: Dict[str, jax.ShapeDtypeStruct],
               log: Callable[[str], None] = print):
    self.step = jit_train_step(trainer)
    self.started = time.perf_counter()
    self.origin = None  # 'memory', 'disk' or 'compiled', once done
    self._compiled = None
    self._error = None
    self._log = log
    # Not a daemon: a run that fails before its first step prints its error at once and exits
    # when the compile ends (Python joins the thread); a daemon thread still inside XLA when
    # the interpreter finalises aborts the process ("FATAL: exception not rethrown").
    self._thread = threading.Thread(
        target=self._compile, name="deris-precompile-step",
        args=(trainer.sharded_abstract_state(), batch, program_description(trainer),
              _compiler_options(trainer)))
    self._thread.start()

  def _compile(self, state, batch, description, options) -> None:
    try:
      self._compiled, self.origin = executable_cache.load_or_compile(
          "train_step", self.step, (state, batch), description=description,
          compiler_options=options, log=self._log)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by wait())
      self._error = e

  def wait(self) -> Callable:
    """Blocks until the compile ends; returns the compiled step (raises the compile's error)."""
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._compiled
