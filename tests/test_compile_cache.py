"""deris_jax.compile_cache: where the cache lives, and that a second process reads it."""
import os
import pathlib
import subprocess
import sys

import pytest

from deris_jax import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env, expected", [
    ({"DERIS_JAX_CACHE": "/x/cache"}, "/x/cache"),
    ({"DERIS_JAX_CACHE": "off"}, None),
    ({"XDG_CACHE_HOME": "/y"}, "/y/deris_jax/xla"),
    ({"HOME": "/home/u"}, "/home/u/.cache/deris_jax/xla"),
])
def test_the_directory(monkeypatch, env, expected):
  for name in ("DERIS_JAX_CACHE", "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  got = compile_cache.default_directory()
  assert (None if got is None else str(got)) == expected


_PROGRAM = """
import time, jax, jax.numpy as jnp
from deris_jax import compile_cache
compile_cache.enable(min_compile_seconds=0)
def f(x):
  for k in range(300):  # unfusable steps: a program that takes a while to compile
    x = jnp.tanh(x @ x.T + k)[:, ::-1] * jnp.sort(x, axis=k % 2)
  return x
t0 = time.perf_counter(); jax.jit(f).lower(jnp.ones((16, 16))).compile()
print(time.perf_counter() - t0)
"""


@pytest.mark.slow  # two subprocesses
def test_a_second_process_reads_what_the_first_compiled(tmp_path):
  env = dict(os.environ, DERIS_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  seconds = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", _PROGRAM], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds.append(float(proc.stdout.split()[-1]))
  assert any((tmp_path / "cache").iterdir())  # the first process wrote its program
  assert seconds[1] < seconds[0] / 2, seconds  # the second read it instead of compiling
