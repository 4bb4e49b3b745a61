"""deris_jax.cpu_options: the XLA:CPU options of the train step and the inference forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax import cpu_options
from deris_jax import inference


@pytest.fixture
def fusions_env(monkeypatch):
  def set_to(value):
    if value is None:
      monkeypatch.delenv(cpu_options.ENV, raising=False)
    else:
      monkeypatch.setenv(cpu_options.ENV, value)
  return set_to


def test_options_on_cpu_only_and_switchable(fusions_env):
  fusions_env(None)
  assert cpu_options.compiler_options() == cpu_options.OFF  # the suite runs on the CPU
  fusions_env("off")
  assert cpu_options.compiler_options("cpu") == cpu_options.OFF
  assert cpu_options.compiler_options("gpu") is None
  assert cpu_options.compiler_options("tpu") is None
  fusions_env("on")
  assert cpu_options.compiler_options() is None
  fusions_env("OFF")
  assert cpu_options.compiler_options() == cpu_options.OFF


def test_bad_switch_value_is_named(fusions_env):
  fusions_env("maybe")
  with pytest.raises(ValueError, match="DERIS_JAX_CPU_LIBRARY_FUSIONS='maybe'"):
    cpu_options.compiler_options()


def _dot_program(a, b):
  return jnp.tanh(a @ b).sum(0)  # (N,)


def test_options_take_effect_and_keep_the_numbers(fusions_env):
  """The option is a real DebugOptions field of the pinned XLA (a renamed field would fail the
  compile), it removes every YNNPACK fusion, and the results stay those of the default."""
  fusions_env("off")
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(64, 96)), jnp.float32),
          jnp.asarray(rng.normal(size=(96, 32)), jnp.float32))
  ours = jax.jit(_dot_program, compiler_options=cpu_options.compiler_options()).lower(a, b)
  ours = ours.compile()
  assert "__ynn_fusion" not in ours.as_text()
  default = jax.jit(_dot_program).lower(a, b).compile()
  np.testing.assert_allclose(np.asarray(ours(a, b)), np.asarray(default(a, b)), rtol=1e-5,
                             atol=1e-5)


def test_forward_is_memoised_per_options(fusions_env):
  graphdef = object()  # forward_fn only builds the jitted function; nothing is traced here
  fusions_env("off")
  off = inference.forward_fn(graphdef)
  assert inference.forward_fn(graphdef) is off
  fusions_env("on")
  on = inference.forward_fn(graphdef)
  assert on is not off
  assert inference.forward_fn(graphdef) is on
