"""Best on validation, as the official tools/train.py keeps `segm_best.pth`.

After each evaluation during training the metric `config.eval.best_metric`, averaged over
`config.eval.train_splits`, is compared with every earlier evaluation (`BestTracker`, strictly
greater wins; the record goes into each train checkpoint's meta as `best`, so an exact resume
continues the comparison). When an evaluation of epoch >= `config.eval.best_start_epoch` is the
new best, the loop writes its params to `WORKDIR/checkpoints/best`
(`checkpointing.Checkpointer.save_best`).
"""
import copy
import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import ml_collections as mlc
import numpy as np

from deris_jax import metrics as metrics_lib

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


def json_safe(value):
  """NaN/inf -> None (strict JSON), tuples -> lists."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
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
    self.record: Dict[str, Any] = copy.deepcopy(json_safe(dict(record)))
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
      self.record["best"] = json_safe(dict(
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
    return json_safe(dict(
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
