"""The TensorFlow boundary: the model, the forward, training, evaluation and bench.py import
without TensorFlow; only reading a dataset (deris_jax.data.pipeline and the builders) needs it.
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

TF_FREE_MODULES = ("deris_jax.models.deris", "deris_jax.forward", "deris_jax.inference",
                   "deris_jax.train.step", "deris_jax.train.loop", "deris_jax.evaluation",
                   "deris_jax.train.dry_run", "deris_jax.predictor", "bench", "train", "predict",
                   "demo")

# Run in a fresh interpreter: other tests of the session import TensorFlow.
_CHECK = f"""
import importlib, sys
for name in {TF_FREE_MODULES!r}:
  importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets'))
print(' '.join(loaded[:5]))
"""


@pytest.mark.slow  # a subprocess or several processes
def test_training_and_evaluation_import_without_tensorflow():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "", f"TensorFlow imported: {proc.stdout.strip()}"
