"""`train.py --dry_run` (deris_jax.train.dry_run): shapes, sizes, errors, the command line.

The released configs are only lowered (tracing catches every shape error; compiling DeRIS-B/L
on the test CPU would take minutes); the end-to-end run compiles the micro config.
"""
import ast
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from deris_jax import batch as batch_lib
from deris_jax.config_loader import load_config
from deris_jax.train import dry_run as D

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "configs" / "deris_micro.py")

# Parameters of the model built from each released config: (total, trainable, frozen Swin).
# docs/design.md §1 measured DeRIS-B 291.46 M (242.62 M trainable, Swin 48.84 M) and DeRIS-L
# 781.54 M (694.66 M): deris-jax builds ~0.14 M fewer, the official modules that are never
# called (deris_jax.convert.deris_keys.DROPS; tests/test_train_optimizer.py).
PARAMS = {
    "deris_b_refcoco": (291_316_629, 242_478_027, 48_838_602),
    "deris_b_grefcoco": (291_326_869, 242_488_267, 48_838_602),
    "deris_l_refcoco": (781_395_267, 694_514_891, 86_880_376),
    "deris_l_grefcoco": (781_408_067, 694_527_691, 86_880_376),
}
REFERENCE_MILLIONS = {"deris_b": (291.46, 242.62, 48.84), "deris_l": (781.54, 694.66, 86.88)}
# gRefCOCO's global batch is 4 (1 per GPU x 4 GPUs, §9): it does not split over the 8 test
# devices, so those configs are checked on 4 of them.
DEVICES = {"deris_b_refcoco": 8, "deris_b_grefcoco": 4, "deris_l_refcoco": 8,
           "deris_l_grefcoco": 4}


def _shapes(infos) -> dict:
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in infos.items()}


@pytest.mark.slow  # lowers a full-size model (~20 s each)
@pytest.mark.parametrize("variant", sorted(PARAMS))
def test_released_config_lowers_at_its_shapes_and_sizes(variant):
  config = load_config(str(ROOT / "configs" / f"{variant}.py"))
  data, n = config.data, DEVICES[variant]
  report = D.dry_run(config, devices=jax.devices()[:n], compile=False)

  total, trainable, frozen = PARAMS[variant]
  assert (report.total_params, report.trainable_params, report.frozen_params) == (
      total, trainable, frozen)
  ref_total, ref_trainable, ref_frozen = REFERENCE_MILLIONS[variant[:len("deris_b")]]
  assert 0 < ref_total - total / 1e6 < 0.15 and 0 < ref_trainable - trainable / 1e6 < 0.15
  assert abs(frozen / 1e6 - ref_frozen) < 0.005
  assert report.param_bytes == 4 * total  # float32
  # Adam + amsgrad: mu, nu and nu_max for every trainable parameter, plus a few scalars.
  assert 3 * trainable <= report.opt_state_elements < 3 * trainable + 100
  assert report.opt_state_bytes == 4 * report.opt_state_elements

  assert report.mesh == {"data": n, "fsdp": 1}
  assert report.global_batch == data.batch_size
  assert report.per_device_batch * n == data.batch_size
  b, (h, w), (hc, wc) = data.batch_size, data.image_size, data.cognition_image_size
  length, k = data.max_tokens, data.max_instances
  expected = {
      "image": ((b, h, w, 3), np.float32), "image_mini": ((b, hc, wc, 3), np.float32),
      "text_ids": ((b, length), np.int32), "text_padding_mask": ((b, length), np.int32),
      "gt_masks": ((b, k, h, w), np.uint8), "gt_valid": ((b, k), np.bool_),
      "exists": ((b,), np.int32), "weight": ((b,), np.float32)}
  train = report.program("train step")
  (state_info, batch_info), _ = train.lowered.args_info
  assert _shapes(batch_info) == expected
  assert not any(a.donated for a in jax.tree.leaves(batch_info))
  assert all(a.donated for a in jax.tree.leaves(state_info))  # the state is donated
  assert sum(np.prod(a.shape) for a in jax.tree.leaves(state_info.params)) == total

  eb = report.eval_global_batch
  assert eb == 16 and eb % n == 0 and report.eval_per_device_batch == 16 // n
  forward = report.program("eval forward")
  params_info, *inputs = forward.lowered.args_info[0]
  assert [tuple(a.shape) for a in inputs] == [(eb, h, w, 3), (eb, hc, wc, 3), (eb, length),
                                              (eb, length)]
  queries = config.model.num_queries
  assert [tuple(o.shape) for o in forward.lowered.out_info] == [
      (eb, queries, h, w), (eb, queries, 2), (eb, 1)]
  counts = report.program("eval counts").lowered.out_info
  assert counts["intersection"].shape == (eb, 1) and counts["scores"].shape == (eb, queries)
  assert all(p.compile_seconds is None and p.memory is None for p in report.programs)


def test_batch_dtypes_are_the_pipeline_contract():
  """The abstract batch has the dtypes deris_jax/data/pipeline.py documents (read without
  importing it: that would import TensorFlow)."""
  source = (ROOT / "deris_jax" / "data" / "pipeline.py").read_text()
  doc = ast.get_docstring(ast.parse(source))
  documented = {}
  for key in batch_lib.TRAIN_KEYS:
    match = re.search(rf"^\s+{key} \([^)]*\) (\w+)", doc, re.M) or re.search(
        rf"; {key} \([^)]*\) (\w+)", doc)
    assert match, f"{key} not documented in the pipeline docstring"
    documented[key] = np.dtype(match.group(1))
  assert documented == {k: np.dtype(v) for k, v in batch_lib.DTYPES.items()}


def _unlinked_data(config, **changes):
  """`config` with a data section of plain values (not linked to the model's) and changes."""
  config.data = ml_collections.ConfigDict(config.data.to_dict())
  config.data.update(changes)
  return config


def test_data_and_model_disagreement_is_reported_before_anything_is_built():
  # The configs link the shared values: an override moves the model's and the data's.
  config = load_config(MICRO, ["data.max_tokens=16"])
  assert (config.model.max_tokens, config.data.max_tokens) == (16, 16)
  # A config whose sections are not linked (assembled by hand) is stopped at the first stage.
  config = _unlinked_data(load_config(MICRO), max_tokens=16)
  with pytest.raises(D.DryRunError) as info:
    D.dry_run(config, compile=False)
  assert str(info.value) == ("config check: config data.max_tokens 16 differs from "
                             "model.max_tokens 12: the model would see another text length")
  assert info.value.stage == "config check" and info.value.report.mesh is None
  config = _unlinked_data(load_config(MICRO), cognition_image_size=(64, 64))
  with pytest.raises(D.DryRunError, match=r"data.cognition_image_size \(64, 64\) differs from "
                     r"model.cognition_image_size \(32, 32\)"):
    D.dry_run(config, compile=False)


def test_a_batch_that_does_not_split_over_the_devices_is_reported():
  config = load_config(MICRO, ["data.batch_size=12", "mesh.data=2", "mesh.fsdp=4"])
  with pytest.raises(D.DryRunError) as info:
    D.dry_run(config, compile=False)
  assert str(info.value) == (
      "train batch: config data.batch_size 12 does not split over the 8 batch devices of the "
      "mesh (data=2, fsdp=4): use a multiple of 8")
  report = info.value.report
  assert report.mesh == {"data": 2, "fsdp": 4} and report.trainable_params is None
  assert "devices: 8 x" in D.format_report(report)[0]


def test_a_shape_error_while_tracing_is_reported_with_the_partial_report():
  """reference_compat groups of 3 do not divide the global batch of 8: the model raises while
  the train step is traced; parameter counts were already found."""
  config = load_config(MICRO, ["model.compat_group_size=3"])
  with pytest.raises(D.DryRunError) as info:
    D.dry_run(config, compile=False)
  assert str(info.value) == ("train step: reference_compat query_SA: batch 8 is not a multiple "
                             "of compat_group_size 3")
  report = info.value.report
  assert report.trainable_params > 0 and report.programs == []
  lines = D.format_report(report)
  assert any(line.startswith("parameters: ") for line in lines)


def test_eval_settings_are_checked_before_anything_is_built():
  config = load_config(MICRO, ["eval.best_metric=IoU"])
  with pytest.raises(D.DryRunError) as info:
    D.dry_run(config, compile=False)
  assert info.value.stage == "eval settings"
  assert "config eval.best_metric 'IoU' is not a metric of the 'gres' task" in str(info.value)
  assert info.value.report.mesh is None


def test_without_train_splits_only_the_train_step_is_built():
  config = load_config(MICRO, ["eval.train_splits=()"])
  report = D.dry_run(config, compile=False)
  assert [p.name for p in report.programs] == ["train step"]
  assert report.eval_global_batch is None
  assert any("no eval program" in n for n in report.notes)
  config = load_config(MICRO)
  report = D.dry_run(config, compile=False)
  assert [p.name for p in report.programs] == ["train step", "eval forward", "eval counts"]
  assert "evaluation during training: val at tau 0.7; best checkpoint by mean cIoU over val" in (
      report.checks)


def test_a_program_larger_than_the_device_memory_is_an_error():
  memory = D.Memory(arguments=3 * 2**30, outputs=3 * 2**30, temporaries=5 * 2**30,
                    generated_code=2**20, aliased=3 * 2**30)
  assert memory.total == 8 * 2**30 + 2**20
  report = D.DryRunReport(device_memory_limit=16 * 2**30, programs=[D.Program(
      name="train step", batch=64, inputs={}, lower_seconds=1.0, compile_seconds=2.0,
      memory=memory)])
  D.check_memory(report)
  assert report.checks == ["every program fits the device memory (16.00 GiB)"]
  report.device_memory_limit = 8 * 2**30
  with pytest.raises(ValueError, match=r"train step at global batch 64 needs 8.00 GiB per device "
                     r"\(XLA estimate\) but a device has 8.00 GiB: lower data.batch_size"):
    D.check_memory(report)
  report.device_memory_limit = None  # CPU: nothing to compare with
  D.check_memory(report)


# ----------------------------------------------------------------------------------------------
# train.py --dry_run as a command.

def _run_train_py(args, *, importtime=False):
  env = dict(os.environ)  # conftest's XLA_FLAGS: 8 devices
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  python = [sys.executable] + (["-X", "importtime"] if importtime else [])
  return subprocess.run(python + [str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _bytes(text: str) -> float:
  value, unit = text.split()
  return float(value) * _UNITS[unit]


@pytest.mark.slow  # a subprocess or several processes
def test_train_py_dry_run_prints_sizes_and_memory_and_exits_0():
  proc = _run_train_py(["--config", MICRO, "--dry_run"], importtime=True)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")]
  assert imported and not any(m == "tensorflow" or m.startswith(("tensorflow.",
                                                                  "tensorflow_datasets"))
                              for m in imported)
  config = load_config(MICRO)
  report = D.dry_run(config, compile=False)  # the same counts, without compiling
  assert "mesh: data=8 x fsdp=1" in out
  assert "train batch: global 8, per device 1" in out
  assert "eval batch: global 8, per device 1" in out
  assert (f"trainable {report.trainable_params / 1e6:.2f} M, frozen "
          f"{report.frozen_params / 1e6:.2f} M") in out
  assert f"optimizer state: {report.opt_state_elements / 1e6:.2f} M elements" in out
  for name in ("train step", "eval forward", "eval counts"):
    assert re.search(rf"^{name} \(global batch 8\): lowered in [\d.]+ s, compiled in [\d.]+ s$",
                     out, re.M), name
  memory = re.findall(r"^  memory per device: arguments ([\d.]+ \w+), outputs ([\d.]+ \w+), "
                      r"temporaries ([\d.]+ \w+), generated code ([\d.]+ \w+), aliased "
                      r"\(donated\) ([\d.]+ \w+), total ([\d.]+ \w+)", out, re.M)
  assert len(memory) == 3
  arguments, outputs, temporaries, code, aliased, total = (_bytes(x) for x in memory[0])
  state_bytes = report.param_bytes + report.opt_state_bytes  # fsdp=1: every device holds it
  assert state_bytes <= arguments < 1.5 * state_bytes  # the state and an 8-sample batch
  assert 0.99 * state_bytes <= aliased <= outputs  # the donated state is updated in place
  assert total == pytest.approx(arguments + outputs + temporaries + code - aliased, rel=0.02)
  assert out.rstrip().endswith("ok: the config fits together on these devices")


@pytest.mark.slow  # a subprocess or several processes
def test_train_py_dry_run_exits_1_with_one_error_line():
  proc = _run_train_py(["--config", MICRO, "--dry_run", "--config.data.batch_size=6"])
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: train batch: config data.batch_size 6 does not split over the 8 "
                    "batch devices of the mesh (data=8, fsdp=1): use a multiple of 8"]
  assert "mesh: data=8 x fsdp=1" in proc.stdout and "ok:" not in proc.stdout
