"""Compile time of the training programs, repeated stacks looped vs scanned (BENCHMARKS.md).

  python -m benchmarks.compile_time [--program grad|step] [--variants b,l]
      [--layouts loop,scan] [--repeats 1] [--batch 2] [--no_compile]

For each released variant (configs/deris.py:variant=V,data=refcoco) and layout, a fresh
subprocess lowers and compiles, on abstract parameters and batch (`jax.ShapeDtypeStruct`s:
nothing is allocated), one program and prints one line: tracing and lowering seconds, compile
seconds, optimised HLO instructions, and the distinct fused computations among its fusions
(`benchmarks/kernels.py`: what XLA:CPU's code generation follows, steadier than the wall
time on a busy machine) (`--no_compile`: tracing and lowering only, what a start
pays before XLA, e.g. `train.py --dry_run` on the released configs). Programs:
  grad  `jax.grad` of the training loss (`step.make_loss_fn`: forward with train=True, the
        official loss; gradients of the trainable parameters, the frozen Swin gets none, as
        in training), compiled with the train step's XLA:CPU options (`cpu_options`);
  step  the jitted train step of train.py (the gradient, clipping, Adam, the new state), one
        device, as `train.py --dry_run` compiles it.
Layouts:
  loop        every stack a Python loop (model.scan_layers=False);
  beit3       only the BEiT-3 layers scanned (what scan_layers scanned before);
  beit3+swin  the BEiT-3 layers and the Swin block pairs scanned;
  scan        model.scan_layers=True (BEiT-3 layers, Swin block pairs, pixel-decoder layers).
The persistent compilation cache is off; each measurement runs in its own process, and with
--repeats the layouts take turns (the machine's load drifts).
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import kernels

LAYOUTS = ("loop", "beit3", "beit3+swin", "scan")


def lower_and_compile(jitted, args, compile: bool = True) -> dict:
  """Seconds to trace, to lower (the two together: lower_s) and to compile `jitted` at
  `args`, and the optimised HLO's size (not compiled: the lowered module's operations)."""
  import jax
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  row = dict(trace_s=round(t1 - t0, 2), lower_s=round(t2 - t0, 1), jax=jax.__version__,
             platform=jax.devices()[0].platform)
  if not compile:
    return dict(row, compile_s=None, hlo_instructions=None, fusions=None, distinct_fusions=None,
                mlir_operations=lowered.as_text().count(" = "))
  compiled = lowered.compile()
  t3 = time.perf_counter()
  text = compiled.as_text()
  return dict(row, compile_s=round(t3 - t2, 1), hlo_instructions=text.count(" = "),
              **kernels.fusion_stats(text))


def measure(program: str, variant: str, layout: str, batch: int, compile: bool = True) -> dict:
  os.environ["DERIS_JAX_CACHE"] = "off"
  import jax

  from configs import deris as deris_config
  from deris_jax import batch as batch_lib
  from deris_jax import cpu_options
  from deris_jax import sharding as S
  from deris_jax.models.deris import abstract_model
  from deris_jax.train import state as state_lib
  from deris_jax.train import step as step_lib

  config = deris_config.get_config(f"variant={variant},data=refcoco")
  config.model.scan_layers = layout != "loop"
  model = abstract_model(config.model)
  if layout in ("beit3", "beit3+swin"):  # switch the other stacks back to their loops
    for stage in model.swin.layers:
      stage.scan = layout == "beit3+swin"
    model.pixel_decoder.scan = False

  config.data.batch_size = batch
  config.data.official_world_size = 1  # the loss's, linked: any batch
  mesh = S.make_mesh(config.mesh, jax.devices()[:1])
  trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=1, model=model)
  batch_spec = batch_lib.abstract(config.data, batch, S.batch_sharding(mesh))
  row = dict(program=program, variant=variant, layout=layout, batch=batch)
  if program == "step":
    return dict(row, **lower_and_compile(step_lib.jit_train_step(trainer),
                                         (trainer.sharded_abstract_state(), batch_spec), compile))

  # The training loss as the step computes it (`step.make_loss_fn`), compiled with the step's
  # XLA options; its gradient in the trainable parameters only, held as the train state holds
  # them (the scanned stacks stacked: `Trainer.layout`).
  trainable, frozen = trainer.split_params(trainer.abstract_state.params)
  loss_fn = step_lib.make_loss_fn(trainer)
  grad = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0]),
                 compiler_options=cpu_options.compiler_options(mesh.devices.flat[0].platform))
  key = jax.eval_shape(lambda: jax.random.key(0))
  return dict(row, **lower_and_compile(grad, (trainable, frozen, batch_spec, key), compile))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--program", choices=("grad", "step"), default="grad")
  parser.add_argument("--variants", default="b,l")
  parser.add_argument("--layouts", default=",".join(LAYOUTS))
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--no_compile", action="store_true",
                      help="trace and lower only (seconds of each)")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # VARIANT:LAYOUT, in the subprocess
  args = parser.parse_args(argv)
  if args.one:
    variant, layout = args.one.split(":")
    print(json.dumps(measure(args.program, variant, layout, args.batch,
                             compile=not args.no_compile)), flush=True)
    return 0
  layouts = args.layouts.split(",")
  unknown = set(layouts) - set(LAYOUTS)
  if unknown:
    raise SystemExit(f"unknown layouts {sorted(unknown)}; known: {LAYOUTS}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = []
  print(f"malloc {malloc.describe()}", flush=True)
  for variant in args.variants.split(","):
    for _ in range(args.repeats):
      for layout in layouts:
        done = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--one",
                               f"{variant}:{layout}", "--batch", str(args.batch),
                               "--program", args.program,
                               *(["--no_compile"] if args.no_compile else [])],
                              capture_output=True, text=True, cwd=root)
        if done.returncode:
          print(done.stderr[-3000:], file=sys.stderr)
          return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        line = (f"{args.program} DeRIS-{variant.upper()} {layout:<10} trace {row['trace_s']:5.2f} s"
                f"  trace + lower {row['lower_s']:5.1f} s")
        if args.no_compile:
          line += f"  MLIR operations {row['mlir_operations']:7d}"
        else:
          line += (f"  compile {row['compile_s']:6.1f} s  HLO instructions "
                   f"{row['hlo_instructions']:7d}  distinct fused computations "
                   f"{row['distinct_fusions']:5d} of {row['fusions']:5d}")
        print(line, flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
