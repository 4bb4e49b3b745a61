"""The whole DeRIS forward against the official fixture, and the reference_compat switch."""
import numpy as np
import pytest
from flax import nnx
import jax
import jax.numpy as jnp

from deris_jax import forward
from deris_jax.parity import check


@pytest.fixture(scope="session")
def fixture(tiny_dir):
  return check.load_fixture(tiny_dir)


@pytest.fixture(scope="session", params=[False, True], ids=["loop", "scan"])
def parity_result(fixture, request):
  """The parity run with the repeated stacks looped and scanned (`model.scan_layers`: the
  scanned program's per-layer taps are compared too)."""
  config = fixture.model_config.copy_and_resolve_references()
  config.scan_layers = request.param
  return check.run_parity(fixture, model_config=config)


def test_every_model_tensor_matches(parity_result, fixture):
  comparisons, skipped = parity_result
  failed = [(c.name, c.max_abs, c.note) for c in comparisons if not c.passed]
  assert not failed
  # Every tensor of the fixture is compared (forward, rounds, batch-of-1, post-processing,
  # matches and loss values on the fixture's targets) or skipped for a listed reason (the
  # random points, the box and constant loss terms): counted from the fixture's own files.
  assert len(comparisons) + len(skipped) == len(fixture.outputs)
  assert sorted([c.name for c in comparisons] + skipped) == sorted(fixture.outputs)
  unexplained = [n for n in skipped if check.not_produced_reason(n) == "no deris-jax counterpart"]
  assert not unexplained
  assert len(comparisons) > len(skipped)


def test_parity_has_a_margin(parity_result):
  """Float errors stay far below the 1e-4 tolerance (pixel boxes below 2e-2)."""
  comparisons, _ = parity_result
  floats = [c for c in comparisons if c.is_float and not c.name.endswith("boxes_xyxy")]
  assert floats and max(c.max_abs for c in floats) < 2e-5
  boxes = [c for c in comparisons if c.name.endswith("boxes_xyxy")]
  assert all(c.max_abs < 1e-3 for c in boxes)


def test_compare_flags_a_wrong_tensor():
  ref = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
  assert check.compare("x", ref + 5e-5, ref).passed
  assert not check.compare("x", ref + 5e-4, ref).passed
  assert not check.compare("m", np.ones(4, np.uint8), np.array([1, 1, 0, 1], np.uint8)).passed
  assert not check.compare("x", ref[:2], ref).passed


def _outputs(model, inputs, *slices):
  """(refer_logits, pred_masks, existence_logit) of the batch, or a list of them, one per
  slice of it (one jitted program: the slices of one size compile once)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, batch):
    out = forward.apply(graphdef, params, batch)
    return out.refer_logits, out.pred_masks, out.existence_logit

  outputs = [[np.asarray(x) for x in run(params, check.model_inputs(inputs, sl))]
             for sl in (slices or (slice(None),))]
  return outputs if slices else outputs[0]


def test_compat_group_size_one_gives_batch_of_one_values(fixture):
  config = fixture.model_config.copy_and_resolve_references()
  config.compat_group_size = 1
  model = check.build_converted_model(fixture, config)
  logits, _, _ = _outputs(model, fixture.inputs)
  for b in range(2):
    want = fixture.outputs[f"batch1.sample{b}.decoder.round3.refer_logits"][0]
    np.testing.assert_allclose(logits[b], want, atol=1e-5)
  # ... while the batch-of-2 values differ (the quirk is real in the fixture).
  assert np.abs(logits - fixture.outputs["final.refer_logits"]).max() > 1e-3


def test_corrected_model_is_per_sample(fixture):
  config = fixture.model_config.copy_and_resolve_references()
  config.reference_compat = False
  model = check.build_converted_model(fixture, config)
  together, *alone = _outputs(model, fixture.inputs, slice(None), slice(0, 1), slice(1, 2))
  for b in range(2):
    for x, y in zip(together, alone[b]):
      np.testing.assert_allclose(x[b], y[0], atol=2e-5)
  # The corrected model computes something else than the reference one.
  assert np.abs(together[0] - fixture.outputs["final.refer_logits"]).max() > 1e-3


def test_text_position_code(fixture):
  from deris_jax.models.loopback import sine_position_1d
  compat = sine_position_1d(12, 32, reference_compat=True)
  np.testing.assert_allclose(compat, fixture.outputs["decoder.text_pos_embed"][0], atol=1e-6)
  assert np.all(compat[:, 2::2] == 0) and np.all(compat[:, 3::2] == 1)
  proper = sine_position_1d(12, 32, reference_compat=False)
  assert np.abs(proper[:, 2:]).std() > 0.1  # real frequencies on every channel pair


def test_bfloat16_compute_keeps_float32_params(fixture):
  config = fixture.model_config.copy_and_resolve_references()
  config.dtype = "bfloat16"
  model = check.build_converted_model(fixture, config)
  params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits, masks, existence = _outputs(model, fixture.inputs)
  assert logits.dtype == np.float32 and masks.dtype == np.float32
  ref_scores = jax.nn.softmax(fixture.outputs["final.refer_logits"], -1)[..., 0]
  scores = jax.nn.softmax(logits, -1)[..., 0]
  assert np.abs(np.asarray(scores) - np.asarray(ref_scores)).max() < 0.05
  agree = ((masks > 0) == (fixture.outputs["final.pred_masks"] > 0)).mean()
  assert agree > 0.97
