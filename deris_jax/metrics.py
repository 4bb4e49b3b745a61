"""RIS and GRES segmentation metrics as the official DeRIS code computes them (pure numpy).

The accumulators hold only integer counts (int64) and one float64 sum per metric, so batches
can be added in any order, shards merged with `merge`, and states all-gathered across hosts
(`state()` / `from_state()`). Formulas follow `deris/apis/test.py::accuracy` (RefCOCO/+/g) and
`deris/evaluations/grefcoco.py::gres_evaluate` (gRefCOCO), docs/design.md §10:

RIS (per sample I = |P & G|, U = |P | G|, IoU = I/U, or 0 when U < 1):
  mIoU = 100 mean IoU, oIoU = 100 sum I / sum U, Pr@t = 100 mean[IoU >= t], t = 0.5 .. 0.9.
GRES (pred_nt / gt_nt: predicted / true "no target"):
  gt_nt and pred_nt      : IoU 1, adds 0 to I and U            (official "TP")
  gt_nt and not pred_nt  : IoU 0, adds 0 to I and U to U        (official "FN")
  target and pred_nt     : I := 0, IoU = 0/U                    (official "FP")
  target and not pred_nt : IoU = I/U (0 if U = 0)               (official "TN")
  gIoU = 100 mean IoU, cIoU = 100 sum I / sum U, N-acc = 100 TP/(TP+FN),
  T-acc = 100 TN/(TN+FP), Pr@t over target samples only, t = 0.7, 0.8, 0.9.
`result()` returns exactly the official metrics; `extra_result()` what the official code does
not report: for GRES, mIoU = 100 mean IoU over the target samples (the RIS mIoU of the
expressions that have a target; a missed target counts 0).

Where the official code would divide by zero (or, for T-acc/N-acc without no-target samples,
print 0 for both), `result()` returns NaN: the ratio is undefined, not zero. mIoU sums IoUs in
float64; the official float32 mean differs by ~1e-6 (3e-6 measured on 400 samples). Per-sample IoU thresholds
are compared in float64 (`gres_evaluate` does the same; `accuracy` compares float32 IoUs,
which provably gives the same decisions while the union is below 1.6 million pixels: at
384x384 and at COCO's 640x640 always).

`TauSweep` evaluates a grid of score thresholds tau in one pass: the union mask at tau is
`pixel_score > tau`, where `pixel_score` is the highest score of the queries whose binary mask
covers the pixel (see `deris_jax.inference.score_map`), so one sort of the pixels against the
grid gives every tau's intersection and union.
"""
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type

import numpy as np

RIS_PR_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
GRES_PR_THRESHOLDS = (0.7, 0.8, 0.9)


# ------------------------------------------------------------------------------------------
# Input checks and per-sample pixel counts.
# ------------------------------------------------------------------------------------------
def _bool_array(name: str, value: Any, ndim: int) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype != np.bool_:
    raise TypeError(f"{name} must be a boolean array, got dtype {array.dtype} with shape "
                    f"{array.shape} (threshold logits/probabilities before passing them)")
  if array.ndim != ndim:
    raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
  return array


def _batch_vector(name: str, value: Any, batch: int, *, dtype_kind: str) -> np.ndarray:
  """A (B,) array of the given kind ('b' bool, 'i' integer)."""
  array = np.asarray(value)
  if array.shape != (batch,):
    raise ValueError(f"{name} must have shape ({batch},), got {array.shape}")
  if dtype_kind == "b" and array.dtype != np.bool_:
    raise TypeError(f"{name} must be boolean, got dtype {array.dtype}")
  if dtype_kind == "i":
    if array.dtype.kind not in "iu":
      raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if (array < 0).any():
      raise ValueError(f"{name} must be non-negative, got min {array.min()}")
    array = array.astype(np.int64)
  return array


def _valid_vector(valid: Optional[Any], batch: int) -> np.ndarray:
  if valid is None:
    return np.ones((batch,), np.bool_)
  return _batch_vector("valid", valid, batch, dtype_kind="b")


def mask_counts(pred_masks: Any, gt_masks: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-sample pixel counts of boolean (B, H, W) masks.

  Returns:
    (intersection, pred_area, gt_area), each (B,) int64.
  """
  pred = _bool_array("pred_masks", pred_masks, 3)
  gt = _bool_array("gt_masks", gt_masks, 3)
  if pred.shape != gt.shape:
    raise ValueError(f"pred_masks {pred.shape} and gt_masks {gt.shape} must have the same shape")
  batch = pred.shape[0]
  pred_flat = pred.reshape(batch, -1)  # (B, H*W)
  gt_flat = gt.reshape(batch, -1)  # (B, H*W)
  intersection = np.count_nonzero(pred_flat & gt_flat, axis=1).astype(np.int64)  # (B,)
  pred_area = np.count_nonzero(pred_flat, axis=1).astype(np.int64)  # (B,)
  gt_area = np.count_nonzero(gt_flat, axis=1).astype(np.int64)  # (B,)
  return intersection, pred_area, gt_area


def _checked_counts(intersection, pred_area, gt_area):
  intersection = np.asarray(intersection)
  if intersection.ndim != 1:
    raise ValueError(f"intersection must be (B,), got shape {intersection.shape}")
  batch = intersection.shape[0]
  intersection = _batch_vector("intersection", intersection, batch, dtype_kind="i")
  pred_area = _batch_vector("pred_area", pred_area, batch, dtype_kind="i")
  gt_area = _batch_vector("gt_area", gt_area, batch, dtype_kind="i")
  if (intersection > np.minimum(pred_area, gt_area)).any():
    raise ValueError("intersection exceeds pred_area or gt_area for some sample")
  return intersection, pred_area, gt_area


def _ratio(numerator, denominator) -> float:
  """100 * n / d in float64; NaN where d == 0 (the metric is undefined)."""
  if denominator == 0:
    return float("nan")
  return 100.0 * float(numerator) / float(denominator)


def _pr_key(threshold: float) -> str:
  return f"Pr@{threshold:.1f}"


# ------------------------------------------------------------------------------------------
# Accumulators.
# ------------------------------------------------------------------------------------------
class _Accumulator:
  """Sums/counts named in `FIELDS` (name -> (dtype, shape)); exact to merge and gather."""

  FIELDS: ClassVar[Mapping[str, Tuple[type, Tuple[int, ...]]]] = {}

  def __init__(self):
    self._sums = {name: np.zeros(shape, dtype) for name, (dtype, shape) in self.FIELDS.items()}

  def state(self) -> Dict[str, np.ndarray]:
    """A flat dict of numpy arrays (copies): int64 counts and float64 sums."""
    return {name: value.copy() for name, value in self._sums.items()}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]):
    """Rebuilds an accumulator from `state()`.

    Leading axes beyond a field's own shape are summed over, so the result of an all-gather
    (one state per host stacked on axis 0) can be passed directly. Dtypes must be int64 /
    float64: a gather that silently downcast (for example through jax arrays without x64)
    is rejected rather than merged with lost precision or overflowed counts.
    """
    missing = sorted(set(cls.FIELDS) - set(state))
    extra = sorted(set(state) - set(cls.FIELDS))
    if missing or extra:
      raise KeyError(f"{cls.__name__} state: missing keys {missing}, unexpected keys {extra}")
    out = cls()
    for name, (dtype, shape) in cls.FIELDS.items():
      value = np.asarray(state[name])
      if value.dtype != dtype:
        raise TypeError(f"{cls.__name__} state['{name}'] has dtype {value.dtype}, expected "
                        f"{np.dtype(dtype).name}")
      trailing = value.shape[value.ndim - len(shape):] if shape else ()
      if value.ndim < len(shape) or trailing != shape:
        raise ValueError(f"{cls.__name__} state['{name}'] has shape {value.shape}, expected "
                         f"{shape} (optionally with leading gathered axes)")
      leading_axes = tuple(range(value.ndim - len(shape)))
      out._sums[name] = value.sum(axis=leading_axes, dtype=dtype).reshape(shape)
    return out

  def merge(self, other: "_Accumulator") -> "_Accumulator":
    """Adds `other`'s sums into this accumulator (in place) and returns self."""
    if type(other) is not type(self):
      raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
    for name in self._sums:
      self._sums[name] = self._sums[name] + other._sums[name]
    return self

  def result(self) -> Dict[str, float]:
    raise NotImplementedError

  def extra_result(self) -> Dict[str, float]:
    """Metrics the official code does not report (none unless a subclass adds some)."""
    return {}


class RISMetrics(_Accumulator):
  """RefCOCO/+/g metrics: mIoU, oIoU, Pr@0.5 .. Pr@0.9 (percent)."""

  PR_THRESHOLDS: ClassVar[Tuple[float, ...]] = RIS_PR_THRESHOLDS
  FIELDS = {
      "num_samples": (np.int64, ()),
      "iou_sum": (np.float64, ()),
      "intersection_sum": (np.int64, ()),
      "union_sum": (np.int64, ()),
      "pr_hits": (np.int64, (len(RIS_PR_THRESHOLDS),)),
  }

  def update(self, pred_masks: Any, gt_masks: Any, *, valid: Optional[Any] = None) -> None:
    """Adds a batch of boolean (B, H, W) masks; `valid` (B,) bool drops padded samples."""
    self.update_counts(*mask_counts(pred_masks, gt_masks), valid=valid)

  def update_counts(self, intersection: Any, pred_area: Any, gt_area: Any, *,
                    valid: Optional[Any] = None) -> None:
    """Adds per-sample pixel counts, each (B,) int."""
    intersection, pred_area, gt_area = _checked_counts(intersection, pred_area, gt_area)
    keep = _valid_vector(valid, intersection.shape[0])  # (B,)
    intersection, pred_area, gt_area = intersection[keep], pred_area[keep], gt_area[keep]
    union = pred_area + gt_area - intersection  # (B',)
    iou = np.where(union >= 1, intersection / np.maximum(union, 1), 0.0)  # (B',) float64
    thresholds = np.asarray(self.PR_THRESHOLDS, np.float64)
    s = self._sums
    s["num_samples"] += keep.sum()
    s["iou_sum"] += iou.sum()
    s["intersection_sum"] += intersection.sum()
    s["union_sum"] += union.sum()
    s["pr_hits"] += (iou[:, None] >= thresholds[None, :]).sum(axis=0)  # (T,)

  @property
  def num_samples(self) -> int:
    return int(self._sums["num_samples"])

  def result(self) -> Dict[str, float]:
    s = self._sums
    count = int(s["num_samples"])
    if count == 0:
      raise ValueError("RISMetrics.result(): no samples were accumulated")
    out = {
        "mIoU": 100.0 * float(s["iou_sum"]) / count,
        "oIoU": _ratio(s["intersection_sum"], s["union_sum"]),
    }
    for threshold, hits in zip(self.PR_THRESHOLDS, s["pr_hits"]):
      out[_pr_key(threshold)] = _ratio(hits, count)
    return out


class GRESMetrics(_Accumulator):
  """gRefCOCO metrics: gIoU, cIoU, N-acc, T-acc, Pr@0.7 .. Pr@0.9 (percent); extra: mIoU."""

  PR_THRESHOLDS: ClassVar[Tuple[float, ...]] = GRES_PR_THRESHOLDS
  FIELDS = {
      "iou_sum": (np.float64, ()),
      "intersection_sum": (np.int64, ()),
      "union_sum": (np.int64, ()),
      "no_target_correct": (np.int64, ()),  # official "TP": gt_nt and pred_nt
      "no_target_wrong": (np.int64, ()),  # official "FN": gt_nt, a mask was predicted
      "target_correct": (np.int64, ()),  # official "TN": target, not pred_nt
      "target_missed": (np.int64, ()),  # official "FP": target, pred_nt
      "pr_hits": (np.int64, (len(GRES_PR_THRESHOLDS),)),  # over target samples
      "target_iou_sum": (np.float64, ()),  # IoUs of the target samples
  }

  def update(self, pred_masks: Any, gt_masks: Any, pred_no_target: Any, gt_no_target: Any, *,
             valid: Optional[Any] = None) -> None:
    """Adds a batch: masks (B, H, W) bool, no-target flags (B,) bool, `valid` (B,) bool."""
    self.update_counts(*mask_counts(pred_masks, gt_masks), pred_no_target, gt_no_target,
                       valid=valid)

  def update_counts(self, intersection: Any, pred_area: Any, gt_area: Any, pred_no_target: Any,
                    gt_no_target: Any, *, valid: Optional[Any] = None) -> None:
    """Adds per-sample pixel counts (B,) int and no-target flags (B,) bool."""
    intersection, pred_area, gt_area = _checked_counts(intersection, pred_area, gt_area)
    batch = intersection.shape[0]
    pred_nt = _batch_vector("pred_no_target", pred_no_target, batch, dtype_kind="b")
    gt_nt = _batch_vector("gt_no_target", gt_no_target, batch, dtype_kind="b")
    keep = _valid_vector(valid, batch)  # (B,)
    intersection, pred_area, gt_area = intersection[keep], pred_area[keep], gt_area[keep]
    pred_nt, gt_nt = pred_nt[keep], gt_nt[keep]

    union = pred_area + gt_area - intersection  # (B',)
    target = ~gt_nt  # (B',)
    target_intersection = np.where(pred_nt, 0, intersection)  # (B',) official: FP sets I = 0
    target_iou = np.where(union > 0, target_intersection / np.maximum(union, 1), 0.0)  # (B',)
    iou = np.where(gt_nt, pred_nt.astype(np.float64), target_iou)  # (B',)
    added_intersection = np.where(gt_nt, 0, target_intersection)  # (B',)
    added_union = np.where(gt_nt & pred_nt, 0, union)  # (B',)
    thresholds = np.asarray(self.PR_THRESHOLDS, np.float64)

    s = self._sums
    s["iou_sum"] += iou.sum()
    s["intersection_sum"] += added_intersection.sum()
    s["union_sum"] += added_union.sum()
    s["no_target_correct"] += np.count_nonzero(gt_nt & pred_nt)
    s["no_target_wrong"] += np.count_nonzero(gt_nt & ~pred_nt)
    s["target_correct"] += np.count_nonzero(target & ~pred_nt)
    s["target_missed"] += np.count_nonzero(target & pred_nt)
    s["pr_hits"] += ((iou[:, None] >= thresholds[None, :]) & target[:, None]).sum(axis=0)  # (T,)
    s["target_iou_sum"] += iou[target].sum()

  @property
  def num_samples(self) -> int:
    s = self._sums
    return int(s["no_target_correct"] + s["no_target_wrong"] + s["target_correct"]
               + s["target_missed"])

  def result(self) -> Dict[str, float]:
    s = self._sums
    count = self.num_samples
    if count == 0:
      raise ValueError("GRESMetrics.result(): no samples were accumulated")
    num_no_target = s["no_target_correct"] + s["no_target_wrong"]
    num_target = s["target_correct"] + s["target_missed"]
    out = {
        "gIoU": 100.0 * float(s["iou_sum"]) / count,
        "cIoU": _ratio(s["intersection_sum"], s["union_sum"]),
        "N-acc": _ratio(s["no_target_correct"], num_no_target),
        "T-acc": _ratio(s["target_correct"], num_target),
    }
    for threshold, hits in zip(self.PR_THRESHOLDS, s["pr_hits"]):
      out[_pr_key(threshold)] = _ratio(hits, num_target)
    return out

  def extra_result(self) -> Dict[str, float]:
    """{'mIoU': 100 mean IoU over the target samples} (NaN without target samples)."""
    s = self._sums
    return {"mIoU": _ratio(s["target_iou_sum"], s["target_correct"] + s["target_missed"])}


METRICS: Dict[str, Type[_Accumulator]] = {"ris": RISMetrics, "gres": GRESMetrics}


# ------------------------------------------------------------------------------------------
# Score-threshold sweep.
# ------------------------------------------------------------------------------------------
def pixel_scores_from_queries(query_scores: Any, query_masks: Any) -> np.ndarray:
  """(B, H, W) float32: max score of the queries whose mask covers a pixel, -inf if none.

  The union of the masks of queries with score > tau is exactly `pixel_scores > tau`.
  `deris_jax.inference.score_map` computes the same map on device from the logits.
  """
  scores = np.asarray(query_scores, np.float32)
  masks = _bool_array("query_masks", query_masks, 4)
  if scores.shape != masks.shape[:2]:
    raise ValueError(f"query_scores {scores.shape} must be the (B, N) of query_masks "
                     f"{masks.shape}")
  covered = np.where(masks, scores[:, :, None, None], np.float32(-np.inf))  # (B, N, H, W)
  return covered.max(axis=1)  # (B, H, W)


class TauSweep:
  """One metrics accumulator per score threshold tau, all updated from a single pass.

  Matches running `predict(..., score_threshold=tau)` followed by `metrics.update` for each
  tau separately: a query passes when its float32 score is > float32(tau), as in the official
  torch comparison (`scores > threshold` on a float32 tensor) and in `inference.predict`.

  Args:
    taus: distinct score thresholds.
    metric: 'ris' or 'gres' (`METRICS`).
  """

  def __init__(self, taus: Sequence[float], metric: str):
    if metric not in METRICS:
      raise ValueError(f"unknown metric '{metric}'; known: {sorted(METRICS)}")
    taus = tuple(float(t) for t in taus)
    if not taus:
      raise ValueError("taus must not be empty")
    taus32 = np.asarray(taus, np.float32)
    if len(set(taus32.tolist())) != len(taus):
      raise ValueError(f"taus must be distinct in float32, got {taus}")
    self.taus = taus
    self.metric = metric
    self._order = np.argsort(taus32, kind="stable")  # sorted position -> index in taus
    self._sorted_taus32 = taus32[self._order]  # (T,) ascending
    self.accumulators = [METRICS[metric]() for _ in taus]

  def update(self, query_scores: Any, query_masks: Any, gt_masks: Any,
             gt_no_target: Optional[Any] = None, *, valid: Optional[Any] = None,
             veto: Optional[Any] = None) -> None:
    """Adds a batch from per-query scores (B, N) and binary masks (B, N, H, W) bool."""
    self.update_from_score_map(pixel_scores_from_queries(query_scores, query_masks),
                               query_scores, gt_masks, gt_no_target, valid=valid, veto=veto)

  def update_from_score_map(self, pixel_scores: Any, query_scores: Any, gt_masks: Any,
                            gt_no_target: Optional[Any] = None, *, valid: Optional[Any] = None,
                            veto: Optional[Any] = None) -> None:
    """Adds a batch from `inference.score_map` output.

    Args:
      pixel_scores: (B, H, W) float, see `pixel_scores_from_queries`.
      query_scores: (B, N) float; no target at tau when no score is > tau.
      gt_masks: (B, H, W) bool.
      gt_no_target: (B,) bool, required for 'gres', must be None for 'ris'.
      valid: (B,) bool, False for padded samples.
      veto: (B,) bool, True where the existence head vetoes (empty mask, no target at every
        tau), as `predict(existence_veto=True)` does.
    """
    pixels = np.asarray(pixel_scores, np.float32)
    scores = np.asarray(query_scores, np.float32)
    gt = _bool_array("gt_masks", gt_masks, 3)
    if pixels.shape != gt.shape:
      raise ValueError(f"pixel_scores {pixels.shape} and gt_masks {gt.shape} must match")
    batch = gt.shape[0]
    if scores.ndim != 2 or scores.shape[0] != batch:
      raise ValueError(f"query_scores must be (B={batch}, N), got {scores.shape}")
    if np.isnan(scores).any() or np.isnan(pixels).any():
      raise ValueError("query_scores / pixel_scores contain NaN")
    if (self.metric == "gres") != (gt_no_target is not None):
      raise ValueError(f"gt_no_target is required for 'gres' and not accepted for 'ris' "
                       f"(metric is '{self.metric}')")
    if veto is not None:
      vetoed = _batch_vector("veto", veto, batch, dtype_kind="b")
      pixels = np.where(vetoed[:, None, None], np.float32(-np.inf), pixels)
      scores = np.where(vetoed[:, None], np.float32(-np.inf), scores)

    num_taus = len(self.taus)
    # Number of (sorted) taus strictly below each pixel score: the pixel is in the union mask
    # of sorted tau j exactly when j < passed.
    passed = np.searchsorted(self._sorted_taus32, pixels.reshape(batch, -1), side="left")
    bins = passed + (num_taus + 1) * np.arange(batch)[:, None]  # (B, H*W)
    gt_flat = gt.reshape(batch, -1)  # (B, H*W)
    length = batch * (num_taus + 1)
    pred_hist = np.bincount(bins.ravel(), minlength=length).reshape(batch, num_taus + 1)
    inter_hist = np.bincount(bins[gt_flat], minlength=length).reshape(batch, num_taus + 1)
    # Pixels on for sorted tau j: those with passed > j, a suffix sum of the histogram.
    pred_area = np.cumsum(pred_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (B, T)
    intersection = np.cumsum(inter_hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (B, T)
    gt_area = np.count_nonzero(gt_flat, axis=1).astype(np.int64)  # (B,)
    max_score = scores.max(axis=1) if scores.shape[1] else np.full((batch,), -np.inf, np.float32)

    for sorted_index, tau_index in enumerate(self._order):
      accumulator = self.accumulators[tau_index]
      counts = (intersection[:, sorted_index], pred_area[:, sorted_index], gt_area)
      if self.metric == "gres":
        pred_no_target = ~(max_score > self._sorted_taus32[sorted_index])  # (B,)
        accumulator.update_counts(*counts, pred_no_target, gt_no_target, valid=valid)
      else:
        accumulator.update_counts(*counts, valid=valid)

  def merge(self, other: "TauSweep") -> "TauSweep":
    """Adds `other` (same taus and metric) into this sweep, in place; returns self."""
    if not isinstance(other, TauSweep) or other.taus != self.taus or other.metric != self.metric:
      raise ValueError("can only merge a TauSweep with the same taus and metric")
    for mine, theirs in zip(self.accumulators, other.accumulators):
      mine.merge(theirs)
    return self

  def state(self) -> Dict[str, np.ndarray]:
    """Each accumulator field stacked over taus: {field: (T, *field_shape)}."""
    states = [a.state() for a in self.accumulators]
    return {name: np.stack([s[name] for s in states]) for name in states[0]}

  @classmethod
  def from_state(cls, state: Mapping[str, Any], taus: Sequence[float], metric: str) -> "TauSweep":
    """Rebuilds a sweep from `state()`; leading gathered axes before T are summed over."""
    sweep = cls(taus, metric)
    fields = METRICS[metric].FIELDS
    unknown = sorted(set(state) - set(fields))
    if unknown:
      raise KeyError(f"TauSweep state for '{metric}': unexpected keys {unknown}")
    num_taus = len(sweep.taus)
    per_tau = [{} for _ in range(num_taus)]
    for name, value in state.items():
      value = np.asarray(value)
      tau_axis = value.ndim - len(fields[name][1]) - 1  # the T axis precedes the field's shape
      if tau_axis < 0 or value.shape[tau_axis] != num_taus:
        raise ValueError(f"TauSweep state['{name}'] has shape {value.shape}, expected "
                         f"(..., {num_taus}, *{fields[name][1]}) for {num_taus} taus")
      for j in range(num_taus):
        per_tau[j][name] = np.take(value, j, axis=tau_axis)
    sweep.accumulators = [METRICS[metric].from_state(s) for s in per_tau]
    return sweep

  def result(self) -> Dict[float, Dict[str, float]]:
    """{tau: metrics dict} in the order of `taus`."""
    return {tau: accumulator.result() for tau, accumulator in zip(self.taus, self.accumulators)}
