"""`train.py --dry_run`: checks that a config fits together, with no data and no parameters.

A long job on a pod first prepares its dataset and initialises hundreds of millions of
parameters; a config whose pieces disagree (input sizes, batch over devices, a shape error
in the model or the loss) would only fail after that. The dry run builds, abstractly, what
`deris_jax.train.loop.train` builds and lets XLA compile it:

  mesh from config.mesh over the devices present
  -> the Trainer (optimizer, abstract state and its shardings; `state_lib.make_trainer`)
  -> abstract batches (ShapeDtypeStructs at the config's shapes, the pipeline's dtypes, the
     loop's batch sharding) at the global train batch and the global eval batch
  -> the jitted train step (`step.jit_train_step`) and, when the loop evaluates during
     training (`best.BestSettings`: eval.train_splits), the evaluation's forward and
     per-sample counts (`inference.forward_fn`, `inference.sample_counts`), lowered and
     (by default) compiled on those abstract arguments
  -> a `DryRunReport`: mesh, batches, parameter and optimizer-state sizes, and per program
     the lowering and compile time and XLA's memory estimate per device
     (`compiled.memory_analysis()`).

Nothing reads the dataset (TensorFlow is not imported) and nothing allocates a parameter:
every array is a `jax.ShapeDtypeStruct`. Any disagreement raises `DryRunError` naming the
stage and the cause, carrying the partial report.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from deris_jax import batch as batch_lib
from deris_jax import config_check
from deris_jax import evaluation
from deris_jax import inference
from deris_jax import sharding as S
from deris_jax.train import best as best_lib
from deris_jax.train import state as state_lib
from deris_jax.train import step as step_lib

# The config sections `loop.train` reads.
TRAIN_SECTIONS = ("model", "data", "loss", "optimizer", "schedule", "train", "mesh", "sharding")
# Steps per epoch needs the prepared dataset, which a dry run does not read. It is a value of
# the train state, not part of any program: the dry run builds the trainer with any value and
# lowers (and compiles) the very train step the run will, which its compile leaves in the caches.
ANY_STEPS_PER_EPOCH = 1

GiB = 2 ** 30
MiB = 2 ** 20


class DryRunError(RuntimeError):
  """The config does not fit together; `stage` says where, `report` holds what was found."""

  def __init__(self, stage: str, cause: BaseException, report: "DryRunReport"):
    self.stage, self.cause, self.report = stage, cause, report
    text = " ".join(str(cause).split()) or type(cause).__name__  # one line
    super().__init__(f"{stage}: {text}")


@dataclasses.dataclass
class Memory:
  """XLA's buffer assignment of one compiled program, bytes per device."""
  arguments: int
  outputs: int
  temporaries: int
  generated_code: int
  aliased: int  # outputs written into donated arguments (counted in both above)

  @property
  def total(self) -> int:
    """arguments + outputs + temporaries + generated code - aliased."""
    return (self.arguments + self.outputs + self.temporaries + self.generated_code
            - self.aliased)

  @classmethod
  def of(cls, compiled) -> Optional["Memory"]:
    stats = compiled.memory_analysis()
    if stats is None:
      return None
    return cls(arguments=int(stats.argument_size_in_bytes),
               outputs=int(stats.output_size_in_bytes),
               temporaries=int(stats.temp_size_in_bytes),
               generated_code=int(stats.generated_code_size_in_bytes),
               aliased=int(stats.alias_size_in_bytes))


@dataclasses.dataclass
class Program:
  """One jitted program of training, lowered (and compiled) on abstract arguments."""
  name: str  # 'train step' | 'eval forward' | 'eval counts'
  batch: int  # global batch
  inputs: Dict[str, tuple]  # batch input name -> global shape
  lower_seconds: float
  compile_seconds: Optional[float] = None  # None: lowered only
  memory: Optional[Memory] = None
  lowered: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Lowered
  compiled: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Compiled


@dataclasses.dataclass
class DryRunReport:
  """What the dry run found (fields stay None until their stage ran)."""
  platform: str = ""
  device_kind: str = ""
  num_devices: int = 0
  num_processes: int = 0
  mesh: Optional[Dict[str, int]] = None  # axis -> size
  global_batch: Optional[int] = None
  per_device_batch: Optional[int] = None
  eval_global_batch: Optional[int] = None
  eval_per_device_batch: Optional[int] = None
  trainable_params: Optional[int] = None
  frozen_params: Optional[int] = None
  param_bytes: Optional[int] = None
  opt_state_elements: Optional[int] = None
  opt_state_bytes: Optional[int] = None
  params_bytes_per_device: Optional[int] = None  # the fullest device, by the sharding rules
  opt_state_bytes_per_device: Optional[int] = None
  device_memory_limit: Optional[int] = None  # bytes; None where the backend does not say
  checks: List[str] = dataclasses.field(default_factory=list)
  notes: List[str] = dataclasses.field(default_factory=list)
  programs: List[Program] = dataclasses.field(default_factory=list)

  @property
  def total_params(self) -> Optional[int]:
    if self.trainable_params is None:
      return None
    return self.trainable_params + self.frozen_params

  def program(self, name: str) -> Program:
    for program in self.programs:
      if program.name == name:
        return program
    raise KeyError(f"no program '{name}' in the report; have {[p.name for p in self.programs]}")


# ------------------------------------------------------------------------------------------
# Pieces (each usable on its own; tests use them).
# ------------------------------------------------------------------------------------------
def check_data_model(config: mlc.ConfigDict) -> List[str]:
  """The config sections training reads, and shared values (`config_check`); -> lines of what
  matched."""
  missing = [s for s in TRAIN_SECTIONS if s not in config]
  if missing:
    raise ValueError(f"config has no {', '.join(missing)} section(s); training needs "
                     f"{', '.join(TRAIN_SECTIONS)} (configs/common.py add_training)")
  config_check.check_config(config)
  data, model = config.data, config.model
  checks = [f"data.{field} = model.{field} = {tuple(model[field])}"
            for field in ("image_size", "cognition_image_size")]
  checks.append(f"data.max_tokens = model.max_tokens = {model.max_tokens}")
  if int(data.batch_size) < 1:
    raise ValueError(f"config data.batch_size must be >= 1, got {data.batch_size}")
  return checks


def batch_devices(mesh: jax.sharding.Mesh) -> int:
  """How many devices share the batch (the data x fsdp axes)."""
  return mesh.size


def check_batch_divides(global_batch: int, mesh: jax.sharding.Mesh, field: str) -> int:
  """-> per-device batch; the error names the config field and the mesh."""
  n = batch_devices(mesh)
  if global_batch % n:
    raise ValueError(
        f"config {field} {global_batch} does not split over the {n} batch devices of the mesh "
        f"(data={mesh.shape[S.DATA]}, fsdp={mesh.shape[S.FSDP]}): use a multiple of {n}")
  return global_batch // n


def _elements(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` under `shardings` (a NamedSharding's shards are equal)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
  return int(total)


def device_memory_limit() -> Optional[int]:
  """Bytes the backend lets one local device use; None where it does not say (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    return None
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def _lower(name: str, fn, args, batch: int, inputs: Dict[str, tuple], compile_: bool,
           progress: Callable[[str], None]) -> Program:
  progress(f"{name}: lowering at global batch {batch} ...")
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  program = Program(name=name, batch=batch, inputs=inputs,
                    lower_seconds=time.perf_counter() - t0, lowered=lowered)
  if compile_:
    progress(f"{name}: compiling ...")
    t0 = time.perf_counter()
    program.compiled = lowered.compile()
    program.compile_seconds = time.perf_counter() - t0
    program.memory = Memory.of(program.compiled)
  return program


# ------------------------------------------------------------------------------------------
# The dry run.
# ------------------------------------------------------------------------------------------
def dry_run(config: mlc.ConfigDict, *, devices: Optional[Sequence[Any]] = None,
            compile: bool = True,  # pylint: disable=redefined-builtin
            progress: Optional[Callable[[str], None]] = None) -> DryRunReport:
  """Builds training abstractly and lowers (and compiles) its programs; see the module doc.

  Args:
    config: a full training config (model, data, loss, optimizer, schedule, train, mesh,
      sharding; eval optional: without it, or without train splits, no eval program).
    devices: the mesh's devices (default: every device of every process).
    compile: also compile each program (XLA memory estimates, compile time); False lowers
      only (tracing catches every shape error; cheap).
    progress: called with a line before each lowering / compilation (they take minutes for
      the released models on a CPU).
  Returns:
    the `DryRunReport`.
  Raises:
    DryRunError: the config does not fit together (its message names the stage and cause).
  """
  progress = progress or (lambda line: None)
  devices = list(jax.devices() if devices is None else devices)
  report = DryRunReport(platform=devices[0].platform, device_kind=devices[0].device_kind,
                        num_devices=len(devices), num_processes=jax.process_count())
  stage = "config check"
  try:
    report.checks.extend(check_data_model(config))

    stage = "eval settings"
    settings = None  # evaluation.EvalSettings of the loop's evaluations; None: none
    best = None
    if "eval" in config:
      best = best_lib.BestSettings.from_config(config)  # what the loop evaluates
    if best is not None and best.splits:
      # As the loop's periodic evaluation runs it: resolution 'reference', its tau, params as
      # the trainer shards them, the batch over every mesh axis (below).
      settings = evaluation.settings_from_config(config, score_threshold=best.score_threshold)
      report.checks.append(
          f"evaluation during training: {', '.join(best.splits)} at tau "
          f"{best.score_threshold:g}" + (f"; best checkpoint by {best.describe()}"
                                         if best.metric else "; no best checkpoint"))

    stage = "mesh"
    mesh = S.make_mesh(config.mesh, devices)
    report.mesh = {str(k): int(v) for k, v in mesh.shape.items()}

    stage = "train batch"
    report.global_batch = int(config.data.batch_size)
    report.per_device_batch = check_batch_divides(report.global_batch, mesh, "data.batch_size")
    report.checks.append(f"data.batch_size {report.global_batch} = {report.per_device_batch} "
                         f"per device x {batch_devices(mesh)} batch device(s)")

    stage = "trainer"
    trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=ANY_STEPS_PER_EPOCH)
    params = trainer.abstract_state.params
    trainable, frozen = trainer.split_params(params)
    report.trainable_params, report.frozen_params = _elements(trainable), _elements(frozen)
    report.param_bytes = _bytes(params)
    report.opt_state_elements = _elements(trainer.abstract_state.opt_state)
    report.opt_state_bytes = _bytes(trainer.abstract_state.opt_state)
    report.params_bytes_per_device = _bytes_per_device(params, trainer.state_shardings.params)
    report.opt_state_bytes_per_device = _bytes_per_device(
        trainer.abstract_state.opt_state, trainer.state_shardings.opt_state)
    report.device_memory_limit = device_memory_limit()

    stage = "train step"
    batch = batch_lib.abstract(config.data, report.global_batch, S.batch_sharding(mesh))
    report.programs.append(_lower(
        stage, step_lib.jit_train_step(trainer), (trainer.sharded_abstract_state(), batch),
        report.global_batch, {k: v.shape for k, v in batch.items()}, compile, progress))

    if settings is not None:
      stage = "eval batch"
      b = evaluation.global_eval_batch(settings.batch_size, settings.group_size,
                                       jax.process_count(), mesh.size)
      report.eval_global_batch = b
      report.eval_per_device_batch = check_batch_divides(b, mesh, "eval.batch_size (rounded)")
      report.checks.append(
          f"eval.batch_size {settings.batch_size} -> global eval batch {b} (query_SA groups "
          f"of {settings.group_size}, {jax.process_count()} process(es), {mesh.size} device(s))")
      sharding = S.batch_sharding(mesh)
      inputs = batch_lib.abstract(config.data, b, sharding, keys=batch_lib.MODEL_INPUTS)

      stage = "eval forward"
      forward = _lower(stage, inference.forward_fn(trainer.graphdef),  # as the loop calls it
                       (trainer.stored_params(trainer.sharded_abstract_state().params),
                        *inference.model_inputs(inputs)),
                       b, {k: v.shape for k, v in inputs.items()}, compile, progress)
      report.programs.append(forward)

      stage = "eval counts"
      outputs = jax.tree.map(  # pred_masks (B, N, H, W), refer_logits (B, N, 2), existence (B, 1)
          lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sharding),
          forward.lowered.out_info)
      h, w = (int(x) for x in config.data.image_size)
      targets = {"gt_mask": jax.ShapeDtypeStruct((b, h, w), jnp.uint8,
                                                 sharding=sharding)}  # (B, H, W) GT union
      counts = jax.jit(lambda o, t: inference.sample_counts(o, t, **settings.device_args()))
      report.programs.append(_lower(stage, counts, (outputs, targets), b,
                                    {"gt_mask": (b, h, w)}, compile, progress))
    else:
      report.notes.append("no eval program: the config evaluates nothing during training "
                          "(no eval section, or no eval.train_splits)")

    stage = "device memory"
    check_memory(report)
  except Exception as e:  # pylint: disable=broad-except  (reported, with its stage)
    raise DryRunError(stage, e, report) from e
  return report


def check_memory(report: DryRunReport) -> None:
  """Every compiled program's XLA estimate fits one device's memory (where it is known)."""
  limit = report.device_memory_limit
  if limit is None:
    return
  for program in report.programs:
    if program.memory is not None and program.memory.total > limit:
      raise ValueError(
          f"{program.name} at global batch {program.batch} needs {program.memory.total / GiB:.2f}"
          f" GiB per device (XLA estimate) but a device has {limit / GiB:.2f} GiB: lower "
          "data.batch_size / eval.batch_size, set model.remat=True or model.dtype=bfloat16, "
          "or shard the state with mesh.fsdp")
  report.checks.append(f"every program fits the device memory ({limit / GiB:.2f} GiB)")


# ------------------------------------------------------------------------------------------
# Printing.
# ------------------------------------------------------------------------------------------
def _size(n: int) -> str:
  """Bytes in the largest unit that keeps the number >= 0.1 (GiB, MiB, KiB)."""
  for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 2 ** 10)):
    if n >= scale / 10:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def _millions(n: int) -> str:
  return f"{n / 1e6:.2f} M"


def format_report(report: DryRunReport) -> List[str]:
  """The report as console lines (the parts that ran)."""
  lines = [f"devices: {report.num_devices} x {report.device_kind} ({report.platform}), "
           f"{report.num_processes} process(es)"]
  if report.mesh is not None:
    lines.append("mesh: " + " x ".join(f"{k}={v}" for k, v in report.mesh.items()))
  if report.global_batch is not None and report.per_device_batch is not None:
    lines.append(f"train batch: global {report.global_batch}, per device "
                 f"{report.per_device_batch}")
  if report.eval_global_batch is not None:
    lines.append(f"eval batch: global {report.eval_global_batch}, per device "
                 f"{report.eval_per_device_batch}")
  if report.trainable_params is not None:
    lines.append(f"parameters: {_millions(report.total_params)} total: trainable "
                 f"{_millions(report.trainable_params)}, frozen {_millions(report.frozen_params)}"
                 f" ({_size(report.param_bytes)})")
    lines.append(f"optimizer state: {_millions(report.opt_state_elements)} elements, "
                 f"{_size(report.opt_state_bytes)}")
    lines.append(f"state per device (sharding rules): params "
                 f"{_size(report.params_bytes_per_device)}, optimizer state "
                 f"{_size(report.opt_state_bytes_per_device)}")
  limit = report.device_memory_limit
  if report.trainable_params is not None:
    lines.append("device memory: " + (_size(limit) if limit else "not reported by the backend"))
  for p in report.programs:
    timing = f"lowered in {p.lower_seconds:.1f} s"
    if p.compile_seconds is not None:
      timing += f", compiled in {p.compile_seconds:.1f} s"
    lines.append(f"{p.name} (global batch {p.batch}): {timing}")
    m = p.memory
    if m is not None:
      lines.append(f"  memory per device: arguments {_size(m.arguments)}, outputs "
                   f"{_size(m.outputs)}, temporaries {_size(m.temporaries)}, generated code "
                   f"{_size(m.generated_code)}, aliased (donated) {_size(m.aliased)}, total "
                   f"{_size(m.total)}")
    elif p.compile_seconds is not None:
      lines.append("  memory per device: not reported by the backend")
  lines.extend(f"check: {c}" for c in report.checks)
  lines.extend(f"note: {n}" for n in report.notes)
  return lines


def print_report(report: DryRunReport, print_fn: Callable[[str], None] = print) -> None:
  for line in format_report(report):
    print_fn(line)
