"""bench.py's helpers (random parameters, the largest-batch search, the output of a run cut
short) and tools/gpu_bench.sh's part selection; the benchmarks themselves are not tests."""
import json
import pathlib
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "configs" / "deris_micro.py")


def _abstract():
  return {"encoder": {"norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32),
                               "bias": jax.ShapeDtypeStruct((8,), jnp.float32)},
                      "kernel": jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)}}


def test_random_params_follow_the_abstract_tree(caplog):
  with jax.log_compiles(), caplog.at_level("WARNING"):
    params = bench.random_params(_abstract())
  # drawn on the host: no program per leaf shape (compiling them outran the H200's time limit)
  assert not [r for r in caplog.records if "ompil" in r.getMessage()], caplog.text
  assert jax.tree.structure(params) == jax.tree.structure(_abstract())
  kernel = np.asarray(params["encoder"]["kernel"], np.float32)
  assert params["encoder"]["kernel"].dtype == jnp.bfloat16 and kernel.shape == (64, 32)
  assert abs(kernel.mean()) < 0.005 and 0.017 < kernel.std() < 0.023  # N(0, 0.02)
  scale = np.asarray(params["encoder"]["norm"]["scale"])
  assert np.all(np.abs(scale - 1) < 0.1) and not np.all(scale == 1)  # 1 + N(0, 0.02)
  bias = np.asarray(params["encoder"]["norm"]["bias"])
  assert np.all(np.abs(bias) < 0.1) and not np.all(bias == 0)
  again = bench.random_params(_abstract())
  other = bench.random_params(_abstract(), seed=1)
  assert np.array_equal(np.asarray(again["encoder"]["kernel"], np.float32), kernel)
  assert not np.array_equal(np.asarray(other["encoder"]["kernel"], np.float32), kernel)


def test_random_params_are_placed_into_the_shardings():
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), _abstract())
  shardings["encoder"]["kernel"] = NamedSharding(mesh, PartitionSpec("fsdp"))
  params = bench.random_params(_abstract(), shardings)
  assert params["encoder"]["kernel"].sharding == shardings["encoder"]["kernel"]
  assert params["encoder"]["kernel"].addressable_shards[0].data.shape == (32, 32)


def test_largest_batch_fits_an_affine_memory():
  compiled = []

  def compile_at(batch):  # 100 bytes per sample on 1000 fixed, as XLA's analysis would say
    compiled.append(batch)
    return {"mem_bytes": 1000.0 + 100.0 * batch}

  found = bench.largest_batch(compile_at, {4: 1400.0}, limit_bytes=5000.0, multiple=4)
  assert found["max_batch"] == 40 and found["bytes_at_max"] == 5000.0
  assert found["bytes_per_sample"] == 100.0 and compiled == [8, 40]


def test_max_batch_keeps_the_measured_rows_when_the_search_is_cut_short(tmp_path, monkeypatch):
  row = dict(mode="infer", batch=2, step_ms=1.0, xla_mem_gib=0.5)
  monkeypatch.setitem(bench.BENCHES, "infer", lambda config, batches, args: ([dict(row)],
                                                                               None, 1))

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # what a time limit's signal does to the search
  monkeypatch.setattr(bench, "largest_batch", interrupted)
  out = tmp_path / "rows.json"
  with pytest.raises(KeyboardInterrupt):
    bench.main(["--config", MICRO, "--max_batch", "--memory_gib", "1", "--json", str(out)])
  assert json.loads(out.read_text()) == [row]


@pytest.mark.parametrize("mode, argv, message", [
    ("train", ["--batch", "2"], "--batch 2: the batch splits over the 8 devices of the mesh "
     "(data=8, fsdp=1; --mesh or config.mesh) and model.reference_compat attends over groups "
     "of model.compat_group_size=2 samples: use a multiple of 8"),
    ("train", ["--batch", "8,12", "--mesh", "4,2"], "--batch 12: the batch splits over the 8 "
     "devices of the mesh (data=4, fsdp=2; --mesh or config.mesh)"),
    ("train", ["--batch", "8", "--mesh", "4,1"], "--mesh / config mesh (data=4, fsdp=1) uses 4 "
     "devices but 8 are present"),
    ("train", ["--batch", "8", "--config.model.reference_compat=false", "--mesh", "2,4"], None),
    ("infer", ["--batch", "3"], "--batch 3: model.reference_compat attends over groups of "
     "model.compat_group_size=2 samples: use a multiple of 2"),
    ("infer", ["--batch", "0"], "--batch 0: a batch size must be >= 1"),
    # A batch below the group size is one group (the model takes it: the official last batch).
    ("infer", ["--batch", "1"], None),
    ("infer", ["--batch", "2,4"], None),
    ("infer", ["--batch", "two"], "--batch 'two': comma-separated integers"),
    ("deform", ["--batch", "1,x"], "--batch '1,x': comma-separated integers"),
    ("deform", ["--batch", "-1"], "--batch -1: a batch size must be >= 1"),
])
def test_a_batch_the_program_cannot_take_is_a_usage_error(mode, argv, message, capsys,
                                                          monkeypatch):
  # Checked before the model or the state is built (bench.random_params builds them).
  class Built(Exception):
    pass

  def built(*args, **kwargs):
    raise Built

  monkeypatch.setattr(bench, "random_params", built)
  if message is None:  # a batch that fits gets past the check
    with pytest.raises(Built):
      bench.main(["--mode", mode, "--config", MICRO, *argv])
    return
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--mode", mode, "--config", MICRO, *argv])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err, err


def test_gpu_bench_refuses_an_unknown_part_before_it_starts(tmp_path):
  script = ROOT / "tools" / "gpu_bench.sh"
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  proc = subprocess.run(["bash", str(script), "5"], cwd=tmp_path, capture_output=True, text=True,
                        env={"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path / "out")})
  assert proc.returncode == 2 and "unknown part '5'" in proc.stderr
  assert not (tmp_path / "out").exists()


def test_gpu_bench_parts_fit_one_lease():
  """Each part's entry limits add up to at most 540 s: a 15-minute lease, less the machine's
  start, the install and the transfers."""
  text = (ROOT / "tools" / "gpu_bench.sh").read_text()
  body = text[text.index('case $PART in\n  1)'):]
  parts = re.findall(r"^  (\d)\)\n(.*?)^    ;;", body, re.M | re.S)
  assert [p for p, _ in parts] == ["1", "2", "3", "4"]
  for part, entries in parts:
    limits = [int(x) for x in re.findall(r"^    (?:run|canary) \S+ (\d+) ", entries, re.M)]
    assert limits and sum(limits) <= 540, (part, limits)


def test_model_flops_count_every_layer_of_a_scanned_stack():
  config = bench.cli.load(MICRO, ["model.beit3.num_layers=4",
                                  "model.pixel_decoder.num_layers=3",
                                  "model.swin.depths=(2,2,4,2)"])
  looped, scanned = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  looped.model.scan_layers, scanned.model.scan_layers = False, True
  scanned.model.remat = True
  # XLA counts a scanned stack's body once: the raw count of the scanned program is smaller
  looped_gflops = bench.lowered_forward_gflops(looped.model, 2)
  assert bench.lowered_forward_gflops(scanned.model, 2) < 0.9 * looped_gflops
  counted = bench.counting_config(scanned)
  assert not counted.model.scan_layers and not counted.model.remat and scanned.model.scan_layers
  assert bench.lowered_forward_gflops(counted.model, 2) == pytest.approx(looped_gflops, rel=1e-6)
