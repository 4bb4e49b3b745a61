"""Benchmarks (not tests): forward and train-step throughput, deformable attention, input.

  python bench.py --config configs/deris_b_refcoco.py --batch 1,4,16 [--dtype bfloat16]
  python bench.py --mode train --config configs/deris_b_refcoco.py --batch 16 [--mesh 1,1] \
      [--config.model.remat=True]
  python bench.py --mode deform [--dtype bfloat16]     # MSDeformAttn alone at DeRIS size
  python bench.py --mode data                          # tf.data examples/s (benchmarks/)

For each batch size it prints the compile time, the median step time over `--steps` timed
steps (after `--warmup`), images/s, peak device memory (host RSS on CPU), the memory XLA's
buffer assignment needs for the program (`xla_mem_gib`), the number of HLO instructions of the
optimised program, the model's FLOPs per image (XLA's count of the program before optimisation,
with the stacks looped and no remat: `counting_config`) and, with `--peak_tflops`, the model
FLOP utilisation. `--profile DIR` writes a TensorBoard trace of the timed steps.
`--max_batch` also prints the largest batch whose program fits the device memory (or
`--memory_gib`), from XLA's memory analysis: a line through the measured batches, confirmed
by compiling the predicted batch. Parameters are random (`random_params`: drawn on the host in
seconds, where the official initialisers take ~20 s for DeRIS-B and ~50 s for DeRIS-L on a host
core); the numbers do not depend on their values. Progress lines with elapsed seconds go to
stderr, so a run cut short by a time limit says where its time went.
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import argparse
import json
import math
import resource
import sys
import time
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import kernels
from configs import common
from deris_jax import cli, compile_cache, inference
from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.models.deform_attn import ms_deform_attn_core
from deris_jax.models.deris import abstract_model
from deris_jax.train import params as params_lib
from deris_jax.train import state as state_lib
from deris_jax.train import step as step_lib


_START = time.perf_counter()


def progress(message: str) -> None:
  """One progress line on stderr with the seconds since the start."""
  print(f"[bench {time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


def peak_memory_bytes() -> int:
  """Peak device memory of device 0 where the backend reports it, else the host's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compiled_stats(compiled) -> Dict[str, float]:
  """XLA's view of a compiled program: the bytes its buffers need on one device (arguments +
  outputs + temporaries - donated aliases), its HLO instructions and its distinct fused
  computations (`benchmarks.kernels`: what XLA:CPU's code generation follows). (Not its FLOPs:
  after optimisation XLA counts a loop's body once, and on a GPU not the library calls; see
  `lowered_flops`.)"""
  memory = compiled.memory_analysis()
  if memory is None:
    mem_bytes = float("nan")
  else:
    mem_bytes = float(memory.argument_size_in_bytes + memory.output_size_in_bytes
                      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  text = compiled.as_text() or ""
  hlo_ops = sum(1 for line in text.splitlines()
                if " = " in line and not line.startswith("HloModule"))  # instructions
  return dict(mem_bytes=mem_bytes, hlo_ops=hlo_ops,
              distinct_fusions=kernels.fusion_stats(text)["distinct_fusions"])


def lowered_flops(lowered) -> float:
  """XLA's FLOP count of a lowered (not yet optimised) program: the whole program as written,
  before partitioning, so for the global batch (NaN where the backend gives none)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def counting_config(config):
  """A copy of `config` whose program counts every FLOP once: stacks looped (XLA's cost
  analysis counts a scanned stack's body once, not once per layer: DeRIS-B's forward counts
  46 GFLOP per image scanned, 143 looped) and no remat (recomputation is not model work)."""
  config = config.copy_and_resolve_references()
  for switch in ("scan_layers", "remat"):
    if switch in config.model:  # absent means off
      config.model[switch] = False
  return config


def forward_shapes(model_config, batch: int):
  """The forward's inputs at `batch` as shapes (`inference.model_inputs` order)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype),
                      inference.model_inputs(random_batch(model_config, 1)))


def lowered_forward_gflops(model_config, batch: int) -> float:
  """GFLOP per image of the inference forward of `model_config` at `batch`, as XLA counts the
  lowered program (pass `counting_config(config).model` for the model's FLOPs)."""
  model = abstract_model(model_config)
  graphdef, _ = nnx.split(model)
  lowered = inference.forward_fn(graphdef).lower(params_lib.model_params(model),
                                                 *forward_shapes(model_config, batch))
  return lowered_flops(lowered) / batch / 1e9


def device_memory_limit() -> float:
  """Bytes the backend lets device 0 use (NaN where it does not say, e.g. on CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("bytes_limit", float("nan")))


def largest_batch(compile_at: Callable[[int], Dict[str, float]], measured: Dict[int, float],
                  limit_bytes: float, multiple: int = 1) -> Dict[str, float]:
  """The largest batch (a multiple of `multiple`) whose program needs at most `limit_bytes`.

  Args:
    compile_at: batch -> `compiled_stats` of the program at that batch (compiles it).
    measured: {batch: program bytes} already known (at least one batch).
    limit_bytes: the memory to fit in.
    multiple: batches must be multiples of it (devices, the reference_compat group size).
  Memory is affine in the batch (buffers scale with it, parameters do not): a line through
  the two largest known batches (one more is compiled when only one is known) predicts the
  limit; the prediction is then compiled and stepped down by 10% until it fits.
  """
  known = dict(measured)
  if len(known) < 2:
    extra = 2 * max(known)  # a multiple of whatever the measured batch was a multiple of
    known[extra] = compile_at(extra)["mem_bytes"]
  (b0, m0), (b1, m1) = sorted(known.items())[-2:]
  per_sample = max((m1 - m0) / (b1 - b0), 1.0)
  fixed = m1 - per_sample * b1
  round_down = lambda b: max(int(b) // multiple, 1) * multiple  # noqa: E731
  batch = round_down((limit_bytes - fixed) // per_sample)
  while True:
    need = compile_at(batch)["mem_bytes"]
    if need <= limit_bytes or batch == multiple:
      break
    batch = round_down(min(batch * 0.9, batch - multiple))
  return dict(max_batch=batch, bytes_at_max=need, bytes_per_sample=per_sample,
              fixed_bytes=fixed, limit_bytes=limit_bytes)


def time_calls(call: Callable[[], object], *, warmup: int, steps: int,
               profile: str = None) -> float:
  """Median seconds of `call()` over `steps` timed calls after `warmup` untimed ones; `call`
  blocks until its results are ready. `profile`: a TensorBoard trace of the timed calls."""
  for _ in range(warmup):
    call()
  times = []
  if profile:
    jax.profiler.start_trace(profile)
  for _ in range(steps):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  if profile:
    jax.profiler.stop_trace()
  return float(np.median(times))


def time_compiled(fn: Callable, args, *, warmup: int, steps: int, profile: str = None):
  """(compile seconds, median seconds per call, `compiled_stats`) of `fn(*args)`, `fn` jitted
  (a plain function is jitted here)."""
  t0 = time.perf_counter()
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  progress(f"compiled in {compile_s:.1f} s")
  step_s = time_calls(lambda: jax.block_until_ready(compiled(*args)), warmup=warmup,
                      steps=steps, profile=profile)
  return compile_s, step_s, compiled_stats(compiled)


def random_params(abstract_params, shardings=None, seed: int = 0):
  """Random parameters shaped like `abstract_params` (a pure dict of ShapeDtypeStructs), placed
  into `shardings` (default: the default device): N(0, 0.02), and 1 + N(0, 0.02) for
  normalisation scales, so activations keep a realistic scale. Drawn by numpy on the host
  (DeRIS-B's 291M values in a few seconds) and copied once: no program to compile. Drawing them
  on the device took one small program per leaf shape, 21 s for DeRIS-B on a 2-core CPU and
  more than the whole entry's time limit on an H200, where every small compile costs more."""
  rng = np.random.default_rng(seed)
  names = list(trees.named_leaves(abstract_params))
  leaves, treedef = jax.tree.flatten(abstract_params)
  values = [(float(name.endswith("scale")) + 0.02 * rng.standard_normal(
      tuple(leaf.shape), np.float32)).astype(jnp.dtype(leaf.dtype))
            for name, leaf in zip(names, leaves)]
  tree = jax.tree.unflatten(treedef, values)
  return jax.device_put(tree, shardings)


def random_batch(model_config, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  h, w = model_config.image_size
  hc, wc = model_config.cognition_image_size
  length = model_config.max_tokens
  ids = rng.integers(3, model_config.beit3.vocab_size, (batch, length)).astype(np.int32)
  lengths = rng.integers(3, length + 1, batch)
  padding = (np.arange(length)[None] >= lengths[:, None]).astype(np.int32)
  ids = np.where(padding == 1, 1, ids)
  ids[:, 0] = 0
  return dict(image=rng.standard_normal((batch, h, w, 3), np.float32),
              image_mini=rng.standard_normal((batch, hc, wc, 3), np.float32),
              text_ids=ids, text_padding_mask=padding)


def _row(mode: str, batch: int, dtype, compile_s: float, step_s: float, stats,
         gflops_per_image: float) -> dict:
  return dict(mode=mode, batch=batch, dtype=str(dtype), compile_s=compile_s,
              step_ms=1e3 * step_s, images_per_s=batch / step_s,
              gflops_per_image=gflops_per_image,
              peak_mem_gib=peak_memory_bytes() / 2**30, xla_mem_gib=stats["mem_bytes"] / 2**30,
              hlo_ops=stats["hlo_ops"], distinct_fusions=stats["distinct_fusions"])


def _compat_multiple(model_config) -> int:
  """The batch multiple the model needs: reference_compat attends in groups over the batch."""
  return int(model_config.compat_group_size) if model_config.reference_compat else 1


def check_batches(batches: List[int], multiple: int, why: str, group: int = 1) -> None:
  """Raises cli.UsageError, before anything is built, for a batch below 1 or not a multiple of
  `multiple` (`why` says where the multiple comes from) and of `group` (reference_compat's
  attention group; a batch of at most `group` samples is one group, as the model takes it:
  `loopback.batch_axis_self_attention`)."""
  for b in batches:
    if b < 1:
      raise cli.UsageError(f"--batch {b}: a batch size must be >= 1")
    need = math.lcm(multiple, group if b > group else 1)
    if b % need:
      raise cli.UsageError(f"--batch {b}: {why}: use a multiple of {need}")


def _compat_reason(model_config) -> str:
  return (f"model.reference_compat attends over groups of model.compat_group_size="
          f"{model_config.compat_group_size} samples")


def bench_infer(config, batches: List[int], args) -> Tuple[List[dict], Callable, int]:
  """Rows of the jitted forward (`inference.forward_fn`, as eval, predict and the demo run
  it), batch -> `compiled_stats` (for --max_batch), and the multiple every batch must be."""
  check_batches(batches, 1, _compat_reason(config.model), group=_compat_multiple(config.model))
  model = abstract_model(config.model)
  graphdef, _ = nnx.split(model)
  params = random_params(params_lib.model_params(model))
  forward_outputs = inference.forward_fn(graphdef)
  progress("model and random parameters ready")

  def inputs(b):  # (params, image, image_mini, text_ids, text_padding_mask), forward_fn's order
    return (params,) + jax.device_put(inference.model_inputs(random_batch(config.model, b)))

  def compile_at(b):
    return compiled_stats(forward_outputs.lower(params, *forward_shapes(config.model, b))
                          .compile())

  gflops = lowered_forward_gflops(counting_config(config).model, batches[0])
  progress(f"{gflops:.1f} GFLOP per image (the program looped, before optimisation)")
  rows = []
  for b in batches:
    compile_s, step_s, stats = time_compiled(forward_outputs, inputs(b), warmup=args.warmup,
                                             steps=args.steps, profile=args.profile)
    rows.append(_row("infer", b, config.model.dtype, compile_s, step_s, stats, gflops))
    progress(f"batch {b}: {1e3 * step_s:.2f} ms per call")
  return rows, compile_at, _compat_multiple(config.model)


def random_targets(batch: int, num_targets: int, size, seed: int = 1) -> Dict[str, np.ndarray]:
  """Training targets: 0..num_targets rectangles per sample, the last sample without one."""
  rng = np.random.default_rng(seed)
  h, w = size
  counts = rng.integers(1, num_targets + 1, batch)
  counts[-1] = 0
  masks = np.zeros((batch, num_targets, h, w), np.uint8)
  for i in range(batch):
    for j in range(counts[i]):
      y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
      masks[i, j, y:y + h // 4, x:x + w // 4] = 1
  return dict(gt_masks=masks, gt_valid=np.arange(num_targets)[None] < counts[:, None],
              exists=(counts > 0).astype(np.int32), weight=np.ones((batch,), np.float32))


def bench_train(config, batches: List[int], args) -> Tuple[List[dict], Callable, int]:
  """Rows of the jitted, sharded train step of deris_jax.train on random data (the state is
  threaded through the timed steps, as in training: it is donated), batch ->
  `compiled_stats` (for --max_batch), and the multiple every batch must be."""
  if "train" not in config:  # e.g. the tiny fixture config: the released recipe
    common.add_training(config, epochs=1, warmup_epochs=0, decay_epochs=())
  if args.mesh:
    config.mesh.data, config.mesh.fsdp = (int(x) for x in args.mesh.split(","))
  try:
    mesh = S.make_mesh(config.mesh)
  except ValueError as e:
    raise cli.UsageError(f"--mesh / {e}") from e
  multiple = math.lcm(_compat_multiple(config.model), mesh.size)
  why = (f"the batch splits over the {mesh.size} devices of the mesh (data={mesh.shape[S.DATA]}"
         f", fsdp={mesh.shape[S.FSDP]}; --mesh or config.mesh)")
  if _compat_multiple(config.model) > 1:
    why += f" and {_compat_reason(config.model)}"
  check_batches(batches, mesh.size, why, group=_compat_multiple(config.model))
  trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=1000)
  stored = trainer.stored_abstract_state().params  # init_state takes one subtree per layer
  state = state_lib.init_state(trainer, config.train.seed, params=random_params(
      stored, trainer.stored_state_shardings().params))
  num_targets = config.data.max_instances if "data" in config else 1
  train_step = step_lib.jit_train_step(trainer)
  progress("train state with random parameters ready")

  def host_batch(b):
    return dict(random_batch(config.model, b),
                **random_targets(b, num_targets, config.model.image_size))

  def shapes_at(b):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=S.batch_sharding(mesh))
            for k, v in host_batch(b).items()}

  def compile_at(b):
    return compiled_stats(train_step.lower(trainer.abstract_state, shapes_at(b)).compile())

  counting = state_lib.make_trainer(counting_config(config), mesh, steps_per_epoch=1000)
  gflops = lowered_flops(step_lib.jit_train_step(counting).lower(
      counting.abstract_state, shapes_at(batches[0]))) / batches[0] / 1e9
  progress(f"{gflops:.1f} GFLOP per image (the step looped, without remat, before "
           "optimisation)")
  rows = []
  for b in batches:
    batch = S.global_batch(host_batch(b), mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    progress(f"batch {b}: compiled in {compile_s:.1f} s")
    stats = compiled_stats(compiled)
    carry = {"state": state}

    def one_step():  # threads the donated state through the calls, as training does
      carry["state"], carry["metrics"] = compiled(carry["state"], batch)
      jax.block_until_ready(carry["metrics"])

    step_s = time_calls(one_step, warmup=args.warmup, steps=args.steps, profile=args.profile)
    progress(f"batch {b}: {1e3 * step_s:.2f} ms per step")
    state, metrics = carry["state"], carry["metrics"]
    row = _row("train", b, config.model.dtype, compile_s, step_s, stats, gflops)
    row.update(mesh=f"{mesh.shape['data']}x{mesh.shape['fsdp']}",
               loss=float(jax.device_get(metrics["loss"])))
    rows.append(row)
  return rows, compile_at, multiple


def bench_deform(batches: List[int], args) -> List[dict]:
  """MSDeformAttn core alone at DeRIS size: 3024 queries, 8 heads x 32, levels 12/24/48."""
  dtype = jnp.dtype(args.dtype or "float32")
  shapes = ((12, 12), (24, 24), (48, 48))
  heads, dim, points = 8, 32, 4
  tokens = sum(h * w for h, w in shapes)
  rows = []
  for b in batches:
    key = jax.random.split(jax.random.key(0), 3)
    value = jax.random.normal(key[0], (b, tokens, heads, dim), dtype)
    loc = jax.random.uniform(key[1], (b, tokens, heads, len(shapes), points, 2))
    weights = jax.nn.softmax(jax.random.normal(key[2], (b, tokens, heads, len(shapes) * points)),
                             -1).reshape(b, tokens, heads, len(shapes), points)
    fwd = lambda v, l, a: ms_deform_attn_core(v, shapes, l, a)
    loss = lambda v, l, a: jnp.sum(fwd(v, l, a).astype(jnp.float32) ** 2)
    fwd_bwd = jax.grad(loss, argnums=(0, 1, 2))
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
      compile_s, step_s, stats = time_compiled(fn, (value, loc, weights), warmup=args.warmup,
                                               steps=args.steps)
      rows.append(dict(mode=f"deform {name}", batch=b, dtype=str(dtype), compile_s=compile_s,
                       step_ms=1e3 * step_s, peak_mem_gib=peak_memory_bytes() / 2**30,
                       hlo_ops=stats["hlo_ops"], distinct_fusions=stats["distinct_fusions"]))
  return rows


def print_device() -> None:
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"malloc {malloc.describe()}", flush=True)


def print_rows(rows: List[dict]) -> None:
  for row in rows:
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()), flush=True)


def write_rows(rows: List[dict], path: str) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(rows, f, indent=1)


BENCHES = {"infer": bench_infer, "train": bench_train}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", default="infer", choices=["infer", "train", "deform", "data"])
  parser.add_argument("--config", default="configs/deris_tiny.py", metavar="PATH[:ARG]",
                      help="config file; fields are overridden with --config.a.b=VALUE")
  parser.add_argument("--verbosity", type=int, default=0,
                      help="0: our lines only (default); 1: libraries' logs too; 2: debug")
  parser.add_argument("--batch", default="2", help="comma-separated batch sizes")
  parser.add_argument("--dtype", default=None, help="compute dtype (float32 | bfloat16)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="device peak for the MFU column (e.g. 989 for H100 bf16 dense)")
  parser.add_argument("--profile", default=None, help="write a TensorBoard trace here")
  parser.add_argument("--mesh", default=None, help="train: DATA,FSDP mesh sizes (default: "
                      "config.mesh, all devices on the data axis)")
  parser.add_argument("--max_batch", action="store_true",
                      help="infer/train: also find the largest batch that fits the memory")
  parser.add_argument("--memory_gib", type=float, default=None,
                      help="--max_batch: memory to fit (default: the device's bytes_limit)")
  parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
  try:
    argv, overrides = cli.split_overrides(sys.argv[1:] if argv is None else list(argv))
  except cli.UsageError as e:
    parser.error(str(e))
  args, rest = parser.parse_known_args(argv)
  cli.set_verbosity(args.verbosity)
  compile_cache.enable()
  if args.mode == "data":
    from benchmarks import data_pipeline  # TF boundary: imports TensorFlow, this mode only
    data_pipeline.main(rest)
    return 0
  if rest:
    parser.error(f"unknown arguments {rest}")
  try:
    batches = [int(x) for x in args.batch.split(",")]
  except ValueError:
    parser.error(f"--batch {args.batch!r}: comma-separated integers, e.g. 2 or 1,8")
  if args.mode == "deform":
    try:
      check_batches(batches, 1, "")
    except cli.UsageError as e:
      parser.error(str(e))
    rows = bench_deform(batches, args)
  else:
    try:
      config = cli.load(args.config, overrides)
    except (FileNotFoundError, ValueError) as e:  # a missing file, a bad override
      parser.error(str(e))
    if args.dtype:
      config.model.dtype = args.dtype
    try:
      rows, compile_at, multiple = BENCHES[args.mode](config, batches, args)
    except cli.UsageError as e:  # a --batch or --mesh the run cannot take
      parser.error(str(e))
    if args.peak_tflops:
      for row in rows:
        row["mfu"] = row["gflops_per_image"] * row["images_per_s"] / (args.peak_tflops * 1e3)
    if args.max_batch:
      limit = args.memory_gib * 2**30 if args.memory_gib else device_memory_limit()
      if np.isnan(limit):
        parser.error("--max_batch: the device reports no memory limit; pass --memory_gib")
  print_device()
  print_rows(rows)
  write_rows(rows, args.json)  # before the search: one cut short by a time limit keeps them
  if args.mode != "deform" and args.max_batch:
    found = largest_batch(compile_at, {r["batch"]: r["xla_mem_gib"] * 2**30 for r in rows},
                          limit, multiple)
    rows.append(dict(mode=f"{args.mode} max batch", **found))
    print_rows(rows[-1:])
    write_rows(rows, args.json)
  return 0


if __name__ == "__main__":
  cli.tune_gc()
  sys.exit(main())
