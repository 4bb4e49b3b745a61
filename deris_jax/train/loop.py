"""The training loop: set-up or exact resume, the jitted steps, logging, evaluation, checkpoints.

  mesh from config.mesh -> Trainer (optimizer, abstract state, shardings)
  -> state: restored from WORKDIR/checkpoints (exact resume), else --init_from params with a
     fresh optimizer, else the official initialisers; jit-built straight into its shardings
  -> for each step: this process's batch -> global sharded arrays -> train step (donated)
     under jax.transfer_guard("disallow"); metrics stay on the device until a log step
  -> every log interval: fetch metrics (jax.device_get), console + TensorBoard, and stop
     with `NonFiniteLossError` if a loss was not finite; checkpoints never save such a state
  -> evaluation of config.eval.train_splits at config.eval.train_score_threshold and
     checkpoints at their intervals; a final evaluation and checkpoint
  -> after each evaluation the best-on-val rule (best_lib.BestTracker, the official
     tools/train.py): a new best from epoch config.eval.best_start_epoch on writes the train
     checkpoint of that step (if not due anyway), then WORKDIR/checkpoints/best.
"""
import dataclasses
import pathlib
import time
from typing import Any, Dict, List, Optional

import jax
import ml_collections as mlc

from deris_jax import batch as batch_lib
from deris_jax import checkpoints
from deris_jax import evaluation
from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.train import best as best_lib
from deris_jax.train import checkpointing
from deris_jax.train import input as input_lib
from deris_jax.train import reporting
from deris_jax.train import state as state_lib
from deris_jax.train import step as step_lib


# Steps dispatched ahead of the device: enough to overlap input and compute, few enough that
# queued batches do not pile up in memory and the progress bar's ETA is real.
MAX_STEPS_IN_FLIGHT = 2


class NonFiniteLossError(RuntimeError):
  """A train step produced a non-finite loss or gradient norm; the run stopped."""

  def __init__(self, step: int, metrics: Dict[str, float], checkpoint_step: Optional[int],
               checkpoint_dir: pathlib.Path):
    self.step, self.metrics, self.checkpoint_step = step, metrics, checkpoint_step
    terms = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    kept = (f"the last good checkpoint is step {checkpoint_step} in {checkpoint_dir}"
            if checkpoint_step is not None else "no checkpoint had been written")
    super().__init__(f"non-finite loss or gradient at step {step} (0-based); stopping without "
                     f"saving: {kept}. Metrics of the logged steps: {terms}")


@dataclasses.dataclass
class RunResult:
  """What a call of `train` did (for train.py's summary and for tests)."""
  steps_done: int  # the state's step when the run ended
  total_steps: int
  steps_per_epoch: int
  stopped: str  # 'finished' | 'stop_at_step' | 'preempted'
  losses: Dict[int, float]  # 0-based step -> loss, every step run by this call
  last_checkpoint: Optional[int]
  eval_results: Dict[str, Dict[str, Any]]  # split -> metrics of the last evaluation
  resumed_from: Optional[int]
  best: Optional[Dict[str, Any]]  # the best-on-val record (best_lib.BestTracker.record)
  input_open_seconds: float  # time spent opening the epochs' input pipelines


def _due(steps_done: int, every_steps: int, every_epochs: int, steps_per_epoch: int) -> bool:
  if every_steps:
    return steps_done % every_steps == 0
  if every_epochs:
    return steps_done % (every_epochs * steps_per_epoch) == 0
  return False


def _data_position(step: int, steps_per_epoch: int, config: mlc.ConfigDict) -> Dict[str, int]:
  pos = input_lib.Position.of_step(step, steps_per_epoch)
  return dict(epoch=pos.epoch, batch=pos.batch, steps_per_epoch=steps_per_epoch,
              global_batch=config.data.batch_size, seed=config.train.seed)


def _check_resume(meta: Dict[str, Any], position: Dict[str, int], directory) -> None:
  saved = meta.get("data", {})
  for key in ("steps_per_epoch", "global_batch", "seed"):
    if key in saved and saved[key] != position[key]:
      raise checkpoints.CheckpointError(
          f"{directory}: the checkpoint was written with {key}={saved[key]} but the config "
          f"gives {position[key]}; an exact resume needs the same input stream. Start a new "
          "workdir with --init_from to change it.")


def _check_checkpoints(trainer: state_lib.Trainer, ckpt: checkpointing.Checkpointer,
                       resumed_from: Optional[int], init_from: Optional[str]) -> None:
  """What the run will read, checked before the step compiles (from metadata, no array read):
  a mistaken `--init_from` or a workdir of another config fails in a second, instead of after
  a compile of minutes that a process cannot abandon. The resumed checkpoint: its input
  stream and parameters; `--init_from` (not used when resuming): its parameters."""
  expected = trees.named_leaves(trainer.stored_params(trainer.abstract_state.params))
  if resumed_from is not None:
    position = _data_position(resumed_from, trainer.steps_per_epoch, trainer.config)
    _check_resume(checkpoints.restore_meta(ckpt.directory, resumed_from), position,
                  ckpt.directory)
    checkpoints.check_fit(checkpoints.stored_shapes(ckpt.directory, resumed_from), expected,
                          partial=False, source=f"{ckpt.directory} step {resumed_from}")
  elif init_from is not None:
    checkpoints.check_fit(checkpoints.stored_shapes(init_from), expected, partial=True,
                          source=f"--init_from {init_from}")


def init_params(directory, trainer: state_lib.Trainer, seed: int, report) -> Any:
  """`--init_from`: the train-state params from a checkpoint (`deris_jax.checkpoints` format).

  The checkpoint may hold all or part of the model (e.g. backbones only): parameters it lacks
  keep their official initialisation (`state.fresh_params` of `seed`). Unknown names and
  shape mismatches raise a CheckpointError naming the first one (`checkpoints.merge_params`).
  """
  tree, meta = checkpoints.restore_params(directory)
  abstract = trainer.stored_params(trainer.abstract_state.params)  # one subtree per layer
  merged, filled = checkpoints.merge_params(
      trees.named_leaves(tree), trees.named_leaves(abstract),
      fill=lambda: trees.named_leaves(state_lib.fresh_params(trainer, seed)),
      source=f"--init_from {directory}")
  report.log(f"init_from {directory}: {len(merged) - len(filled)}/{len(merged)} parameters "
             f"(kind {meta.get('kind', '?')})")
  if filled:
    report.log(f"init_from: {len(filled)} parameters missing from the checkpoint keep their "
               "official initialisation")
  return trees.unflatten_like(merged, abstract)


def _init_state(trainer, config, init_from, report):
  params = None if init_from is None else init_params(init_from, trainer, config.train.seed,
                                                       report)
  return state_lib.init_state(trainer, config.train.seed, params=params)


def _evaluate(state, trainer, config, step, report,
              settings: best_lib.BestSettings) -> Dict[str, Dict[str, Any]]:
  """`deris_jax.evaluation.evaluate_params` on every split of `config.eval.train_splits` at
  tau `config.eval.train_score_threshold`."""
  results = {}
  params = trainer.stored_params(state.params)  # one subtree per layer, once for every split
  for split in settings.splits:
    with jax.transfer_guard("allow"):
      results[split] = evaluation.evaluate_params(trainer.graphdef, params, config, split,
                                                  mesh=trainer.mesh,
                                                  score_threshold=settings.score_threshold)
    metrics = dict(results[split]["metrics"], **results[split].get("extra_metrics", {}))
    report.eval_line(step, split, metrics, results[split]["score_threshold"])
    report.scalars(step, metrics, prefix=f"eval/{split}")
  return results


@dataclasses.dataclass
class _Run:
  """The mutable side of one `train` call: the state, metrics not yet fetched, timing."""
  config: mlc.ConfigDict
  trainer: state_lib.Trainer
  ckpt: checkpointing.Checkpointer
  report: reporting.Reporter
  state: state_lib.TrainState
  steps_per_epoch: int
  last_checkpoint: Optional[int]
  eval_settings: Optional[best_lib.BestSettings] = None
  tracker: Optional[best_lib.BestTracker] = None  # None: no best checkpoint
  best_pending: Optional[best_lib.Observation] = None  # to write after its train ckpt
  losses: Dict[int, float] = dataclasses.field(default_factory=dict)
  eval_results: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
  pending: List[Dict[str, jax.Array]] = dataclasses.field(default_factory=list)
  interval_start: float = dataclasses.field(default_factory=time.perf_counter)
  interval_steps: int = 0

  def step(self, train_step, batch, *, first: bool, compile_started: Optional[float] = None,
           program_origin: Optional[str] = None) -> None:
    """Dispatches one step under the transfer guard; metrics stay on the device.
    `compile_started`: when the first step's program began compiling (`step.Precompile`);
    `program_origin`: where its executable came from ('disk': `executable_cache`)."""
    with jax.transfer_guard("disallow"):
      self.state, metrics = train_step(self.state, batch)
    self.pending.append(metrics)
    if len(self.pending) > MAX_STEPS_IN_FLIGHT:  # bound the dispatch queue (memory, ETA)
      jax.block_until_ready(self.pending[-1 - MAX_STEPS_IN_FLIGHT])
    self.interval_steps += 1
    if first:  # the first step includes tracing and compilation: report it apart
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      line = f"first step (compile + run) {reporting.format_seconds(now - self.interval_start)}"
      if compile_started is not None:
        line = (f"first step (compile + run) {reporting.format_seconds(now - compile_started)},"
                f" {reporting.format_seconds(now - self.interval_start)} of it after the state "
                "and the input were ready")
      if program_origin == "disk":
        line += " (the program read back from the executable cache)"
      self.report.log(line)
      self.interval_start, self.interval_steps = time.perf_counter(), 0
    self.report.advance()

  def collect(self, done: int) -> Dict[str, float]:
    """Fetches the pending metrics (steps up to `done`), records losses, checks finiteness."""
    if not self.pending:
      return {}
    history = jax.device_get(self.pending)
    for i, metrics in enumerate(history):
      self.losses[done - len(history) + i] = float(metrics["loss"])
    self.pending = []
    logged = reporting.mean_metrics(history)
    self.check_finite(logged)
    return logged

  def log(self, done: int) -> None:
    logged = self.collect(done)  # waits for the interval's steps: they are all in its time
    elapsed = time.perf_counter() - self.interval_start
    if self.interval_steps and elapsed > 0:
      logged["images_per_s"] = self.interval_steps * self.config.data.batch_size / elapsed
    self.report.train_line(done, logged)
    self.report.scalars(done, logged, prefix="train")
    self.interval_start, self.interval_steps = time.perf_counter(), 0

  def check_finite(self, logged: Dict[str, float]) -> None:
    first_bad = int(jax.device_get(self.state.first_nonfinite_step))
    if first_bad >= 0:
      self.ckpt.wait()
      raise NonFiniteLossError(first_bad, logged, self.last_checkpoint, self.ckpt.directory)

  def save(self, done: int) -> None:
    self.check_finite({})
    extra = dict(best=self.tracker.record) if self.tracker is not None else None
    # Checkpoints hold one subtree per layer (`Trainer.to_stored`), whatever the state's layout.
    self.ckpt.save(self.trainer.to_stored(self.state), config=self.config,
                   data_position=_data_position(done, self.steps_per_epoch, self.config),
                   extra_meta=extra)
    self.last_checkpoint = done

  def evaluate(self, done: int) -> None:
    """Evaluates eval.train_splits and applies the best-on-val rule (written by write_best,
    after the train checkpoint of this step)."""
    self.check_finite({})  # a non-finite state is neither evaluated nor written
    jax.block_until_ready(self.pending)  # the interval's steps end in its time, not evaluation's
    paused = time.perf_counter()
    self.eval_results = _evaluate(self.state, self.trainer, self.config, done, self.report,
                                  self.eval_settings)
    self.interval_start += time.perf_counter() - paused  # evaluation time is not training time
    if self.tracker is None:
      return
    epoch = (done - 1) // self.steps_per_epoch  # the epoch (0-based) the last step belongs to
    obs = self.tracker.observe(done, epoch, {
        split: dict(r["metrics"], **r.get("extra_metrics", {}))
        for split, r in self.eval_results.items()})
    settings = self.eval_settings
    name = f"{settings.aggregate}_{settings.metric}"
    self.report.scalars(done, {name: obs.value}, prefix="eval")
    line = f"eval step {done} (epoch {epoch}): {settings.describe()} {obs.value:.2f}"
    if obs.repeated:
      self.report.log(line + " (already recorded by the checkpoint)")
    elif obs.save:
      self.best_pending = obs
    elif obs.new_best:
      self.report.log(line + f", the best so far; the best checkpoint is written from epoch "
                      f"{settings.start_epoch} on (eval.best_start_epoch)")
    else:
      best = self.tracker.best
      self.report.log(line + ("" if best is None else
                              f", best {best['value']:.2f} (step {best['step']}, epoch "
                              f"{best['epoch']})"))

  def write_best(self) -> None:
    """Writes the best checkpoint decided by the last evaluation, once the train checkpoint of
    its step (whose record names it) is complete."""
    obs, self.best_pending = self.best_pending, None
    if obs is None:
      return
    self.ckpt.wait()
    self._save_best(obs.step)
    previous = ("" if obs.previous is None else
                f" > {obs.previous['value']:.2f} (step {obs.previous['step']}, epoch "
                f"{obs.previous['epoch']})")
    self.report.log(f"new best {self.eval_settings.describe()} {obs.value:.2f} at step "
                    f"{obs.step} (epoch {obs.epoch}){previous}: wrote "
                    f"{self.ckpt.best_directory}")

  def _save_best(self, step: int) -> None:
    meta = self.tracker.best_meta(
        self.config, data_position=_data_position(step, self.steps_per_epoch, self.config))
    stored = self.state.replace(params=self.trainer.stored_params(self.state.params))
    self.ckpt.save_best(stored, meta=meta)

  def repair_best(self, resumed_from: int) -> None:
    """After a resume: writes the best checkpoint that a kill between the train checkpoint and
    the best left unwritten (the restored params are those of that step)."""
    if self.tracker is None:
      return
    if self.tracker.reset_reason:
      self.report.log(f"best on val: {self.tracker.reset_reason}")
    todo = self.tracker.to_repair(resumed_from, self.ckpt.best_step())
    if todo == "write":
      self._save_best(resumed_from)
      self.report.log(f"wrote the best checkpoint of step {resumed_from}, which the previous "
                      f"run had not finished, to {self.ckpt.best_directory}")
    elif todo:
      self.report.log(f"warning: {todo}")


def train(config: mlc.ConfigDict, workdir, *, init_from: Optional[str] = None,
          stop_at_step: Optional[int] = None) -> RunResult:
  """Trains (or resumes) the run of `workdir` until the configured end.

  Args:
    config: the full config (model, data, loss, optimizer, schedule, train, mesh, sharding).
    workdir: checkpoints in WORKDIR/checkpoints, TensorBoard events in WORKDIR/tensorboard.
    init_from: a params checkpoint to start from (ignored when the workdir has a checkpoint).
    stop_at_step: stop (with a checkpoint) once the state reaches this step, as a preemption
      would; a later call resumes exactly.
  """
  workdir = pathlib.Path(workdir).absolute()
  mesh = S.make_mesh(config.mesh)
  global_batch = config.data.batch_size
  spe, num_examples = input_lib.steps_per_epoch(config.data, global_batch)
  total = config.train.epochs * spe
  if config.train.max_steps:
    total = min(total, config.train.max_steps)
  # Checked before anything is built: a bad eval.best_metric fails now, not after an epoch.
  eval_settings = best_lib.BestSettings.from_config(config) if "eval" in config else None
  trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=spe)
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                    async_save=config.train.async_checkpoint)
  resumed_from = ckpt.latest_step()
  report = reporting.Reporter(workdir, total_steps=total, start_step=resumed_from or 0,
                              tensorboard=config.train.tensorboard)
  report.log(f"mesh {dict(mesh.shape)} over {len(mesh.devices.flat)} devices "
             f"({jax.devices()[0].platform}), {jax.process_count()} process(es); global batch "
             f"{global_batch}, {num_examples} training examples, {spe} steps per epoch, "
             f"{total} steps")
  _check_checkpoints(trainer, ckpt, resumed_from, init_from)
  # The step compiles (or loads from the persistent cache) beside the state and the pipeline.
  precompile = None if (resumed_from or 0) >= total else step_lib.Precompile(
      trainer, batch_lib.abstract(config.data, global_batch, S.batch_sharding(mesh)),
      log=report.log)
  t0 = time.perf_counter()
  meta = {}
  if resumed_from is not None:
    state, meta = ckpt.restore(trainer)  # its input stream was checked above
    report.log(f"resumed from step {resumed_from} in {ckpt.directory}")
  else:
    state = _init_state(trainer, config, init_from, report)
  start = int(jax.device_get(state.step))
  report.log(f"state ready in {reporting.format_seconds(time.perf_counter() - t0)}")

  input_lib.check_data(config.data, config.model, log=report.log)
  stream = input_lib.TrainInput(config.data, global_batch=global_batch, seed=config.train.seed,
                                steps_per_epoch_=spe,
                                local_rows=S.process_rows(global_batch, mesh))
  run = _Run(config=config, trainer=trainer, ckpt=ckpt, report=report, state=state,
             steps_per_epoch=spe, last_checkpoint=resumed_from, eval_settings=eval_settings)
  tc = config.train
  has_eval = eval_settings is not None and bool(eval_settings.splits)
  if not has_eval and (tc.eval_every_steps or tc.eval_every_epochs):
    report.log("no evaluation: the config has no eval section with train_splits")
  if has_eval and eval_settings.metric:
    run.tracker = best_lib.BestTracker(eval_settings, meta.get("best"))
  stopped = "finished"
  try:
    if resumed_from is not None:
      run.repair_best(resumed_from)
    batches = stream.batches(start)
    train_step = None  # taken at the first step, once the precompile has ended
    for step in range(start, total):
      batch = S.global_batch(next(batches), mesh)
      if train_step is None:
        train_step = precompile.wait() if precompile else step_lib.jit_train_step(trainer)
      run.step(train_step, batch, first=step == start,
               compile_started=precompile.started if precompile else None,
               program_origin=precompile.origin if precompile else None)
      done = step + 1
      if _due(done, tc.log_every_steps, 0, spe) or done == total:
        run.log(done)
      if has_eval and _due(done, tc.eval_every_steps, tc.eval_every_epochs, spe) and (
          done != total):
        run.evaluate(done)  # before the checkpoint: its best record includes this evaluation
      if (_due(done, tc.checkpoint_every_steps, tc.checkpoint_every_epochs, spe) and (
          done != total)) or run.best_pending is not None:
        run.save(done)
      run.write_best()
      if stop_at_step is not None and done >= stop_at_step and done != total:
        stopped = "stop_at_step"
        break
      if tc.distributed and ckpt.reached_preemption(done):
        stopped = "preempted"
        break
    done = int(jax.device_get(run.state.step))
    run.collect(done)  # steps after the last log (stop_at_step, preemption)
    if stopped == "finished" and has_eval:
      run.evaluate(done)
    if run.last_checkpoint != done:
      run.save(done)
    run.write_best()
    ckpt.wait()
  finally:
    ckpt.close()
    report.close()
  return RunResult(steps_done=done, total_steps=total, steps_per_epoch=spe, stopped=stopped,
                   losses=run.losses, last_checkpoint=run.last_checkpoint,
                   eval_results=run.eval_results, resumed_from=resumed_from,
                   best=None if run.tracker is None else run.tracker.record,
                   input_open_seconds=stream.open_seconds)
