"""The host side of an evaluation: metric accumulation, per-sample records, the merge of hosts.

Per batch the device program (`inference.sample_counts`) brings back per-sample counts at every
tau of (tau, *tau_grid); an `Accumulator` adds them to the metric accumulators
(`deris_jax.metrics`) and keeps one record per row (padding rows included, so every host holds
the same number of rows). `gather_local` all-gathers the hosts' results bit-exactly and
`combine` merges them: every sample of the split counted once, records in the order of the
annotation file. `settings` arguments are `evaluation.EvalSettings`.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from deris_jax import metrics as M

RECORD_FIELDS = ("example_id", "valid", "gt_no_target", "intersection", "pred_area", "gt_area",
                 "pred_no_target", "scores", "existence_prob")


@dataclasses.dataclass
class LocalEval:
  """What one host accumulated: metric states and per-row records (padding rows included,
  so every host has the same number of rows)."""
  state: Dict[str, np.ndarray]
  records: Dict[str, np.ndarray]
  num_truncated: int
  num_examples: int
  index: Any = None  # the split's `pipeline.SplitIndex` (not gathered)


class Accumulator:
  """One host's running evaluation: the main metrics at tau, the tau sweep, the records."""

  def __init__(self, settings):
    self.task = settings.task
    self.main = M.METRICS[settings.task]()
    self.sweep = (M.TauSweep(settings.tau_grid, settings.task) if settings.tau_grid else None)
    self.records = {name: [] for name in RECORD_FIELDS}

  def _update(self, accumulator, counts: Mapping[str, np.ndarray], t: int,
              gt_no_target: np.ndarray, valid: np.ndarray) -> None:
    args = (counts["intersection"][:, t], counts["pred_area"][:, t], counts["gt_area"])
    if self.task == "gres":
      accumulator.update_counts(*args, counts["no_target"][:, t], gt_no_target, valid=valid)
    else:
      accumulator.update_counts(*args, valid=valid)

  def add(self, counts: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray]) -> None:
    """Counts of one batch (column 0: the main tau, then the grid) with its `weight`,
    `exists` and `example_id`."""
    valid = batch["weight"] > 0  # (B,)
    gt_no_target = batch["exists"] == 0  # (B,)
    self._update(self.main, counts, 0, gt_no_target, valid)
    if self.sweep is not None:
      for j, accumulator in enumerate(self.sweep.accumulators):
        self._update(accumulator, counts, 1 + j, gt_no_target, valid)
    for name, value in (("example_id", batch["example_id"]), ("valid", valid),
                        ("gt_no_target", gt_no_target),
                        ("intersection", counts["intersection"][:, 0]),
                        ("pred_area", counts["pred_area"][:, 0]), ("gt_area", counts["gt_area"]),
                        ("pred_no_target", counts["no_target"][:, 0]),
                        ("scores", counts["scores"]),
                        ("existence_prob", counts["existence_prob"])):
      self.records[name].append(np.asarray(value))

  def result(self, *, num_truncated: int, num_examples: int, index: Any = None) -> "LocalEval":
    state = {f"main.{k}": v for k, v in self.main.state().items()}
    if self.sweep is not None:
      state.update({f"sweep.{k}": v for k, v in self.sweep.state().items()})
    records = {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in self.records.items()}
    return LocalEval(state=state, records=records, num_truncated=num_truncated,
                     num_examples=num_examples, index=index)


def allgather_exact(arrays: Mapping[str, np.ndarray],
                    gather: Optional[Callable[[np.ndarray], np.ndarray]] = None
                    ) -> Dict[str, np.ndarray]:
  """{name: (P, *shape)}: each host's array stacked over processes, bit-exact.

  `process_allgather` goes through jax arrays, which (without x64) would turn int64 counts and
  float64 sums into 32-bit values; the raw bytes are gathered instead. Shapes and dtypes must
  agree across hosts. `gather` replaces `multihost_utils.process_allgather` (tests).
  """
  if gather is None:
    if jax.process_count() == 1:
      return {k: np.asarray(v)[None] for k, v in arrays.items()}
    gather = multihost_utils.process_allgather
  out = {}
  for name, value in arrays.items():
    value = np.array(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    raw = value.reshape(-1).view(np.uint8)  # (nbytes,)
    gathered = np.asarray(gather(raw), np.uint8)  # (P, nbytes)
    out[name] = gathered.view(value.dtype).reshape((-1,) + value.shape)
  return out


def per_sample_iou(task: str, intersection, pred_area, gt_area, pred_no_target,
                   gt_no_target) -> np.ndarray:
  """(S,) float64 IoU of each sample as the metrics count it (metrics.py docstring rules)."""
  intersection, pred_area, gt_area = (np.asarray(a, np.int64)
                                      for a in (intersection, pred_area, gt_area))
  union = pred_area + gt_area - intersection
  if task == "ris":
    return np.where(union >= 1, intersection / np.maximum(union, 1), 0.0)
  kept = np.where(pred_no_target, 0, intersection)  # official "FP": I = 0
  target_iou = np.where(union > 0, kept / np.maximum(union, 1), 0.0)
  return np.where(gt_no_target, np.asarray(pred_no_target, np.float64), target_iou)


def combine(locals_: Sequence[LocalEval], settings, *, split: str,
            expected_samples: int) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """Merges the hosts' results: (results dict without timing/protocol, valid records)."""
  gathered = {k: np.stack([l.state[k] for l in locals_]) for k in locals_[0].state}
  main = M.METRICS[settings.task].from_state(
      {k[len("main."):]: v for k, v in gathered.items() if k.startswith("main.")})
  if main.num_samples != expected_samples:
    raise RuntimeError(f"split '{split}': counted {main.num_samples} samples, the split has "
                       f"{expected_samples}")
  records = {k: np.concatenate([l.records[k] for l in locals_]) for k in RECORD_FIELDS}
  keep = records.pop("valid").astype(bool)
  records = {k: v[keep] for k, v in records.items()}
  in_file_order = np.argsort(records["example_id"], kind="stable")
  records = {k: v[in_file_order] for k, v in records.items()}
  if len(np.unique(records["example_id"])) != expected_samples:
    raise RuntimeError(f"split '{split}': per-sample ids are not the split's {expected_samples} "
                       "distinct examples")
  results = {
      "split": split, "task": settings.task, "resolution": settings.resolution,
      "score_threshold": settings.score_threshold, "num_samples": main.num_samples,
      "metrics": main.result(),
      "extra_metrics": main.extra_result(),  # not reported by the official code
      "num_truncated_expressions": int(sum(l.num_truncated for l in locals_)),
  }
  if settings.tau_grid:
    sweep_state = {k[len("sweep."):]: v for k, v in gathered.items() if k.startswith("sweep.")}
    sweep = M.TauSweep.from_state(sweep_state, settings.tau_grid, settings.task)
    results["tau_sweep"] = {tau: values for tau, values in sweep.result().items()}
  records["iou"] = per_sample_iou(settings.task, records["intersection"], records["pred_area"],
                                  records["gt_area"], records["pred_no_target"],
                                  records["gt_no_target"])
  return results, records


def gather_local(local: LocalEval) -> List[LocalEval]:
  """Every host's LocalEval on every host (one exact all-gather)."""
  arrays = {f"state.{k}": v for k, v in local.state.items()}
  arrays.update({f"records.{k}": v for k, v in local.records.items()})
  arrays["meta"] = np.asarray([local.num_truncated, local.num_examples], np.int64)
  gathered = allgather_exact(arrays)
  out = []
  for p in range(gathered["meta"].shape[0]):
    out.append(LocalEval(
        state={k[len("state."):]: v[p] for k, v in gathered.items() if k.startswith("state.")},
        records={k[len("records."):]: v[p] for k, v in gathered.items()
                 if k.startswith("records.")},
        num_truncated=int(gathered["meta"][p, 0]), num_examples=int(gathered["meta"][p, 1])))
  return out


def sample_lines(records: Mapping[str, np.ndarray], describe: Callable[[int], Any],
                 settings) -> List[Dict[str, Any]]:
  """Per-sample JSON objects: ids, expression, counts, IoU, scores and the decision."""
  lines = []
  for i in range(len(records["example_id"])):
    info = describe(int(records["example_id"][i]))
    intersection, pred_area, gt_area = (int(records[k][i])
                                        for k in ("intersection", "pred_area", "gt_area"))
    scores = records["scores"][i]
    lines.append({
        "example_id": info.example_id, "split": info.split, "image_id": info.image_id,
        "expression": info.expressions[0], "source": info.source,
        "num_targets": info.num_targets,
        "resolution": settings.resolution, "score_threshold": settings.score_threshold,
        "iou": float(records["iou"][i]),
        "intersection": intersection, "union": pred_area + gt_area - intersection,
        "pred_area": pred_area, "gt_area": gt_area,
        "no_target_predicted": bool(records["pred_no_target"][i]),
        "no_target_true": bool(records["gt_no_target"][i]),
        "scores": [round(float(s), 6) for s in scores],
        "selected_queries": [int(q) for q in np.flatnonzero(scores > np.float32(
            settings.score_threshold))],
        "existence_prob": round(float(records["existence_prob"][i]), 6),
    })
  return lines
