"""The evaluation loop shared by eval.py and train.py: forward on every device, metrics on hosts.

Here: the settings (`EvalSettings`, read from `config.eval` and checked against data and
model) and the loop (`evaluate` of a model, `evaluate_params` of a model structure and its
parameters). The device program is `inference.forward_fn` + `inference.sample_counts`, the
host side `deris_jax.records`, the placement of batches and parameters `deris_jax.sharding`.

Per batch, one jitted forward (batch sharded over every mesh axis, parameters replicated or as
they come) and one jitted post-processing step run on the devices; only per-sample counts come
back to the host: for every score threshold tau in (tau, *tau_grid) the intersection and
predicted area of the union mask (`inference.score_map(...) > tau`, which equals
`inference.predict(..., score_threshold=tau)['mask']`), the no-target decision, the GT area,
and the (N,) query scores. The metric accumulators (`deris_jax.metrics`) are updated on the
host, merged across hosts bit-exactly, and every sample of the split is counted exactly once:
the pipeline pads each host's stream with weight-0 examples (example_id -1), which are
dropped; the count is checked against the split's size.

Resolutions (docs/design.md §5, §10):
  'reference'  the official protocol: the model's input size, against the union of the
               nearest-resized GT masks (`gt_masks`);
  'original'   each image's own size: the per-query logits are resized bilinearly
               (`inference.resize_logits_to_canvas`, on the data.canvas_size canvas), then
               thresholded, against `gt_mask_orig`.

query_SA groups (docs/design.md §4, configs/eval_common.py). With `model.reference_compat` and
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
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deris_jax import config_check
from deris_jax import inference
from deris_jax import metrics as M
from deris_jax import records as records_lib
from deris_jax import sharding as S
from deris_jax.data import order

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

  def device_args(self) -> Dict[str, Any]:
    """The keyword arguments of `inference.sample_counts`."""
    return dict(resolution=self.resolution, taus=self.taus, mask_threshold=self.mask_threshold,
                existence_threshold=self.existence_threshold,
                existence_veto=self.existence_veto)


def settings_from_config(config: ml_collections.ConfigDict, *, resolution: str = "reference",
                         score_threshold: Optional[float] = None,
                         tau_sweep: bool = False) -> EvalSettings:
  """Reads `config.eval` (configs/eval_common.py) and checks it; data and model must agree
  (`config_check`, run here too for configs that did not come through `load_config`)."""
  if "eval" not in config:
    raise ValueError("config has no 'eval' section: add `config.eval = eval_common.eval_config("
                     "VARIANT, config.data)` (configs/eval_common.py)")
  if "data" not in config:
    raise ValueError("config has no 'data' section (configs/data_common.py)")
  ev, model = config.eval, config.model
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
  config_check.check_config(config)  # data and model read the same input sizes
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


def _tail_counts(graphdef, params, batch, counts, num_real: int, settings: EvalSettings):
  """Recomputes the last, incomplete query_SA group (real rows then padding) on its own, on
  one local device, so that padding never enters a group; writes into `counts`."""
  rows = slice(num_real - num_real % settings.group_size, num_real)
  device = jax.local_devices()[0]
  inputs = [jax.device_put(x[rows], device) for x in inference.model_inputs(batch)]
  targets = {k: v[rows] for k, v in inference.device_targets(batch, settings.resolution).items()}
  outputs = inference.forward_fn(graphdef)(S.local_copy(params, device), *inputs)
  tail = inference.sample_counts(outputs, targets, **settings.device_args())
  for k, v in tail.items():
    counts[k][rows] = np.asarray(v)


def evaluate_local(graphdef, params, config: ml_collections.ConfigDict, split: str,
                   settings: EvalSettings, *, mesh: Mesh, process_index: int,
                   process_count: int) -> records_lib.LocalEval:
  """Runs this host's share of `split` (`process_index` of `process_count` data shards)."""
  from deris_jax.data import pipeline  # TF boundary: the pipeline imports TensorFlow

  global_batch = global_eval_batch(settings.batch_size, settings.group_size, process_count,
                                   mesh.size)
  rows = order.host_rows(global_batch, process_index, process_count)
  if jax.process_count() > 1 and not np.array_equal(rows, S.process_rows(global_batch, mesh)):
    raise ValueError("the eval mesh does not give each process a contiguous block of the batch "
                     "in process order: order the mesh devices by process")
  pipe = pipeline.make_pipeline(config.data, split, train=False, batch_size=global_batch,
                                local_rows=rows)
  if pipe.per_host_batch * jax.process_count() % mesh.size:
    raise ValueError(f"eval batch {pipe.per_host_batch * jax.process_count()} does not split "
                     f"over {mesh.size} devices")
  S.check_groups_are_local(global_batch, settings.group_size, mesh)
  forward = inference.forward_fn(graphdef)
  params = S.place_state(params, mesh)
  accumulator = records_lib.Accumulator(settings)

  def dispatch(batch):  # asynchronous: the device works while the host collects
    inputs = [S.global_array(x, mesh) for x in inference.model_inputs(batch)]
    targets = {k: S.global_array(v, mesh)
               for k, v in inference.device_targets(batch, settings.resolution).items()}
    return batch, inference.sample_counts(forward(params, *inputs), targets,
                                          **settings.device_args())

  def collect(batch, device_counts):
    counts = {k: np.array(S.local_rows(v)) for k, v in device_counts.items()}  # writable
    num_real = int((batch["weight"] > 0).sum())
    if not (batch["weight"][:num_real] > 0).all():
      raise ValueError("padding rows (weight 0) are not all at the end of the batch")
    if num_real % settings.group_size and num_real < len(batch["weight"]):
      _tail_counts(graphdef, params, batch, counts, num_real, settings)
    accumulator.add(counts, batch)

  pending, num_batches = None, 0
  for batch in pipeline.as_numpy(pipe.dataset):
    launched = dispatch(batch)
    if pending is not None:
      collect(*pending)
    pending, num_batches = launched, num_batches + 1
  if pending is not None:
    collect(*pending)
  if num_batches != pipe.num_batches:
    raise RuntimeError(f"split '{split}': read {num_batches} batches, the pipeline announced "
                       f"{pipe.num_batches}")
  return accumulator.result(num_truncated=pipe.num_truncated, num_examples=pipe.num_examples,
                            index=pipe.index)


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
  graphdef, state = nnx.split(model)
  return evaluate_params(graphdef, state, config, split, mesh=mesh, resolution=resolution,
                         score_threshold=score_threshold, tau_sweep=tau_sweep,
                         per_sample_path=per_sample_path)


def evaluate_params(graphdef: nnx.GraphDef, params, config: ml_collections.ConfigDict,
                    split: str, *, mesh: Optional[Mesh] = None, resolution: str = "reference",
                    score_threshold: Optional[float] = None, tau_sweep: bool = False,
                    per_sample_path: Optional[str] = None) -> Dict[str, Any]:
  """`evaluate` of the model `graphdef` with `params` (as `forward.apply` takes them: the
  training loop passes its state's parameters, sharded as they are)."""
  start = time.time()
  settings = settings_from_config(config, resolution=resolution,
                                  score_threshold=score_threshold, tau_sweep=tau_sweep)
  mesh = S.data_mesh() if mesh is None else mesh
  local = evaluate_local(graphdef, params, config, split, settings, mesh=mesh,
                         process_index=jax.process_index(), process_count=jax.process_count())
  index = local.index
  results, records = records_lib.combine(records_lib.gather_local(local), settings, split=split,
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
      for line in records_lib.sample_lines(records, index.describe, settings):
        f.write(json.dumps(line) + "\n")
  results["seconds"] = round(time.time() - start, 3)
  return results
