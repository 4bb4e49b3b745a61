"""A held-out official-format gRefCOCO set through prepare, train.py and eval.py (CLI level).

The tiny DeRIS-format files (tests/tiny_files.py) edited to cover what the released
gRefCOCO recipes meet on the real files: an expression with more referred instances than the
model has queries (2 targets, micro model with 1 query: the official 20 x K matching), an
evaluation split whose file order is not sorted by image, and an image shared by the training
and the validation split. The micro DeRIS (configs/deris_micro.py) trains 3 steps on it with
the official loss normaliser and sampler groups, then eval.py scores the checkpoint.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import tiny_files
from tests import xla_flags
from deris_jax.data import tokenizer as tok

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args, env=None):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=900)


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
  root = tmp_path_factory.mktemp("grefcoco_recipe")
  tiny_files.write_deris(str(root / "manual"))
  path = root / "manual" / "annotations" / "grefs" / "instances.json"
  data = json.loads(path.read_text())
  # val in an order that is not sorted by image (30, 25, 9), and sharing images with train.
  data["val"] = data["testA"] + data["val"]
  path.write_text(json.dumps(data))
  spm = root / "tiny.spm"
  spm.write_bytes(tok.train_sentencepiece(tiny_files.all_expressions(), 80))
  return root, spm


def test_prepare_train_and_eval(manual):
  root, spm = manual
  data_dir = root / "tfds"
  prepared = _run("-m", "deris_jax.data.prepare", "--dataset", "grefcoco", "--manual_dir",
                  str(root / "manual"), "--data_dir", str(data_dir))
  assert prepared.returncode == 0, prepared.stderr
  lines = prepared.stdout.splitlines()
  assert "train: 4 examples, 3 images, up to 2 referred instances per expression" in lines
  assert "val: 3 examples, 3 images, up to 2 referred instances per expression" in lines
  assert any(line.startswith("warning: 3 image(s) of the training split also appear in "
                             "evaluation split 'val' (e.g. image ids [9, 25, 30])")
             for line in lines), prepared.stdout

  data = ["data.name=grefcoco", "data.builder_config=deris", f"data.data_dir={data_dir}",
          f"data.tokenizer_path={spm}", "data.max_instances=2", "data.canvas_size=(64,64)",
          "data.batch_size=2", "data.official_world_size=2", "data.eval_splits=('val',)",
          "data.eval_batch_size=2", "eval.splits=('val',)"]
  model = ["model.num_queries=1", "model.compat_group_size=2"]
  train_args = ["--config", "configs/deris_micro.py", "--workdir", str(root / "run"),
                "--config.train.max_steps=3", "--config.loss.normalizer=official",
                "--config.train.checkpoint_every_steps=3",
                "--config.eval.train_splits=()"]  # eval.py evaluates, once
  train_args += [f"--config.{o}" for o in data + model]
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_device_count(2))  # conftest's, 2 devices
  trained = _run("train.py", *train_args, env=env)
  assert trained.returncode == 0, trained.stderr[-3000:]
  out = trained.stdout + trained.stderr
  assert "refer to more than model.num_queries=1 instances (up to 2)" in out
  assert "done: 3/3 steps" in out

  # The checkpoint carries the run's config (overrides included): --checkpoint is enough.
  eval_args = ["--checkpoint", str(root / "run" / "checkpoints"), "--split", "val", "--out",
               str(root / "eval")]
  evaluated = _run("eval.py", *eval_args, env=env)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((root / "eval" / "results.json").read_text())["results"]
  assert results[0]["num_samples"] == 3
  assert results[0]["protocol"]["grouping"] == (
      "official: consecutive entries of the annotation file")
  with open(root / "eval" / "per_sample.val.reference.jsonl") as f:
    samples = [json.loads(line) for line in f]
  # The per-sample records follow the file: images 30, 25, 9.
  assert [s["image_id"] for s in samples] == [30, 25, 9]
  assert [s["num_targets"] for s in samples] == [1, 2, 0]
