"""deris_jax.cli: one command-line convention for every entry point, and quiet output."""
import importlib
import logging
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

import bench
import convert
import demo
import predict
from deris_jax import checkpoints, cli
from deris_jax.data import prepare
from deris_jax.parity import __main__ as parity

ROOT = pathlib.Path(__file__).resolve().parents[1]
eval_cli = importlib.import_module("eval")
MICRO = str(ROOT / "configs" / "deris_micro.py")


@pytest.fixture(autouse=True)
def _restore_verbosity():
  yield
  cli.set_verbosity(0)
  warnings.resetwarnings()
  logging.getLogger().setLevel(logging.WARNING)


def test_split_overrides_takes_both_forms():
  rest, overrides = cli.split_overrides(
      ["--checkpoint", "c", "--config.model.dtype=bfloat16", "--config.eval.batch_size", "4",
       "--config", "x.py:a=1", "--config.data.eval_splits=('val',)"])
  assert rest == ["--checkpoint", "c", "--config", "x.py:a=1"]
  assert overrides == ["model.dtype=bfloat16", "eval.batch_size=4", "data.eval_splits=('val',)"]


def test_split_overrides_takes_absl_one_dash_and_stops_at_double_dash():
  rest, overrides = cli.split_overrides(
      ["-config.model.dtype=bfloat16", "-config.eval.batch_size", "4", "--", "--config.x=1"])
  assert overrides == ["model.dtype=bfloat16", "eval.batch_size=4"]
  assert rest == ["--", "--config.x=1"]


@pytest.mark.parametrize("argv, message", [
    (["--override", "a.b=1"], "--override is gone: override a config field with --config.a.b"),
    (["--config.a.b"], "--config.a.b needs a value"),
    (["--config.=3"], "no field name"),
])
def test_malformed_command_lines_say_what_to_write(argv, message):
  with pytest.raises(cli.UsageError, match=message):
    cli.split_overrides(argv)


def test_load_takes_the_checkpoints_config_when_none_is_given(tmp_path):
  config = cli.load(MICRO)
  checkpoints.save_params(tmp_path / "ck", {"w": np.zeros(2, np.float32)},
                          metadata={"kind": "train", "config": config.to_dict()})
  stored = cli.load(None, ["model.dtype=bfloat16"], checkpoint=tmp_path / "ck")
  assert stored.model.dtype == "bfloat16" and stored.data.to_dict() == config.data.to_dict()
  with pytest.raises(cli.UsageError, match="give --config"):
    cli.load(None)


@pytest.mark.parametrize("main, argv", [
    (eval_cli.main, ["--checkpoint", "c", "--split", "val"]),
    (predict.main, ["--checkpoint", "c", "--image", "x.png", "--text", "a"]),
    (demo.main, ["--checkpoint", "c"]),
    (convert.main, ["deris", "--checkpoint", "c.pth", "--out", "o", "--config", MICRO]),
    (bench.main, ["--config", MICRO]),
    (parity.main, ["fixture"]),
])
def test_every_command_refuses_the_old_override_flag(main, argv, capsys):
  with pytest.raises(SystemExit):
    main(argv + ["--override", "model.dtype=bfloat16"])
  assert "--override is gone" in capsys.readouterr().err


def test_prepare_takes_the_dataset_a_config_reads(tmp_path, capsys):
  data_dir = tmp_path / "tfds"
  assert prepare.main(["--config", MICRO, f"--config.data.data_dir={data_dir}"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert any(line.startswith("train: 72 examples, 24 images") for line in out), out  # tiny set
  assert (data_dir / "deris_synthetic" / "tiny").is_dir()


def test_prepare_needs_a_dataset_or_a_config(capsys):
  with pytest.raises(SystemExit):
    prepare.main([])
  assert "give --dataset (or --config" in capsys.readouterr().err


@pytest.mark.parametrize("main, argv", [
    (convert.main, ["deris", "--checkpoint", "c.pth", "--out", "o", "--config", MICRO]),
    (parity.main, ["fixture"]),
])
def test_an_unknown_field_is_one_error_line(main, argv, capsys, tiny_dir):
  argv = [str(tiny_dir) if a == "fixture" else a for a in argv]
  assert main(argv + ["--config.model.nope=1"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: override 'model.nope=1': unknown config field 'model.nope'"]


def test_bench_names_an_unknown_field(capsys):
  with pytest.raises(SystemExit):
    bench.main(["--config", MICRO, "--config.model.nope=1"])
  assert "unknown config field 'model.nope'" in capsys.readouterr().err


def test_a_tensorflow_log_level_the_user_exported_is_kept(monkeypatch):
  monkeypatch.setattr(cli, "_USER_TF_CPP_LEVEL", "1")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
  monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
  cli.set_verbosity(0)
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


@pytest.mark.parametrize("exported", [None, "1", "2"])
def test_the_users_tensorflow_log_level_is_told_from_jaxs_default(exported):
  """Importing jax sets TF_CPP_MIN_LOG_LEVEL=1 when it is unset; that is not the user's."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  if exported is not None:
    env["TF_CPP_MIN_LOG_LEVEL"] = exported
  code = ("import jax, os\nfrom deris_jax import cli\n"
          "print(cli.user_tf_cpp_level(), os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1],
                       env=env, capture_output=True, text=True, check=True).stdout.split()
  assert out == [str(exported), exported or "1"]


def test_verbosity_zero_silences_the_libraries_but_not_us():
  cli.set_verbosity(0)
  assert logging.getLogger("absl").level == logging.ERROR
  assert logging.getLogger("tensorflow").level == logging.ERROR and not cli.verbose()
  with warnings.catch_warnings(record=True) as caught:
    warnings.warn_explicit("lib", DeprecationWarning, "x.py", 1, module="tensorflow.x")
    warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="deris_jax.train.loop")
  assert [str(w.message) for w in caught] == ["ours"]
  ours = logging.getLogger("deris_jax.train.loop")  # a warning of ours still passes
  assert ours.isEnabledFor(logging.WARNING) and not logging.getLogger("orbax").isEnabledFor(
      logging.WARNING)
  cli.set_verbosity(1)
  assert logging.getLogger("absl").level == logging.INFO and cli.verbose()


def test_tune_gc_freezes_the_live_heap_and_spaces_young_collections():
  import gc
  before_count, before_threshold = gc.get_freeze_count(), gc.get_threshold()
  try:
    cli.tune_gc()
    assert gc.get_freeze_count() > before_count
    assert gc.get_threshold() == (cli.YOUNG_GC_THRESHOLD,) + before_threshold[1:]
  finally:
    gc.unfreeze()
    if before_count:  # conftest froze the worker's heap (cli.tune_gc): freeze it again
      gc.freeze()
    gc.set_threshold(*before_threshold)


@pytest.mark.parametrize("script", ["train.py", "eval.py", "predict.py", "demo.py", "bench.py"])
def test_each_command_tunes_the_gc_in_its_main_guard(script):
  """In the main guard, not in main(): tests call main() in-process and must not freeze."""
  import ast
  root = pathlib.Path(__file__).resolve().parents[1]
  tree = ast.parse((root / script).read_text())
  guards = [node for node in tree.body if isinstance(node, ast.If)
            and ast.unparse(node.test) == "__name__ == '__main__'"]
  assert len(guards) == 2, script  # the first re-executes with a faster malloc (test_malloc.py)
  calls = [ast.unparse(n.func) for n in ast.walk(guards[1]) if isinstance(n, ast.Call)]
  assert calls[0] == "cli.tune_gc", (script, calls)
  main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
  assert "tune_gc" not in ast.unparse(main)
