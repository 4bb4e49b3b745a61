"""The sharded train step equals the single-device step, and two processes equal one.

On the 8 fake CPU devices of conftest.py: the micro DeRIS (configs/deris_micro.py) takes the
same two steps on one device and on the meshes (data, fsdp) = (8, 1) and (1, 8); losses
and updated parameters agree to rtol 1e-5. Then two processes on localhost, 4 devices each,
joined by `jax.distributed.initialize` with gloo CPU collectives, take the same steps on a
(4, 2) mesh spanning both: same losses and parameters as the single device, parameters and
Adam moments sharded alike over fsdp. The mixed mesh is judged there only, across processes,
so that its program is not compiled twice per run.

Run as a script (`python tests/test_train_sharding.py worker ...`) this file is one process
of that multi-host run.
"""
import collections
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from deris_jax import batch as batch_lib
from deris_jax import executable_cache
from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.config_loader import load_config
from deris_jax.train import state as state_lib
from deris_jax.train import step as step_lib
from tests import xla_flags
from tests.jax_caches import fresh_jax_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = ((8, 1), (1, 8))  # (4, 2): test_two_processes_equal_one
NUM_STEPS = 2
STEPS_PER_EPOCH = 9  # both steps in epoch 0; a value of the state, not of the program, so the
# (8, 1) program is the one the loop's tests compile
RTOL = 1e-5


def micro_config(data: int = -1, fsdp: int = 1):
  """The micro config (its Adam eps is raised for these comparisons) on a (data, fsdp) mesh."""
  config = load_config(str(ROOT / "configs" / "deris_micro.py"))
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def host_params(config, seed: int = 0):
  """Deterministic parameters made on the host (no compiled initialiser needed)."""
  abstract = jax.eval_shape(state_lib.init_params_fn(config.model), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def make(name, leaf):
    base = 1.0 if name.endswith("scale") else 0.0
    return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return trees.map_with_names(make, abstract)


def host_batches(config, num_steps: int, seed: int = 0):
  """Global batches: random images and tokens, rectangle targets, one padding example."""
  rng = np.random.default_rng(seed)
  b, k = config.data.batch_size, config.data.max_instances
  h, w = config.model.image_size
  hm, wm = config.model.cognition_image_size
  length = config.model.max_tokens
  batches = []
  for _ in range(num_steps):
    num_targets = rng.integers(0, k + 1, b)
    masks = np.zeros((b, k, h, w), np.uint8)
    for i in range(b):
      for j in range(num_targets[i]):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        masks[i, j, y:y + rng.integers(3, h - y), x:x + rng.integers(3, w - x)] = 1
    lengths = rng.integers(3, length + 1, b)
    padding = (np.arange(length)[None] >= lengths[:, None]).astype(np.int32)
    weight = np.ones((b,), np.float32)
    weight[-1] = 0.0  # a padding example
    batches.append(dict(
        image=rng.standard_normal((b, h, w, 3)).astype(np.float32),
        image_mini=rng.standard_normal((b, hm, wm, 3)).astype(np.float32),
        text_ids=np.where(padding == 1, 1, rng.integers(3, 200, (b, length))).astype(np.int32),
        text_padding_mask=padding, gt_masks=masks,
        gt_valid=np.arange(k)[None] < num_targets[:, None],
        exists=(num_targets > 0).astype(np.int32), weight=weight))
  return batches


def run_steps(config, mesh, params, batches, train_step=None):
  """(per-step losses, final params as host arrays, the final state) on `mesh`; by
  `train_step` (the step of `step.jit_train_step` unless given)."""
  trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  state = state_lib.init_state(trainer, config.train.seed, params=params)
  train_step = train_step or step_lib.jit_train_step(trainer)
  rows = S.process_rows(config.data.batch_size, mesh)
  losses = []
  for batch in batches:
    local = {k: v[rows] for k, v in batch.items()}
    with jax.transfer_guard("disallow"):
      state, metrics = train_step(state, S.global_batch(local, mesh))
    losses.append(float(jax.device_get(metrics["loss"])))
  final = multihost_utils.process_allgather(state.params, tiled=True)
  return losses, final, state


def _flat(tree):
  return {k: np.asarray(v) for k, v in trees.named_leaves(tree).items()}


def _assert_same(got_losses, got_params, want_losses, want_params, what):
  np.testing.assert_allclose(got_losses, want_losses, rtol=RTOL, err_msg=f"{what}: losses")
  got, want = _flat(got_params), _flat(want_params)
  assert got.keys() == want.keys()
  worst = max(np.max(np.abs(got[k] - want[k]) / (np.abs(want[k]) + 1e-3)) for k in want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=1e-7,
                               err_msg=f"{what}: parameter {name} (worst rel. {worst:.2e})")


# ----------------------------------------------------------------------------------------------
# Tests (pytest process, 8 fake devices).


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Parameters, batches and the single-device run every other run is compared with.

  Its step is `step.Precompile`'s, compiled afresh (an empty jax cache) so that
  `executable_cache` writes it: `test_the_step_read_back_from_disk_takes_the_same_steps`
  reads it back."""
  config = micro_config()
  params = host_params(config)
  batches = host_batches(config, NUM_STEPS)
  mesh = S.make_mesh(config.mesh, devices=jax.devices()[:1])
  trainer = state_lib.make_trainer(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  batch = batch_lib.abstract(config.data, config.data.batch_size, S.batch_sharding(mesh))
  with fresh_jax_cache(tmp_path_factory.mktemp("xla")) as cache_dir:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(executable_cache, "_in_memory", collections.OrderedDict())
      precompile = step_lib.Precompile(trainer, batch)
      losses, final, _ = run_steps(config, mesh, params, batches, train_step=precompile.wait())
  return dict(params=params, batches=batches, losses=losses, final=final,
              config=config, mesh=mesh, trainer=trainer, batch=batch,
              executables=cache_dir / executable_cache.SUBDIRECTORY, origin=precompile.origin)


def test_single_device_steps_update_the_trainable_parameters(reference):
  ref = reference
  assert all(np.isfinite(ref["losses"]))
  moved = [np.max(np.abs(a - b)) for a, b in zip(_flat(ref["final"]).values(),
                                                 _flat(ref["params"]).values())]
  assert max(moved) > 1e-5  # the steps changed the trainable parameters
  swin = [v for k, v in _flat(ref["final"]).items() if k.startswith("swin.")]
  swin0 = [v for k, v in _flat(ref["params"]).items() if k.startswith("swin.")]
  assert all(np.array_equal(a, b) for a, b in zip(swin, swin0))  # frozen


@pytest.mark.parametrize("mesh_shape", MESHES, ids=[f"data{d}_fsdp{f}" for d, f in MESHES])
def test_sharded_step_equals_single_device(reference, mesh_shape):
  ref = reference
  config = micro_config(*mesh_shape)
  mesh = S.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": mesh_shape[0], "fsdp": mesh_shape[1]}
  losses, final, state = run_steps(config, mesh, ref["params"], ref["batches"])
  _assert_same(losses, final, ref["losses"], ref["final"], f"mesh {mesh_shape}")
  specs = _param_specs(state)
  if mesh_shape[1] > 1:  # fsdp shards parameters, and each moment like its parameter
    _assert_fsdp_specs(specs, _moment_specs(state))
  else:
    assert all(all(a is None for a in s) for s in specs.values())


def _param_specs(state) -> dict:
  """Each parameter's PartitionSpec, as a tuple of axis names (or None) per dimension."""
  return {k: tuple(v.sharding.spec) for k, v in trees.named_leaves(state.params).items()}


def _moment_specs(state) -> dict:
  """Each Adam first moment's PartitionSpec, keyed by its parameter's name."""
  return {name.split(".mu.", 1)[1]: tuple(leaf.sharding.spec)
          for name, leaf in trees.named_leaves(state.opt_state).items() if ".mu." in name}


def _assert_fsdp_specs(param_specs: dict, moment_specs: dict) -> None:
  assert any("fsdp" in str(s) for s in param_specs.values())
  assert moment_specs and moment_specs.keys() <= param_specs.keys()  # frozen ones have none
  for name, spec in moment_specs.items():
    assert tuple(spec) == tuple(param_specs[name]), name


def test_the_step_read_back_from_disk_takes_the_same_steps(reference, monkeypatch):
  # What a warm start runs: step.Precompile's executable, compiled afresh and written by
  # executable_cache (the reference run's), then read back (not traced) by the next
  # Precompile, takes the same steps as the compiled one, bit for bit.
  assert reference["origin"] == "compiled"
  assert len(list(reference["executables"].glob("train_step-*"))) == 1
  monkeypatch.setattr(executable_cache, "directory", lambda: reference["executables"])
  monkeypatch.setattr(executable_cache, "_in_memory", collections.OrderedDict())  # a new process
  again = step_lib.Precompile(reference["trainer"], reference["batch"])
  loaded = again.wait()
  assert again.origin == "disk"
  losses, final, _ = run_steps(reference["config"], reference["mesh"], reference["params"],
                               reference["batches"], train_step=loaded)
  assert losses == reference["losses"]
  want = _flat(reference["final"])
  for name, got in _flat(final).items():
    np.testing.assert_array_equal(got, want[name], err_msg=name)


def _specs_from_json(specs: dict) -> dict:
  return {k: tuple(tuple(a) if isinstance(a, list) else a for a in v) for k, v in specs.items()}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # a subprocess or several processes
def test_two_processes_equal_one(reference, tmp_path):
  ref = reference
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags.with_device_count(4)  # conftest's flags, 4 devices
  env["PYTHONPATH"] = str(ROOT)
  env["JAX_PLATFORMS"] = "cpu"
  env["DERIS_JAX_CACHE"] = jax.config.jax_compilation_cache_dir
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), str(port),
                             str(tmp_path / f"out{i}")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  for i in range(2):
    result = json.loads((tmp_path / f"out{i}.json").read_text())
    assert result["process_count"] == 2 and result["devices"] == 8
    assert result["local_devices"] == 4 and result["mesh"] == {"data": 4, "fsdp": 2}
    with np.load(tmp_path / f"out{i}.npz") as data:
      final = {k: data[k] for k in data.files}
    want = _flat(ref["final"])
    _assert_fsdp_specs(_specs_from_json(result["param_specs"]),
                       _specs_from_json(result["moment_specs"]))
    np.testing.assert_allclose(result["losses"], ref["losses"], rtol=RTOL,
                               err_msg=f"process {i}: losses")
    for name in want:
      np.testing.assert_allclose(final[name], want[name], rtol=RTOL, atol=1e-7,
                                 err_msg=f"process {i}: parameter {name}")


# ----------------------------------------------------------------------------------------------
# One process of the multi-host run.


def worker(process_id: int, port: int, out_prefix: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_compilation_cache_dir", os.environ["DERIS_JAX_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  config = micro_config(4, 2)
  mesh = S.make_mesh(config.mesh)
  params = host_params(config)
  batches = host_batches(config, NUM_STEPS)
  losses, final, state = run_steps(config, mesh, params, batches)
  pathlib.Path(out_prefix + ".json").write_text(json.dumps(dict(
      losses=losses, process_count=jax.process_count(), devices=jax.device_count(),
      local_devices=jax.local_device_count(), mesh=dict(mesh.shape),
      param_specs=_param_specs(state), moment_specs=_moment_specs(state))))
  np.savez(out_prefix + ".npz", **_flat(final))
  jax.distributed.shutdown()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
  worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

