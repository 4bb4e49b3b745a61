"""Benchmarks (not tests): forward and train-step throughput, deformable attention, input.

  python bench.py --config configs/deris_b_refcoco.py --batch 1,4,16 [--dtype bfloat16]
  python bench.py --mode train --config configs/deris_b_refcoco.py --batch 16 [--mesh 1,1]
  python bench.py --mode deform [--dtype bfloat16]     # MSDeformAttn alone at DeRIS size
  python bench.py --mode data                          # tf.data examples/s (see deris_jax.data)

For each batch size it prints the compile time, the median step time over `--steps` timed
steps (after `--warmup`), images/s, peak device memory (host RSS on CPU), FLOPs per image from
XLA's cost analysis and, with `--peak_tflops`, the model FLOP utilisation. `--profile DIR`
writes a TensorBoard trace of the timed steps. Parameters are randomly initialised; the
numbers do not depend on their values.
"""
import argparse
import json
import resource
import sys
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from deris_jax.config_loader import load_config


def peak_memory_bytes() -> int:
  """Peak device memory of device 0 where the backend reports it, else the host's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_compiled(fn: Callable, args, *, warmup: int, steps: int, profile: str = None):
  """(compile seconds, median seconds per call, XLA flops per call) of jitted `fn(*args)`."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  if profile:
    jax.profiler.start_trace(profile)
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  if profile:
    jax.profiler.stop_trace()
  return compile_s, float(np.median(times)), flops


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


def bench_infer(config, batches: List[int], args) -> List[dict]:
  from flax import nnx
  from deris_jax.models.deris import build_model
  model = build_model(config.model)
  graphdef, state = nnx.split(model)

  def forward(state, batch):
    out = nnx.merge(graphdef, state)(batch["image"], batch["image_mini"], batch["text_ids"],
                                     batch["text_padding_mask"])
    return out.pred_masks, out.refer_logits, out.existence_logit

  rows = []
  for b in batches:
    batch = jax.device_put(random_batch(config.model, b))
    compile_s, step_s, flops = time_compiled(forward, (state, batch), warmup=args.warmup,
                                             steps=args.steps, profile=args.profile)
    rows.append(dict(mode="infer", batch=b, dtype=config.model.dtype, compile_s=compile_s,
                     step_ms=1e3 * step_s, images_per_s=b / step_s,
                     gflops_per_image=flops / b / 1e9, peak_mem_gib=peak_memory_bytes() / 2**30))
  return rows


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


def bench_train(config, batches: List[int], args) -> List[dict]:
  """The jitted, sharded train step of deris_jax.train on random data (the state threaded
  through the timed steps, as in training: it is donated)."""
  from configs import common
  from deris_jax.train import sharding as S
  from deris_jax.train import state as state_lib
  from deris_jax.train import step as step_lib
  if "train" not in config:  # e.g. the tiny fixture config: the released recipe
    common.add_training(config, epochs=1, warmup_epochs=0, decay_epochs=())
  if args.mesh:
    config.mesh.data, config.mesh.fsdp = (int(x) for x in args.mesh.split(","))
  mesh = S.make_mesh(config.mesh)
  trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=1000)
  state = state_lib.init_state(trainer, config.train.seed)
  num_targets = config.data.max_instances if "data" in config else 1
  rows = []
  for b in batches:
    host = dict(random_batch(config.model, b), **random_targets(b, num_targets,
                                                                  config.model.image_size))
    batch = S.global_batch(host, mesh)
    t0 = time.perf_counter()
    compiled = step_lib.jit_train_step(trainer).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan"))) * mesh.size  # per-device program
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    if args.profile:
      jax.profiler.start_trace(args.profile)
    for _ in range(args.steps):
      t = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    if args.profile:
      jax.profiler.stop_trace()
    step_s = float(np.median(times))
    rows.append(dict(mode="train", batch=b, dtype=config.model.dtype,
                     mesh=f"{mesh.shape['data']}x{mesh.shape['fsdp']}", compile_s=compile_s,
                     step_ms=1e3 * step_s, images_per_s=b / step_s,
                     gflops_per_image=flops / b / 1e9, peak_mem_gib=peak_memory_bytes() / 2**30,
                     loss=float(jax.device_get(metrics["loss"]))))
  return rows


def bench_deform(args) -> List[dict]:
  """MSDeformAttn core alone at DeRIS size: 3024 queries, 8 heads x 32, levels 12/24/48."""
  from deris_jax.models.deform_attn import ms_deform_attn_core
  dtype = jnp.dtype(args.dtype or "float32")
  shapes = ((12, 12), (24, 24), (48, 48))
  heads, dim, points = 8, 32, 4
  tokens = sum(h * w for h, w in shapes)
  rows = []
  for b in [int(x) for x in args.batch.split(",")]:
    key = jax.random.split(jax.random.key(0), 3)
    value = jax.random.normal(key[0], (b, tokens, heads, dim), dtype)
    loc = jax.random.uniform(key[1], (b, tokens, heads, len(shapes), points, 2))
    weights = jax.nn.softmax(jax.random.normal(key[2], (b, tokens, heads, len(shapes) * points)),
                             -1).reshape(b, tokens, heads, len(shapes), points)
    fwd = lambda v, l, a: ms_deform_attn_core(v, shapes, l, a)
    loss = lambda v, l, a: jnp.sum(fwd(v, l, a).astype(jnp.float32) ** 2)
    fwd_bwd = jax.grad(loss, argnums=(0, 1, 2))
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd)):
      compile_s, step_s, _ = time_compiled(fn, (value, loc, weights), warmup=args.warmup,
                                           steps=args.steps)
      rows.append(dict(mode=f"deform {name}", batch=b, dtype=str(dtype), compile_s=compile_s,
                       step_ms=1e3 * step_s, peak_mem_gib=peak_memory_bytes() / 2**30))
  return rows


def print_rows(rows: List[dict]) -> None:
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  for row in rows:
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", default="infer", choices=["infer", "train", "deform", "data"])
  parser.add_argument("--config", default="configs/deris_tiny.py")
  parser.add_argument("--batch", default="2", help="comma-separated batch sizes")
  parser.add_argument("--dtype", default=None, help="compute dtype (float32 | bfloat16)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="device peak for the MFU column (e.g. 989 for H100 bf16 dense)")
  parser.add_argument("--profile", default=None, help="write a TensorBoard trace here")
  parser.add_argument("--mesh", default=None, help="train: DATA,FSDP mesh sizes (default: "
                      "config.mesh, all devices on the data axis)")
  parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args, rest = parser.parse_known_args(argv)
  if args.mode == "data":
    from deris_jax.data import benchmark
    benchmark.main(rest)
    return 0
  if rest:
    parser.error(f"unknown arguments {rest}")
  if args.mode == "deform":
    rows = bench_deform(args)
  else:
    config = load_config(args.config, args.override)
    if args.dtype:
      config.model.dtype = args.dtype
    bench = bench_train if args.mode == "train" else bench_infer
    rows = bench(config, [int(x) for x in args.batch.split(",")], args)
    if args.peak_tflops:
      for row in rows:
        row["mfu"] = row["gflops_per_image"] * row["images_per_s"] / (args.peak_tflops * 1e3)
  print_rows(rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
