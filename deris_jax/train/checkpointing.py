"""Training checkpoints: the shared Orbax format plus what an exact resume needs.

Each step directory of `WORKDIR/checkpoints` holds the items
  params     every model parameter, nested dict with string keys (`deris_jax.checkpoint`
             format, so eval / predict / --init_from read it with `checkpoint.load_model`)
  meta       JSON: kind 'train', the config, the step, and `data` = the input position
             (epoch, batches consumed in it, steps per epoch, global batch, seed)
  opt_state  the optimizer state as a nested dict named by its tree paths
  train      step and the train key data
Saves are atomic (Orbax writes a temporary directory and renames it when complete), so a
save interrupted by a kill leaves the previous step the latest one; unfinished temporary
directories are removed when the manager opens. Restoring reads straight into the
shardings of the current mesh (which may differ from the one that saved).

Best on validation (the official tools/train.py): after each evaluation during training the
metric `config.eval.best_metric`, averaged over `config.eval.train_splits`, is compared with
every earlier evaluation (`BestTracker`, strictly greater wins; the record goes into each train
checkpoint's meta as `best`, so an exact resume continues the comparison). When an evaluation
of epoch >= `config.eval.best_start_epoch` is the new best, its params are written to
`WORKDIR/checkpoints/best` (a manager directory of its own, one step: params + meta of kind
'best', the format `deris_jax.checkpoint.load_model` reads), after the train checkpoint of the
same step, so the best never gets ahead of the train checkpoints: a run killed between the two
writes resumes from that train checkpoint and writes the best from it (`best_to_repair`).
"""
import copy
import dataclasses
import math
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from deris_jax import checkpoint as ckpt_lib
from deris_jax import metrics as metrics_lib
from deris_jax import trees
from deris_jax.train import params as P
from deris_jax.train.state import Trainer, TrainState


def _abstract_with_shardings(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def _named_tree(tree) -> Dict[str, Any]:
  """Any pytree -> nested dict keyed by its path names (what Orbax stores)."""
  return ckpt_lib.unflatten(trees.named_leaves(tree))


def _from_named_tree(named: Dict[str, Any], like, *, item: str):
  """Inverse of `_named_tree` given a tree of the wanted structure."""
  flat = ckpt_lib.flatten_tree(named)
  names = trees.named_leaves(like)
  missing = sorted(set(names) - set(flat))
  if missing:
    raise ckpt_lib.CheckpointError(f"checkpoint item '{item}' lacks {len(missing)} entries "
                                   f"(e.g. '{missing[0]}'): was it written by another config?")
  leaves = [flat[name] for name in names]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


# Orbax splits every replicated array into one slice per replica to write them in parallel
# (its CPU/TPU default). For the ~1500 small arrays of a DeRIS state that costs thousands of
# eagerly dispatched slices (measured: 8.5 s per save of the micro test config, 24 s the first
# time); arrays below this size are written whole by one replica instead.
MIN_BYTES_FOR_REPLICA_PARALLEL = 4 << 20
PYTREE_ITEMS = ("params", "opt_state", "train")


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  th = ocp.type_handlers
  array = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_BYTES_FOR_REPLICA_PARALLEL)
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
      (np.ndarray, th.NumpyHandler()), (jax.Array, array), (str, th.StringHandler()))


def _pytree_restore(abstract) -> ocp.args.PyTreeRestore:
  """Restore args that read every array straight into the abstract tree's shardings."""
  return ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
  """Periodic, keep-N, optionally asynchronous train checkpoints in `directory`, and the best
  one in `directory/best` (`save_best`, synchronous)."""

  def __init__(self, directory, *, keep: Optional[int], async_save: bool):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    registry = _type_handlers()
    handlers = {name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
                for name in PYTREE_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)
    self.best_directory = self.directory / ckpt_lib.BEST_DIRECTORY
    self._best = None
    if self.best_directory.is_dir():  # opening removes what a killed best save left
      self._best_manager()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, state: TrainState, *, config: mlc.ConfigDict, data_position: Dict[str, int],
           extra_meta: Optional[Dict[str, Any]] = None) -> int:
    """Writes the state at its step (returns it); async saves copy to host before returning."""
    step = int(jax.device_get(state.step))
    meta = dict(kind="train", config=config.to_dict(), step=step, data=dict(data_position),
                **(extra_meta or {}))
    args = ocp.args.Composite(
        params=ocp.args.PyTreeSave(P.to_checkpoint_tree(state.params)),
        opt_state=ocp.args.PyTreeSave(_named_tree(state.opt_state)),
        train=ocp.args.PyTreeSave(dict(step=state.step, rng=state.rng)),
        meta=ocp.args.JsonSave(meta))
    with jax.transfer_guard("allow"):  # the device-to-host copy is the point of saving
      self._manager.save(step, args=args, force=True)
    return step

  def restore(self, trainer: Trainer, step: Optional[int] = None
              ) -> Tuple[TrainState, Dict[str, Any]]:
    """(state in the trainer's shardings, meta) of a step (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ckpt_lib.CheckpointError(f"{self.directory} holds no checkpoint")
    abstract, shardings = trainer.abstract_state, trainer.state_shardings
    params_abs = _abstract_with_shardings(abstract.params, shardings.params)
    opt_abs = _abstract_with_shardings(abstract.opt_state, shardings.opt_state)
    train_abs = dict(step=jax.ShapeDtypeStruct((), abstract.step.dtype, sharding=shardings.step),
                     rng=jax.ShapeDtypeStruct(abstract.rng.shape, abstract.rng.dtype,
                                              sharding=shardings.rng))
    args = ocp.args.Composite(
        params=_pytree_restore(P.to_checkpoint_tree(params_abs)),
        opt_state=_pytree_restore(_named_tree(opt_abs)),
        train=_pytree_restore(train_abs),
        meta=ocp.args.JsonRestore())
    try:
      with jax.transfer_guard("allow"):
        restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ckpt_lib.CheckpointError(
          f"{self.directory} step {step}: cannot restore the train state ({e}); was it "
          "written by another model or optimizer config?") from e
    params = P.from_checkpoint_tree(restored["params"], abstract.params,
                                    source=f"{self.directory} step {step}")
    opt_state = _from_named_tree(restored["opt_state"], abstract.opt_state, item="opt_state")
    state = TrainState(step=restored["train"]["step"], params=params, opt_state=opt_state,
                       rng=restored["train"]["rng"],
                       first_nonfinite_step=jax.device_put(np.int32(-1),
                                                        shardings.first_nonfinite_step))
    return state, dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until a pending asynchronous save is complete."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def _best_manager(self) -> ocp.CheckpointManager:
    if self._best is None:
      options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=False)
      handlers = {"params": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                  "meta": ocp.JsonCheckpointHandler()}
      self._best = ocp.CheckpointManager(self.best_directory, options=options,
                                         item_handlers=handlers)
    return self._best

  def best_step(self) -> Optional[int]:
    """The step of the best checkpoint (None: none written)."""
    if self._best is None and not self.best_directory.is_dir():
      return None
    return self._best_manager().latest_step()

  def save_best(self, state: TrainState, *, meta: Dict[str, Any]) -> int:
    """Writes the params of `state` as the best checkpoint (replacing the previous one).

    Synchronous and atomic: Orbax writes a temporary directory, renames it when complete and
    only then removes the previous best, so a kill leaves the previous or the new best.
    """
    step = int(meta["step"])
    mngr = self._best_manager()
    if step in mngr.all_steps():  # written before the train checkpoints were rolled back
      mngr.delete(step)
    args = ocp.args.Composite(params=ocp.args.PyTreeSave(P.to_checkpoint_tree(state.params)),
                              meta=ocp.args.JsonSave(_json_safe(dict(meta, kind="best"))))
    with jax.transfer_guard("allow"):
      mngr.save(step, args=args, force=True)
      mngr.wait_until_finished()
    return step

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._best is not None:
      self._best.close()


# ------------------------------------------------------------------------------------------
# Best on validation.
# ------------------------------------------------------------------------------------------
AGGREGATES = ("mean",)  # the official key metric: the mean over the val splits


def task_metric_names(task: str) -> Tuple[str, ...]:
  """Every metric `deris_jax.evaluation.evaluate` reports for a task (official + extra)."""
  pr = tuple(metrics_lib._pr_key(t)  # pylint: disable=protected-access
             for t in metrics_lib.METRICS[task].PR_THRESHOLDS)
  if task == "ris":
    return ("mIoU", "oIoU") + pr
  return ("gIoU", "cIoU", "N-acc", "T-acc") + pr + ("mIoU",)


@dataclasses.dataclass(frozen=True)
class BestSettings:
  """Evaluation during training and the best-on-val selection (configs/eval_common.py)."""
  splits: Tuple[str, ...]  # eval.train_splits
  score_threshold: float  # eval.train_score_threshold
  metric: Optional[str]  # eval.best_metric; None: no best checkpoint
  aggregate: str  # eval.best_aggregate: how the splits' values combine ('mean')
  start_epoch: int  # eval.best_start_epoch (0-based)

  @classmethod
  def from_config(cls, config: mlc.ConfigDict) -> "BestSettings":
    """Reads and checks the fields (configs without them: eval.splits, eval.score_threshold,
    no best checkpoint)."""
    ev = config.eval
    splits = tuple(ev.get("train_splits", ev.get("splits", ())) or ())
    tau = ev.get("train_score_threshold", None)
    tau = float(ev.score_threshold if tau is None else tau)
    if not 0.0 <= tau < 1.0:
      raise ValueError(f"config eval.train_score_threshold {tau} must be in [0, 1)")
    metric = ev.get("best_metric", None) or None
    names = task_metric_names(ev.task)
    if metric is not None and metric not in names:
      raise ValueError(f"config eval.best_metric '{metric}' is not a metric of the "
                       f"'{ev.task}' task (eval.task); one of: {', '.join(names)}")
    aggregate = ev.get("best_aggregate", "mean")
    if aggregate not in AGGREGATES:
      raise ValueError(f"config eval.best_aggregate '{aggregate}': expected one of "
                       f"{', '.join(AGGREGATES)}")
    start = int(ev.get("best_start_epoch", 0))
    if start < 0:
      raise ValueError(f"config eval.best_start_epoch {start} must be >= 0 (0-based epoch)")
    return cls(splits=splits, score_threshold=tau, metric=metric, aggregate=aggregate,
               start_epoch=start)

  def identity(self) -> Dict[str, Any]:
    """What makes two evaluations comparable (kept in the record)."""
    return dict(metric=self.metric, aggregate=self.aggregate, splits=list(self.splits),
                score_threshold=self.score_threshold)

  def describe(self) -> str:
    return f"{self.aggregate} {self.metric} over {', '.join(self.splits)}"


@dataclasses.dataclass
class Observation:
  """One evaluation as the tracker saw it."""
  step: int
  epoch: int
  value: float  # the aggregated metric (NaN if undefined)
  per_split: Dict[str, float]
  previous: Optional[Dict[str, Any]]  # the best entry before this evaluation
  repeated: bool = False  # the record already holds this step (re-evaluation of a resume)
  new_best: bool = False  # strictly greater than every earlier evaluation
  save: bool = False  # new best at epoch >= start_epoch: write the best checkpoint


def _number(value) -> float:
  return float("nan") if value is None else float(value)


def _finite_or_none(value: float) -> Optional[float]:
  return None if value is None or not math.isfinite(value) else float(value)


def _json_safe(value):
  """NaN/inf -> None (strict JSON), tuples -> lists."""
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return _finite_or_none(float(value))
  if isinstance(value, np.integer):
    return int(value)
  return value


class BestTracker:
  """The official best-on-val rule, as a state that train checkpoints carry (`record`).

  Every evaluation updates the best value when its aggregated metric is strictly greater than
  that of every earlier evaluation (ties and NaN never win), also before `start_epoch`; the
  best checkpoint is written when that happens at an epoch >= `start_epoch`, so an epoch from
  the start on is only written if it beats every earlier epoch.
  """

  def __init__(self, settings: BestSettings, record: Optional[Mapping[str, Any]] = None):
    self.settings = settings
    self.reset_reason: Optional[str] = None  # why a resumed record was not continued
    identity = settings.identity()
    if record is not None:
      kept = {k: record.get(k) for k in identity}
      if kept != identity:
        self.reset_reason = (f"the checkpoint's best record compares {kept} but the config "
                             f"asks for {identity}; the comparison starts again")
        record = None
    if record is None:
      record = dict(identity, best=None, saved_step=None, history=[])
    self.record: Dict[str, Any] = copy.deepcopy(_json_safe(dict(record)))
    self.record["start_epoch"] = settings.start_epoch

  @property
  def best(self) -> Optional[Dict[str, Any]]:
    return self.record["best"]

  @property
  def saved_step(self) -> Optional[int]:
    return self.record["saved_step"]

  def aggregate(self, results: Mapping[str, Mapping[str, float]]) -> Tuple[float,
                                                                           Dict[str, float]]:
    """({aggregate} of the metric over the splits, {split: metric})."""
    missing = [s for s in self.settings.splits if s not in results]
    if missing:
      raise ValueError(f"no evaluation results for {missing} (config eval.train_splits)")
    per_split = {s: _number(results[s].get(self.settings.metric))
                 for s in self.settings.splits}
    return float(np.mean(list(per_split.values()))), per_split

  def observe(self, step: int, epoch: int,
              results: Mapping[str, Mapping[str, float]]) -> Observation:
    """Records an evaluation: `results` = {split: {metric: value}} of eval.train_splits."""
    value, per_split = self.aggregate(results)
    previous = copy.deepcopy(self.best)
    obs = Observation(step=step, epoch=epoch, value=value, per_split=per_split,
                      previous=previous)
    history: List[Dict[str, Any]] = self.record["history"]
    if history and step <= history[-1]["step"]:
      obs.repeated = True
      return obs
    history.append(dict(step=step, epoch=epoch, value=_finite_or_none(value)))
    obs.new_best = math.isfinite(value) and (previous is None or value > previous["value"])
    if obs.new_best:
      self.record["best"] = _json_safe(dict(
          step=step, epoch=epoch, value=value, per_split=per_split,
          metrics={s: dict(results[s]) for s in self.settings.splits}))
      obs.save = epoch >= self.settings.start_epoch
      if obs.save:
        self.record["saved_step"] = step
    return obs

  def best_meta(self, config: mlc.ConfigDict, *,
                data_position: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """The meta of the best checkpoint of the current best entry."""
    best = self.best
    return _json_safe(dict(
        kind="best", config=config.to_dict(), step=best["step"], epoch=best["epoch"],
        metric=self.settings.metric, aggregate=self.settings.aggregate,
        splits=list(self.settings.splits), score_threshold=self.settings.score_threshold,
        value=best["value"], per_split=best["per_split"], metrics=best["metrics"],
        data=dict(data_position or {})))

  def to_repair(self, resumed_step: int, best_step: Optional[int]) -> Optional[str]:
    """On resume: 'write' if the best checkpoint of the resumed step was not written (a kill
    between the train checkpoint and the best), a warning text if it is missing, else None."""
    saved = self.saved_step
    if saved is None or saved == best_step:
      return None
    if saved == resumed_step and self.best is not None and self.best["step"] == saved:
      return "write"
    return (f"the record names a best checkpoint of step {saved} but the best directory "
            f"holds {'none' if best_step is None else f'step {best_step}'}")
