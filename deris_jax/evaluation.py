"""The evaluation loop shared by eval.py and train.py: forward on every device, metrics on hosts.

Per batch, one jitted forward (batch sharded over every mesh axis, parameters replicated or as
they come) and one jitted post-processing step run on the devices; only per-sample counts come
back to the host: for every score threshold tau in (tau, *tau_grid) the intersection and
predicted area of the union mask (`inference.score_map(...) > tau`, which equals
`inference.predict(..., score_threshold=tau)['mask']`), the no-target decision, the GT area,
and the (N,) query scores. The metric accumulators (`deris_jax.metrics`) are updated on the
host, merged across hosts bit-exactly, and every sample of the split is counted exactly once:
the pipeline pads each host's stream with weight-0 examples (example_id -1), which are
dropped; the count is checked against the split's size.

Resolutions (reference.md §5, §10):
  'reference'  the official protocol: the model's input size, against the union of the
               nearest-resized GT masks (`gt_masks`);
  'original'   each image's own size: the per-query logits are resized bilinearly
               (`inference.resize_logits_to_canvas`, on the data.canvas_size canvas), then
               thresholded, against `gt_mask_orig`.

query_SA groups (reference.md §4, configs/eval_common.py). With `model.reference_compat` and
`model.compat_group_size` g > 1 the model mixes the samples of each group of g consecutive
samples of a batch, so the numbers depend on the grouping. The official numbers come from one
GPU with batch g, in the order of the annotation file: groups of g consecutive entries of the
file, the last one smaller. Here the split is read in that same order (`data.order`: rows keep
the file's order) and cut into global eval batches rounded up to a multiple of g * processes
and of the device count; each process reads its contiguous block of every global batch (whole
groups), and the last incomplete group (real samples followed by padding) is run again on its
own, on one local device, so padding never enters a group. This is exactly the official
grouping for any number of devices and processes and any batch size.
"""
import dataclasses
import json
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deris_jax import inference
from deris_jax import metrics as M

RESOLUTIONS = ("reference", "original")


# ------------------------------------------------------------------------------------------
# Settings.
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Everything that decides the numbers of one evaluation."""
  task: str  # 'ris' | 'gres'
  score_threshold: float  # tau of the main metrics and of the per-sample records
  tau_grid: Tuple[float, ...]  # () unless sweeping
  resolution: str  # 'reference' | 'original'
  mask_threshold: float
  batch_size: int  # configured global eval batch (rounded up by `global_eval_batch`)
  group_size: int  # query_SA group (1 when samples are independent)
  existence_veto: bool
  existence_threshold: float

  @property
  def taus(self) -> Tuple[float, ...]:
    """What the device step thresholds at: the main tau first, then the grid."""
    return (self.score_threshold,) + self.tau_grid


def settings_from_config(config: ml_collections.ConfigDict, *, resolution: str = "reference",
                         score_threshold: Optional[float] = None,
                         tau_sweep: bool = False) -> EvalSettings:
  """Reads `config.eval` (configs/eval_common.py) and checks it against data and model."""
  if "eval" not in config:
    raise ValueError("config has no 'eval' section: add `config.eval = eval_common.eval_config("
                     "VARIANT, config.data)` (configs/eval_common.py)")
  if "data" not in config:
    raise ValueError("config has no 'data' section (configs/data_common.py)")
  ev, data, model = config.eval, config.data, config.model
  if ev.task not in M.METRICS:
    raise ValueError(f"config eval.task '{ev.task}' is not one of {sorted(M.METRICS)}")
  if resolution not in RESOLUTIONS:
    raise ValueError(f"resolution '{resolution}' is not one of {RESOLUTIONS}")
  tau = float(ev.score_threshold if score_threshold is None else score_threshold)
  grid = tuple(float(t) for t in ev.tau_grid) if tau_sweep else ()
  for t in (tau,) + grid:
    if not 0.0 <= t < 1.0:
      raise ValueError(f"score threshold {t} must be in [0, 1) (config eval.score_threshold / "
                       "eval.tau_grid / --score_threshold)")
  if tau_sweep and not grid:
    raise ValueError("config eval.tau_grid is empty: nothing to sweep")
  for field in ("image_size", "cognition_image_size"):
    if tuple(data[field]) != tuple(model[field]):
      raise ValueError(f"config data.{field} {tuple(data[field])} differs from model.{field} "
                       f"{tuple(model[field])}: the model would see another input size")
  if data.max_tokens != model.max_tokens:
    raise ValueError(f"config data.max_tokens {data.max_tokens} differs from model.max_tokens "
                     f"{model.max_tokens}")
  if int(ev.batch_size) < 1:
    raise ValueError(f"config eval.batch_size must be >= 1, got {ev.batch_size}")
  group = int(model.compat_group_size) if model.reference_compat else 1
  return EvalSettings(
      task=ev.task, score_threshold=tau, tau_grid=grid, resolution=resolution,
      mask_threshold=float(ev.mask_threshold), batch_size=int(ev.batch_size),
      group_size=max(group, 1), existence_veto=bool(model.existence_veto),
      existence_threshold=float(model.existence_threshold))


def global_eval_batch(batch_size: int, group_size: int, num_processes: int,
                      num_devices: int) -> int:
  """The smallest multiple of lcm(group * processes, devices) that is >= batch_size.

  Every host's batch is then a whole number of query_SA groups and the global batch splits
  evenly over the devices. The numbers do not depend on the result (module docstring).
  """
  unit = math.lcm(group_size * num_processes, num_devices)
  return -(-batch_size // unit) * unit


# ------------------------------------------------------------------------------------------
# Device steps.
# ------------------------------------------------------------------------------------------
_FORWARDS: List[Tuple[Any, Callable]] = []  # (graphdef, jitted forward); GraphDef is unhashable


def forward_fn(graphdef) -> Callable:
  """The jitted inference forward of a model structure, compiled once per structure and shape.

  Returns fn(state, image, image_mini, text_ids, text_padding) ->
  (pred_masks (B, N, H, W) f32, refer_logits (B, N, 2), existence_logit (B, 1)).
  """
  for known, fn in _FORWARDS:
    if known == graphdef:
      return fn

  @jax.jit
  def fn(state, image, image_mini, text_ids, text_padding):
    out = nnx.merge(graphdef, state)(image, image_mini, text_ids, text_padding, train=False)
    return out.pred_masks, out.refer_logits, out.existence_logit

  _FORWARDS.append((graphdef, fn))
  return fn


@jax.jit
def _sample_counts_reference(outputs, targets, taus, mask_threshold, existence_threshold,
                             existence_veto):
  return _counts(outputs, targets["gt_mask"].astype(bool), taus, mask_threshold,
                 existence_threshold, existence_veto)


@jax.jit
def _sample_counts_original(outputs, targets, taus, mask_threshold, existence_threshold,
                            existence_veto):
  pred_masks, refer_logits, existence_logit = outputs
  gt = targets["gt_mask_orig"].astype(bool)  # (B, Hc, Wc)
  resized = inference.resize_logits_to_canvas(pred_masks, targets["orig_hw"],
                                              gt.shape[1:])  # (B, N, Hc, Wc)
  return _counts((resized, refer_logits, existence_logit), gt, taus, mask_threshold,
                 existence_threshold, existence_veto)


def _counts(outputs, gt, taus, mask_threshold, existence_threshold, existence_veto):
  pred_masks, refer_logits, existence_logit = outputs
  pixel_scores = inference.score_map(pred_masks, refer_logits,
                                     mask_threshold=mask_threshold)  # (B, H, W)
  scores = inference.refer_scores(refer_logits)  # (B, N)
  existence_prob = jax.nn.sigmoid(existence_logit[:, 0].astype(jnp.float32))  # (B,)
  # existence_veto is a traced bool so both settings share one program.
  vetoed = existence_veto & (existence_prob < existence_threshold)  # (B,)
  pixel_scores = jnp.where(vetoed[:, None, None], -jnp.inf, pixel_scores)  # (B, H, W)
  taus = taus.astype(jnp.float32)  # (T,)
  pred = pixel_scores[:, None] > taus[None, :, None, None]  # (B, T, H, W)
  max_score = jnp.max(scores, axis=1)  # (B,)
  return dict(
      intersection=jnp.sum(pred & gt[:, None], axis=(2, 3), dtype=jnp.int32),  # (B, T)
      pred_area=jnp.sum(pred, axis=(2, 3), dtype=jnp.int32),  # (B, T)
      gt_area=jnp.sum(gt, axis=(1, 2), dtype=jnp.int32),  # (B,)
      no_target=~(max_score[:, None] > taus[None]) | vetoed[:, None],  # (B, T)
      scores=scores,  # (B, N)
      existence_prob=existence_prob)  # (B,)


SAMPLE_COUNTS = {"reference": _sample_counts_reference, "original": _sample_counts_original}


def device_targets(batch: Mapping[str, np.ndarray], resolution: str) -> Dict[str, np.ndarray]:
  """The ground truth the device step needs (the union over instances is taken on the host)."""
  if resolution == "original":
    return {"gt_mask_orig": batch["gt_mask_orig"], "orig_hw": batch["orig_hw"]}
  return {"gt_mask": batch["gt_masks"].max(axis=1)}  # (B, H, W) uint8


def sample_counts(outputs, targets, settings: EvalSettings) -> Dict[str, jax.Array]:
  """Per-sample counts at every tau of `settings.taus` (see `_counts`)."""
  return SAMPLE_COUNTS[settings.resolution](
      outputs, targets, jnp.asarray(settings.taus, jnp.float32),
      jnp.float32(settings.mask_threshold), jnp.float32(settings.existence_threshold),
      jnp.bool_(settings.existence_veto))


# ------------------------------------------------------------------------------------------
# Meshes and placement.
# ------------------------------------------------------------------------------------------
def default_mesh() -> Mesh:
  """Every device of every process on one 'data' axis."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch axis split over every mesh axis."""
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def place_state(state, mesh: Mesh):
  """Parameters on `mesh`: arrays already spread over its devices stay as they are (e.g. FSDP
  sharded by the trainer), anything else is replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  devices = set(mesh.devices.flat)

  def place(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

  return jax.tree.map(place, state)


def local_state_copy(state, device):
  """A full copy of (possibly sharded) parameters on one local device (tail groups)."""
  def copy(x):
    if not x.is_fully_replicated:
      x = jax.jit(lambda y: y, out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))(x)
    return jax.device_put(x.addressable_data(0), device)

  return jax.tree.map(copy, state)


def _to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local)


def local_row_indices(global_batch: int, sharding: NamedSharding) -> np.ndarray:
  """Global batch rows held by this process, ascending (its local batch, in order)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  return np.asarray(sorted(rows), np.int64)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  by_start = {}
  for shard in x.addressable_shards:
    by_start.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(by_start[k]) for k in sorted(by_start)])


def check_groups_are_local(global_batch: int, group_size: int, sharding: NamedSharding) -> None:
  """Every query_SA group of the global batch must lie on one process (see the docstring)."""
  if group_size <= 1:
    return
  rows = local_row_indices(global_batch, sharding)
  counts = np.bincount(rows // group_size, minlength=global_batch // group_size)
  split = np.flatnonzero((counts > 0) & (counts < group_size))
  if split.size:
    raise ValueError(
        f"query_SA group {int(split[0])} (compat_group_size {group_size}) spans several "
        "processes with this mesh's device order: order the mesh devices by process")


# ------------------------------------------------------------------------------------------
# Host side: local evaluation, exact cross-host gathering, results.
# ------------------------------------------------------------------------------------------
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


def _new_accumulators(settings: EvalSettings):
  main = M.METRICS[settings.task]()
  sweep = M.TauSweep(settings.tau_grid, settings.task) if settings.tau_grid else None
  return main, sweep


def _update(accumulator, task: str, counts: Mapping[str, np.ndarray], t: int,
            gt_no_target: np.ndarray, valid: np.ndarray) -> None:
  args = (counts["intersection"][:, t], counts["pred_area"][:, t], counts["gt_area"])
  if task == "gres":
    accumulator.update_counts(*args, counts["no_target"][:, t], gt_no_target, valid=valid)
  else:
    accumulator.update_counts(*args, valid=valid)


def _state(main, sweep) -> Dict[str, np.ndarray]:
  state = {f"main.{k}": v for k, v in main.state().items()}
  if sweep is not None:
    state.update({f"sweep.{k}": v for k, v in sweep.state().items()})
  return state


def _real_prefix(valid: np.ndarray) -> int:
  """Number of real rows; they must come first (the pipeline pads at the end)."""
  num_real = int(valid.sum())
  if not valid[:num_real].all():
    raise ValueError("padding rows (weight 0) are not all at the end of the batch")
  return num_real


def evaluate_local(graphdef, state, config: ml_collections.ConfigDict, split: str,
                   settings: EvalSettings, *, mesh: Mesh, process_index: int,
                   process_count: int) -> LocalEval:
  """Runs this host's share of `split` (`process_index` of `process_count` data shards)."""
  from deris_jax.data import order  # pylint: disable=g-import-not-at-top
  from deris_jax.data import pipeline  # TensorFlow: only when a dataset is read

  sharding = batch_sharding(mesh)
  global_batch = global_eval_batch(settings.batch_size, settings.group_size, process_count,
                                   mesh.size)
  rows = order.host_rows(global_batch, process_index, process_count)
  if jax.process_count() > 1 and not np.array_equal(rows,
                                                    local_row_indices(global_batch, sharding)):
    raise ValueError("the eval mesh does not give each process a contiguous block of the batch "
                     "in process order: order the mesh devices by process")
  pipe = pipeline.make_pipeline(config.data, split, train=False, batch_size=global_batch,
                                local_rows=rows)
  device_batch = pipe.per_host_batch * jax.process_count()
  if device_batch % mesh.size:
    raise ValueError(f"eval batch {device_batch} does not split over {mesh.size} devices")
  check_groups_are_local(device_batch, settings.group_size, sharding)
  forward = forward_fn(graphdef)
  state = place_state(state, mesh)
  tail_device = jax.local_devices()[0]
  tail_state = None
  main, sweep = _new_accumulators(settings)
  records = {name: [] for name in RECORD_FIELDS}

  def dispatch(batch):
    inputs = [_to_global(batch[k], sharding)
              for k in ("image", "image_mini", "text_ids", "text_padding_mask")]
    targets = {k: _to_global(v, sharding) for k, v in
               device_targets(batch, settings.resolution).items()}
    return sample_counts(forward(state, *inputs), targets, settings)

  def collect(batch, device_counts):
    nonlocal tail_state
    counts = {k: np.array(_local_rows(v)) for k, v in device_counts.items()}  # writable copies
    valid = batch["weight"] > 0  # (B,)
    num_real = _real_prefix(valid)
    partial = num_real % settings.group_size
    if partial and num_real < len(valid):  # the last group mixes real and padding rows
      rows = slice(num_real - partial, num_real)
      if tail_state is None:
        tail_state = local_state_copy(state, tail_device)
      part = {k: jax.device_put(v[rows], tail_device) for k, v in batch.items()
              if k in ("image", "image_mini", "text_ids", "text_padding_mask")}
      tail_targets = {k: v[rows] for k, v in device_targets(batch, settings.resolution).items()}
      tail = sample_counts(forward(tail_state, part["image"], part["image_mini"],
                                   part["text_ids"], part["text_padding_mask"]),
                           tail_targets, settings)
      for k, v in tail.items():
        counts[k][rows] = np.asarray(v)
    gt_no_target = batch["exists"] == 0  # (B,)
    _update(main, settings.task, counts, 0, gt_no_target, valid)
    if sweep is not None:
      for j, accumulator in enumerate(sweep.accumulators):
        _update(accumulator, settings.task, counts, 1 + j, gt_no_target, valid)
    for name, value in (("example_id", batch["example_id"]), ("valid", valid),
                        ("gt_no_target", gt_no_target),
                        ("intersection", counts["intersection"][:, 0]),
                        ("pred_area", counts["pred_area"][:, 0]), ("gt_area", counts["gt_area"]),
                        ("pred_no_target", counts["no_target"][:, 0]),
                        ("scores", counts["scores"]),
                        ("existence_prob", counts["existence_prob"])):
      records[name].append(np.asarray(value))

  pending = None
  num_batches = 0
  for batch in pipeline.as_numpy(pipe.dataset):
    launched = (batch, dispatch(batch))  # asynchronous: overlaps the previous batch's host work
    if pending is not None:
      collect(*pending)
    pending = launched
    num_batches += 1
  if pending is not None:
    collect(*pending)
  if num_batches != pipe.num_batches:
    raise RuntimeError(f"split '{split}': read {num_batches} batches, the pipeline announced "
                       f"{pipe.num_batches}")
  stacked = {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in records.items()}
  return LocalEval(state=_state(main, sweep), records=stacked,
                   num_truncated=pipe.num_truncated, num_examples=pipe.num_examples,
                   index=pipe.index)


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
    from jax.experimental import multihost_utils
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


def combine(locals_: Sequence[LocalEval], settings: EvalSettings, *, split: str,
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


def _gather_local(local: LocalEval) -> List[LocalEval]:
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
                 settings: EvalSettings) -> List[Dict[str, Any]]:
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


def evaluate(model: nnx.Module, config: ml_collections.ConfigDict, split: str, *,
             mesh: Optional[Mesh] = None, resolution: str = "reference",
             score_threshold: Optional[float] = None, tau_sweep: bool = False,
             per_sample_path: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates `model` on a prepared split with the official metrics.

  Args:
    model: a DeRIS (or any nnx module with its call signature and output fields).
    config: with `model`, `data` and `eval` (configs/eval_common.py) sections.
    split: a split of the prepared dataset `config.data.name`.
    mesh: devices to run on (default: every device of every process on one 'data' axis).
    resolution: 'reference' (official) or 'original' (module docstring).
    score_threshold: tau; None = config.eval.score_threshold.
    tau_sweep: also report the metrics at every tau of config.eval.tau_grid (same pass).
    per_sample_path: if set, process 0 writes one JSON line per sample there.
  Returns:
    {'split', 'task', 'resolution', 'score_threshold', 'num_samples', 'metrics' (percent),
     'extra_metrics' (percent, not official: GRES mIoU over target samples),
     'tau_sweep' ({tau: metrics}, with tau_sweep), 'num_truncated_expressions', 'protocol'
     (eval batch, group size, devices, processes, ...), 'seconds'}.
  """
  start = time.time()
  settings = settings_from_config(config, resolution=resolution,
                                  score_threshold=score_threshold, tau_sweep=tau_sweep)
  mesh = default_mesh() if mesh is None else mesh
  graphdef, state = nnx.split(model)
  local = evaluate_local(graphdef, state, config, split, settings, mesh=mesh,
                         process_index=jax.process_index(), process_count=jax.process_count())
  index = local.index
  results, records = combine(_gather_local(local), settings, split=split,
                             expected_samples=index.num_rows)
  global_batch = global_eval_batch(settings.batch_size, settings.group_size,
                                   jax.process_count(), mesh.size)
  results["protocol"] = {
      "eval_batch_size": global_batch, "configured_batch_size": settings.batch_size,
      "compat_group_size": settings.group_size,
      "grouping": ("independent samples" if settings.group_size == 1 else
                   "official: consecutive entries of the annotation file"),
      "processes": jax.process_count(), "devices": int(mesh.size),
      "mask_threshold": settings.mask_threshold, "existence_veto": settings.existence_veto,
  }
  if per_sample_path and jax.process_index() == 0:
    with open(per_sample_path, "w") as f:
      for line in sample_lines(records, index.describe, settings):
        f.write(json.dumps(line) + "\n")
  results["seconds"] = round(time.time() - start, 3)
  return results
