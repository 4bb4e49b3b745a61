"""Host (numpy) and JAX initialisers draw the same distributions; host builds are seeded."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs import deris_tiny
from deris_jax.models import initializers, layers
from deris_jax.models.deris import abstract_model, build_model

SHAPE = (256, 512)


@pytest.mark.parametrize("name,std", [
    ("torch", (1 / 256) ** 0.5 / 3 ** 0.5),  # U(-1/sqrt(fan_in), ..): std = bound/sqrt(3)
    ("xavier", (6 / (256 + 512)) ** 0.5 / 3 ** 0.5),
    ("c2_xavier", (3 / 256) ** 0.5 / 3 ** 0.5),
    ("trunc02", 0.02),
    ("beit_trunc", 0.02 * 0.5396),  # N(0, .02) cut at 1 sigma: std 0.5396 sigma
])
def test_host_and_jax_draw_the_same_distribution(name, std):
  init = layers.KERNEL_INITS[name]
  host = np.asarray(init(initializers.HostKey(0, 1), SHAPE))
  dev = np.asarray(init(jax.random.key(0), SHAPE))
  for x in (host, dev):
    assert x.shape == SHAPE and x.dtype == np.float32
    assert abs(x.mean()) < 3 * std / np.sqrt(x.size) + 1e-7
    np.testing.assert_allclose(x.std(), std, rtol=0.02)
  if name == "beit_trunc":
    assert np.abs(host).max() <= 0.02 and np.abs(dev).max() <= 0.02


def test_host_keys_are_deterministic_and_distinct():
  init = initializers.normal(1.0)
  a = np.asarray(init(initializers.HostKey(3, 7), (100,)))
  np.testing.assert_array_equal(a, np.asarray(init(initializers.HostKey(3, 7), (100,))))
  assert not np.allclose(a, np.asarray(init(initializers.HostKey(3, 8), (100,))))
  assert not np.allclose(a, np.asarray(init(initializers.HostKey(4, 7), (100,))))


def test_build_model_is_seeded_and_matches_the_abstract_model():
  config = deris_tiny.get_config().model
  flat = lambda m: {"/".join(map(str, p)): np.asarray(v.get_value())
                    for p, v in nnx.state(m, nnx.Param).flat_state()}
  a, b, c = flat(build_model(config, 0)), flat(build_model(config, 0)), flat(build_model(config, 1))
  shapes = {"/".join(map(str, p)): tuple(v.get_value().shape)
            for p, v in nnx.state(abstract_model(config), nnx.Param).flat_state()}
  assert {k: v.shape for k, v in a.items()} == shapes
  assert all(np.array_equal(a[k], b[k]) for k in a)
  qkv = "swin/layers/0/blocks/0/attn/qkv/kernel"
  assert not np.allclose(a[qkv], c[qkv])
