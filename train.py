"""Trains DeRIS: `python train.py --config configs/X.py[:arg] --workdir DIR [--config.a.b=v]`.

e.g. `--config configs/deris.py:variant=l,data=grefcoco` (or its alias
configs/deris_l_grefcoco.py). The parsed config (overrides applied) is checked once
(`deris_jax.config_check`: values two sections share must agree) before anything else runs.

With no arguments it runs the embedded default job: a small DeRIS on the synthetic shapes
dataset (prepared on first use, no download), which learns in three to four minutes on
a 2-core CPU and prints its mIoU / gIoU. A workdir that already holds a checkpoint resumes
exactly where it stopped. `--init_from DIR` starts from the parameters of a checkpoint
(converted official weights, or another run) with a fresh optimizer.

`--dry_run` checks that the config fits together on the devices present, before any data is
prepared and any parameter allocated (`deris_jax.train.dry_run`): it lowers and compiles the
train step and the evaluation at the config's shapes and global batches, prints the mesh,
batches, parameter and optimizer-state sizes and XLA's memory estimate per device, and exits
0, or 1 with an `error: ...` line naming what does not fit.
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import pathlib
import sys

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from deris_jax import cli, compile_cache, config_check
from deris_jax.train import dry_run as dry_run_lib
from deris_jax.train import input as input_lib
from deris_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = "configs/synthetic.py"

config_flags.DEFINE_config_file("config", str(ROOT / DEFAULT_CONFIG), "config file[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints and TensorBoard events; default "
                    "workdir/<config name>")
flags.DEFINE_string("init_from", None, "start from the params of this checkpoint directory")
flags.DEFINE_bool("dry_run", False, "check the config against the devices (lower and compile "
                  "the train and eval programs on abstract shapes; no data, no parameters), "
                  "print sizes and memory, exit 0 if it fits, 1 with an error line if not")
FLAGS = flags.FLAGS


def default_workdir(config_path: str) -> str:
  """workdir/<config file name>[_<its argument>], so that each variant has its own:
  configs/deris.py:variant=l,data=grefcoco -> workdir/deris_variant-l_data-grefcoco."""
  path, _, arg = config_path.partition(":")
  name = pathlib.Path(path).stem
  if arg:
    name += "_" + arg.replace("=", "-").replace(",", "_").replace("/", "-")
  return str(ROOT / "workdir" / name)


def dry_run(config, config_path: str) -> int:
  """`--dry_run`: no dataset (TensorFlow is not imported), abstract parameters only."""
  main_process = jax.process_index() == 0
  say = (lambda line: print(line, flush=True)) if main_process else (lambda line: None)
  say(f"dry run of config {config_path} (no data read, no parameter allocated)")
  try:
    report = dry_run_lib.dry_run(config, progress=say)
  except dry_run_lib.DryRunError as e:
    dry_run_lib.print_report(e.report, say)
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  dry_run_lib.print_report(report, say)
  say("ok: the config fits together on these devices")
  return 0


def main(argv):
  del argv
  # absl's own --verbosity flag: 0 unless given, our convention (deris_jax/cli.py).
  cli.set_verbosity(FLAGS.verbosity if FLAGS["verbosity"].present else 0)
  compile_cache.enable()
  config = FLAGS.config
  try:
    config_check.check_config(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  if "train" in config and config.train.distributed:
    jax.distributed.initialize()
  config_path = flags.FLAGS["config"].config_filename
  if FLAGS.dry_run:
    return dry_run(config, config_path)
  workdir = FLAGS.workdir or default_workdir(config_path)
  print(f"config {config_path}, workdir {workdir}", flush=True)
  input_lib.ensure_prepared(config.data)
  try:
    result = loop.train(config, workdir, init_from=FLAGS.init_from)
  except loop.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"done: {result.steps_done}/{result.total_steps} steps ({result.stopped}); last "
        f"checkpoint step {result.last_checkpoint} in {workdir}/checkpoints", flush=True)
  record = result.best or {}
  if record.get("saved_step") is not None:
    best, saved = record["best"], record["saved_step"]
    what = (f"val {record['aggregate']} {record['metric']} {best['value']:.2f} at step {saved} "
            f"(epoch {best['epoch']})" if best["step"] == saved else f"step {saved}")
    print(f"best checkpoint: {what} in {workdir}/checkpoints/best", flush=True)
  for split, evaluated in result.eval_results.items():
    metrics = dict(evaluated["metrics"], **evaluated.get("extra_metrics", {}))
    shown = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    print(f"{split} (tau {evaluated['score_threshold']:g}, {evaluated['num_samples']} samples): "
          f"{shown}", flush=True)
  return 0


if __name__ == "__main__":
  cli.tune_gc()
  app.run(main)
