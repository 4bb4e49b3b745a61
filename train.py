"""Trains DeRIS: `python train.py --config configs/X.py[:arg] --workdir DIR [--config.a.b=v]`.

With no arguments it runs the embedded default job: a small DeRIS on the synthetic shapes
dataset (prepared on first use, no download), which learns in about ten minutes on a
2-core CPU and prints its mIoU / gIoU. A workdir that already holds a checkpoint resumes
exactly where it stopped. `--init_from DIR` starts from the parameters of a checkpoint
(converted official weights, or another run) with a fresh optimizer.
"""
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = "configs/synthetic.py"

config_flags.DEFINE_config_file("config", str(ROOT / DEFAULT_CONFIG), "config file[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints and TensorBoard events; default "
                    "workdir/<config name>")
flags.DEFINE_string("init_from", None, "start from the params of this checkpoint directory")
FLAGS = flags.FLAGS


def default_workdir(config_path: str) -> str:
  name = pathlib.Path(config_path.partition(":")[0]).stem
  return str(ROOT / "workdir" / name)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if not FLAGS["verbosity"].present:  # Orbax / TFDS info lines would drown the train log
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if config.train.distributed:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from deris_jax.train import input as input_lib  # pylint: disable=g-import-not-at-top
  from deris_jax.train import loop  # pylint: disable=g-import-not-at-top
  config_path = flags.FLAGS["config"].config_filename
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
  for split, evaluated in result.eval_results.items():
    metrics = dict(evaluated["metrics"], **evaluated.get("extra_metrics", {}))
    shown = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    print(f"{split} (tau {evaluated['score_threshold']:g}, {evaluated['num_samples']} samples): "
          f"{shown}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
