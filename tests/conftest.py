"""Shared pytest set-up: 8 fake CPU devices, a compilation cache, the official fixtures, and the
number of parallel workers (pytest-xdist).

The XLA flag must be set before jax is imported anywhere, so it lives at the very top of
this file (pytest imports conftest.py before any test module).
"""
import os

# 8 fake CPU devices for sharding tests. Tests compile many small programs and run each a few
# times, so LLVM's optimisations cost more than they save: level 0 cuts compile time ~30%
# (semantics unchanged; the parity checks pass the same).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The xdist workers (started after this file is imported) and the commands tests start load
# tcmalloc where it is installed, as the commands do (deris_jax/malloc.py): the suite is mostly
# XLA compiles, which spend a good part of their time in malloc. This process keeps its own
# allocator (with `-n 0` the tests run in it, without tcmalloc unless the user preloads it).
from deris_jax import malloc  # noqa: E402

malloc.preload_for_children()

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402

from deris_jax import cli  # noqa: E402
from tests import eval_helpers  # noqa: E402
from tests import fixture_values  # noqa: E402
from tests.jax_caches import fresh_jax_cache  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = fixture_values.FIXTURES  # $DERIS_FIXTURES, default ../shared/fixtures

# The suite's own compilation cache; commands started by tests inherit it through the
# environment (deris_jax.compile_cache), so no test writes to the user's cache. Every program
# is written, however short its compile: the suite compiles the same small programs in both
# workers, in the commands it starts and in tests that jit afresh, and reading them back costs
# less than compiling them (clean runs on 2 cores, measured 2026-12-06: 8 min 40 s with the
# programs that compile in under 1 s left out, 7 min 57 s with all of them written and
# parity's single-sample forwards sharing one program).
_cache_dir = os.environ.setdefault("DERIS_JAX_CACHE", str(ROOT / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# Parallel runs: pytest.ini asks for `-n auto --dist loadfile` (files handed out in the order
# of LONGEST_FILES_FIRST below), so each test module runs whole on one worker and builds its
# module-scoped fixtures (compiled programs, prepared data) once; the workers share the
# compilation cache. `-n 0` runs everything in this process. (Not `loadgroup`:
# pytest-xdist 3.8 groups by renaming node ids, which pytest 9 no longer lets a plugin do.)
MAX_WORKERS = 4  # each worker holds its own JAX, TensorFlow and compiled programs in memory


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
  """`-n auto`: one worker per core this process may use, at most MAX_WORKERS."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cores or 1, MAX_WORKERS))


# The test files that take longest on a clean cache (2 workers, 2 cores; measured 2026-12-06,
# seconds): xdist hands files out in collection order (pytest.ini: --no-loadscope-reorder), so
# these go first and the many short files fill in at the end, instead of one long file running
# alone at the end. test_train_sharding follows test_train_loop, whose (8, 1) micro step it
# reads back from the shared compilation cache instead of compiling it at the same time.
LONGEST_FILES_FIRST = (
    "test_train_loop.py",  # 130
    "test_stack_layout.py",  # 110
    "test_train_sharding.py",  # 124
    "test_parity.py",  # 79
    "test_dry_run.py",  # 70
    "test_grefcoco_recipe.py",  # 53
    "test_scan.py",  # 51
    "test_model_options.py",  # 31
    "test_eval_cli.py",  # 29
    "test_train_state.py",  # 22
    "test_pretrained.py",  # 22
)


def pytest_collection_modifyitems(items):
  """The files of LONGEST_FILES_FIRST first, in that order; the rest keep collection order."""
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def pytest_collection_finish(session):
  """Python's collector tuned as the commands tune it (`cli.tune_gc`), once every test module
  is imported: tracing the tests' programs sets off far fewer full collections of a heap that
  holds TensorFlow, JAX and the compiled programs."""
  del session
  cli.tune_gc()


@pytest.fixture
def fresh_compilation_cache(tmp_path):
  """`fresh_jax_cache` in tmp_path / "xla" for one test."""
  with fresh_jax_cache(tmp_path / "xla") as directory:
    yield directory


@pytest.fixture(scope="session")
def fixtures_root() -> pathlib.Path:
  if not FIXTURES.is_dir():
    pytest.fail(f"fixtures not found at {FIXTURES} (set DERIS_FIXTURES)")
  return FIXTURES


@pytest.fixture(scope="session")
def tiny_dir(fixtures_root) -> pathlib.Path:
  return fixtures_root / "deris_tiny"


@pytest.fixture(scope="session")
def tiny_inputs(tiny_dir) -> dict:
  with np.load(tiny_dir / "inputs.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def tiny_outputs(tiny_dir) -> dict:
  with np.load(tiny_dir / "outputs.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def tiny_state_dict(tiny_dir) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(tiny_dir / "state_dict.safetensors"))


@pytest.fixture(scope="session")
def predict_setup(tmp_path_factory, tiny_state_dict) -> dict:
  """The fixture's tiny DeRIS as a training run leaves it (its config stored in the
  checkpoint), the tiny synthetic set it reads its tokenizer from, a config file naming both,
  and a JPEG, a PNG and a corrupt file to predict on; shared by the predictor, predict.py and
  demo tests so that the predictor's programs compile once per run (once per pytest-xdist
  worker that runs one of them)."""
  root = tmp_path_factory.mktemp("predict")
  data_dir = eval_helpers.prepare_synthetic(root)
  config = eval_helpers.tiny_config(data_dir)
  rng = np.random.default_rng(0)
  jpeg = root / "street.jpg"
  PIL.Image.fromarray(rng.integers(0, 256, (37, 61, 3), np.uint8)).save(jpeg, quality=90)
  png = root / "shapes.png"
  PIL.Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(png)
  corrupt = root / "corrupt.jpg"
  corrupt.write_bytes(jpeg.read_bytes()[:200])
  return {"config": eval_helpers.write_config_file(root / "tiny_synthetic.py", data_dir),
          "checkpoint": eval_helpers.write_train_like_checkpoint(root / "ckpt", tiny_state_dict,
                                                                 config),
          "config_dict": config, "root": root, "jpeg": str(jpeg), "png": str(png),
          "corrupt": str(corrupt)}


@pytest.fixture(scope="session")
def fixture_config_file(tmp_path_factory) -> str:
  """A config file of the fixture's own model (config.json), for the command lines."""
  return fixture_values.write_config_file(tmp_path_factory.mktemp("config") / "fixture_model.py")
