"""The evaluation loop (deris_jax/evaluation.py) on the tiny synthetic set with a fake model.

FakeDeris (tests/eval_helpers.py) compiles in about a second, so these tests exercise the
loop itself: sharding over 8 devices, padding, query_SA groups, hosts, the tau sweep and the
two resolutions. The real model runs end to end in test_eval_cli.py.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deris_jax import evaluation, inference, metrics
from deris_jax import records as records_lib
from deris_jax.data import pipeline
from tests import eval_helpers as H

SPLIT_SIZE = 24  # the tiny synthetic val split


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return H.prepare_synthetic(tmp_path_factory.mktemp("eval_loop"))


@pytest.fixture(scope="module")
def one_device():
  return Mesh(np.asarray(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def sweep_run(data_dir, tmp_path_factory):
  """The baseline: 8 devices, eval batch 10 -> 16 (24 = 16 + 8 real + 8 padding), tau 0.5
  and the whole tau grid."""
  config = H.fake_config(data_dir, batch_size=10)
  return _run(H.FakeDeris(), config, tmp_path_factory.mktemp("sweep"), "sweep",
              score_threshold=0.5, tau_sweep=True)


def _run(model, config, tmp_path, name, **kwargs):
  path = tmp_path / f"{name}.jsonl"
  results = evaluation.evaluate(model, config, "val", per_sample_path=str(path), **kwargs)
  with open(path) as f:
    lines = [json.loads(line) for line in f]
  return results, lines


def _val_batches(config):
  """The val split as one host-side batch (real rows only), straight from the pipeline."""
  pipe = pipeline.make_pipeline(config.data, "val", train=False, batch_size=SPLIT_SIZE,
                                process_index=0, process_count=1)
  (batch,) = list(pipeline.as_numpy(pipe.dataset))
  assert batch["weight"].all()
  return batch


# ------------------------------------------------------------------------------------------
# Devices, padding, hosts: every sample counted exactly once, results independent of them.
# ------------------------------------------------------------------------------------------
def test_eight_devices_with_padding_equal_one_device(data_dir, one_device, sweep_run,
                                                     tmp_path):
  assert jax.device_count() == 8
  sharded, sharded_lines = sweep_run
  config = H.fake_config(data_dir, batch_size=10)  # one device: 24 = 10 + 10 + 4 real + 6 pads
  single, single_lines = _run(H.FakeDeris(), config, tmp_path, "single", mesh=one_device,
                              score_threshold=0.5, tau_sweep=True)
  assert sharded["protocol"]["eval_batch_size"] == 16 and sharded["protocol"]["devices"] == 8
  assert single["protocol"]["eval_batch_size"] == 10 and single["protocol"]["devices"] == 1
  assert sharded["num_samples"] == single["num_samples"] == SPLIT_SIZE
  assert sharded["metrics"] == single["metrics"]
  assert sharded["tau_sweep"] == single["tau_sweep"]
  assert sharded_lines == single_lines
  index = pipeline.open_split(config.data, "val")[1]
  ids = [line["example_id"] for line in sharded_lines]
  assert ids == [index.example_id(row) for row in range(SPLIT_SIZE)]  # each once, in order
  assert [line["expression"] for line in sharded_lines] == [e[0] for e in index.expressions]


def test_two_hosts_merged_equal_one_pass(data_dir, one_device, sweep_run):
  config = H.fake_config(data_dir, batch_size=10)  # 5 per host: 12 rows + 3 pads each
  settings = evaluation.settings_from_config(config, score_threshold=0.5, tau_sweep=True)
  graphdef, state = nnx.split(H.FakeDeris())
  hosts = [evaluation.evaluate_local(graphdef, state, config, "val", settings, mesh=one_device,
                                     process_index=p, process_count=2) for p in range(2)]
  # Global batches of 10 in file order, 5 rows per host: rows 0-4, 10-14, 20-23 + 1 padding
  # row on host 0; rows 5-9, 15-19 and 5 padding rows on host 1.
  assert [h.num_examples for h in hosts] == [14, 10]
  assert [len(h.records["example_id"]) for h in hosts] == [15, 15]
  assert [int((h.records["example_id"] == -1).sum()) for h in hosts] == [1, 5]
  np.testing.assert_array_equal(hosts[1].records["example_id"][:5] % 10**9, np.arange(5, 10))
  merged, records = records_lib.combine(hosts, settings, split="val",
                                       expected_samples=SPLIT_SIZE)
  single, single_lines = sweep_run
  assert merged["metrics"] == single["metrics"] and merged["tau_sweep"] == single["tau_sweep"]
  for name in ("example_id", "intersection", "pred_area", "gt_area"):
    np.testing.assert_array_equal(records[name], [line[name] for line in single_lines])
  np.testing.assert_array_equal(records["pred_no_target"],
                                [line["no_target_predicted"] for line in single_lines])
  with pytest.raises(RuntimeError, match="counted 14 samples, the split has 24"):
    records_lib.combine(hosts[:1], settings, split="val", expected_samples=SPLIT_SIZE)


def test_allgather_is_bit_exact_for_64_bit_values():
  state = {"count": np.asarray([2**40 + 1, -3], np.int64), "sum": np.asarray(1 / 3),
           "flags": np.asarray([True, False])}

  def through_jax(raw):  # what process_allgather does: jax arrays (x64 off), two hosts
    return np.stack([np.asarray(jnp.asarray(raw))] * 2)

  gathered = records_lib.allgather_exact(state, gather=through_jax)
  for name, value in state.items():
    assert gathered[name].dtype == value.dtype
    np.testing.assert_array_equal(gathered[name], np.stack([value, value]))
  assert np.asarray(jnp.asarray(state["count"])).dtype != np.int64  # what it protects against


# ------------------------------------------------------------------------------------------
# query_SA groups: the last incomplete group runs alone, as the official last batch does.
# ------------------------------------------------------------------------------------------
def test_incomplete_last_group_is_not_mixed_with_padding(data_dir, tmp_path):
  group = 5  # 24 = 4 groups of 5 + 4; eval batch lcm(5, 8) = 40 -> 16 padding rows
  config = H.fake_config(data_dir, group=group, batch_size=8)
  # Parameters FSDP-sharded on a trainer-like 2-axis mesh: kept as they are for the batches,
  # gathered to one device for the last group.
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  graphdef, state = nnx.split(H.FakeDeris(group=group))
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec("fsdp")))
  model = nnx.merge(graphdef, state)
  assert not model.offsets[...].sharding.is_fully_replicated
  results, lines = _run(model, config, tmp_path, "groups", mesh=mesh, score_threshold=0.3)
  assert results["protocol"]["eval_batch_size"] == 40
  assert results["protocol"]["compat_group_size"] == group
  batch = _val_batches(config)
  offsets = np.asarray(model.offsets[...])
  args = (batch["image"], batch["text_ids"], batch["text_padding_mask"], offsets)
  # Official grouping: 0-4, 5-9, ..., 15-19, then the last 4 samples as a group of their own.
  full = H.fake_outputs(*(a[:20] for a in args[:3]), offsets, group, np)
  tail = H.fake_outputs(*(a[20:] for a in args[:3]), offsets, group, np)
  logits = np.concatenate([full["refer_logits"], tail["refer_logits"]])  # (24, N, 2)
  want = np.asarray(jax.nn.softmax(logits, axis=-1)[..., 0])
  got = np.asarray([line["scores"] for line in lines])
  np.testing.assert_allclose(got, want, atol=2e-6)
  # Mixed with the padding rows of its batch, the last group would have other scores.
  pad = lambda a: np.concatenate([a[20:], np.zeros((1,) + a.shape[1:], a.dtype)])
  mixed = H.fake_outputs(*(pad(a) for a in args[:3]), offsets, group, np)["refer_logits"][:4]
  change = np.abs(np.asarray(jax.nn.softmax(mixed, -1)[..., 0]) - want[20:])  # (4, N)
  assert change.max(axis=1).min() > 1e-3


def test_groups_are_the_file_order_on_any_number_of_hosts(data_dir, one_device):
  """Two hosts (5 rows of each global batch of 10 = one group each): the official groups."""
  group = 5
  config = H.fake_config(data_dir, group=group, batch_size=8)
  settings = evaluation.settings_from_config(config, score_threshold=0.3)
  model = H.FakeDeris(group=group)
  graphdef, state = nnx.split(model)
  hosts = [evaluation.evaluate_local(graphdef, state, config, "val", settings, mesh=one_device,
                                     process_index=p, process_count=2) for p in range(2)]
  _, records = records_lib.combine(hosts, settings, split="val", expected_samples=SPLIT_SIZE)
  batch = _val_batches(config)
  offsets = np.asarray(model.offsets[...])
  args = (batch["image"], batch["text_ids"], batch["text_padding_mask"])
  full = H.fake_outputs(*(a[:20] for a in args), offsets, group, np)
  tail = H.fake_outputs(*(a[20:] for a in args), offsets, group, np)
  logits = np.concatenate([full["refer_logits"], tail["refer_logits"]])  # (24, N, 2)
  np.testing.assert_allclose(records["scores"], jax.nn.softmax(logits, axis=-1)[..., 0],
                             atol=2e-6)
  np.testing.assert_array_equal(records["example_id"] % 10**9, np.arange(SPLIT_SIZE))


def test_group_size_rounds_the_eval_batch():
  assert evaluation.global_eval_batch(16, 16, 1, 8) == 16
  assert evaluation.global_eval_batch(10, 1, 1, 8) == 16
  assert evaluation.global_eval_batch(16, 16, 2, 8) == 32  # each host a whole group
  assert evaluation.global_eval_batch(1, 1, 1, 1) == 1
  assert evaluation.global_eval_batch(33, 16, 1, 64) == 64


# ------------------------------------------------------------------------------------------
# Metrics: device counts vs the host implementation, the tau sweep, the per-sample file.
# ------------------------------------------------------------------------------------------
def test_device_counts_equal_host_tau_sweep(data_dir, sweep_run):
  """evaluate's on-device counting vs metrics.TauSweep on host-side masks and scores."""
  results, _ = sweep_run
  config = H.fake_config(data_dir)
  batch = _val_batches(config)
  out = H.fake_outputs(batch["image"], batch["text_ids"], batch["text_padding_mask"],
                       np.asarray(H.FakeDeris().offsets[...]), 1, np)
  scores = np.asarray(jax.nn.softmax(out["refer_logits"], axis=-1)[..., 0])  # (B, N)
  query_masks = np.asarray(jax.nn.sigmoid(out["pred_masks"])) >= 0.5  # (B, N, H, W)
  host = metrics.TauSweep(tuple(config.eval.tau_grid), "gres")
  host.update(scores, query_masks, batch["gt_masks"].max(axis=1).astype(bool),
              batch["exists"] == 0)
  for tau, values in host.result().items():
    assert results["tau_sweep"][tau] == pytest.approx(values, rel=1e-12, nan_ok=True), tau
  # Not all taus give the same numbers: the sweep is informative on this data.
  assert len({json.dumps(v) for v in results["tau_sweep"].values()}) >= 4


def test_tau_sweep_equals_separate_runs(data_dir, sweep_run, tmp_path):
  sweep, sweep_lines = sweep_run
  config = H.fake_config(data_dir, batch_size=10)
  for tau in (0.3, 0.8):
    separate, _ = _run(H.FakeDeris(), config, tmp_path, f"tau{tau}", score_threshold=tau)
    assert separate["score_threshold"] == tau and "tau_sweep" not in separate
    assert sweep["tau_sweep"][tau] == separate["metrics"], tau
  assert sweep["metrics"] == sweep["tau_sweep"][0.5]
  assert sweep["tau_sweep"][0.3] != sweep["tau_sweep"][0.8]
  assert all(line["score_threshold"] == 0.5 for line in sweep_lines)


def test_per_sample_records_add_up_to_the_metrics(sweep_run):
  results, lines = sweep_run
  recount = metrics.GRESMetrics()
  recount.update_counts(*(np.asarray([l[k] for l in lines]) for k in
                          ("intersection", "pred_area", "gt_area")),
                        np.asarray([l["no_target_predicted"] for l in lines]),
                        np.asarray([l["no_target_true"] for l in lines]))
  assert recount.result() == results["metrics"]
  assert 100 * np.mean([l["iou"] for l in lines]) == pytest.approx(results["metrics"]["gIoU"],
                                                                   rel=1e-12)
  for line in lines:
    assert line["union"] == line["pred_area"] + line["gt_area"] - line["intersection"]
    assert line["no_target_predicted"] == (max(line["scores"]) <= 0.5)
    assert line["selected_queries"] == [q for q, s in enumerate(line["scores"]) if s > 0.5]
    assert line["no_target_true"] == (line["num_targets"] == 0)
  # Both kinds of samples and decisions occur, so every GRES rule is exercised.
  assert {(l["no_target_true"], l["no_target_predicted"]) for l in lines} == {
      (True, True), (True, False), (False, True), (False, False)}


def test_ris_task_on_the_same_data(data_dir, tmp_path):
  config = H.fake_config(data_dir)
  config.eval.task = "ris"
  results, lines = _run(H.FakeDeris(), config, tmp_path, "ris", score_threshold=0.4)
  assert list(results["metrics"]) == ["mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8",
                                      "Pr@0.9"]
  recount = metrics.RISMetrics()
  recount.update_counts(*(np.asarray([l[k] for l in lines]) for k in
                          ("intersection", "pred_area", "gt_area")))
  assert recount.result() == results["metrics"]


def test_existence_veto_empties_the_vetoed_samples(data_dir, tmp_path):
  config = H.fake_config(data_dir)
  config.model.existence_veto = True
  _, lines = _run(H.FakeDeris(), config, tmp_path, "veto", score_threshold=0.3)
  vetoed = [l for l in lines if l["existence_prob"] < 0.5]
  assert vetoed and len(vetoed) < len(lines)
  assert all(l["no_target_predicted"] and l["pred_area"] == 0 for l in vetoed)
  assert any(l["pred_area"] > 0 for l in lines if l["existence_prob"] >= 0.5)


# ------------------------------------------------------------------------------------------
# Resolutions.
# ------------------------------------------------------------------------------------------
def test_original_equals_reference_when_sizes_are_equal(data_dir, sweep_run, tmp_path):
  """The synthetic images are 32x32 and the fake model's input too: both resolutions agree."""
  ref, ref_lines = sweep_run
  config = H.fake_config(data_dir, batch_size=10)
  orig, orig_lines = _run(H.FakeDeris(), config, tmp_path, "orig", score_threshold=0.5,
                          resolution="original")
  assert (ref["resolution"], orig["resolution"]) == ("reference", "original")
  assert ref["metrics"] == orig["metrics"]
  strip = lambda lines: [{k: v for k, v in l.items() if k != "resolution"} for l in lines]
  assert strip(ref_lines) == strip(orig_lines)
  assert any(l["intersection"] > 0 for l in ref_lines)


def test_two_resolutions_on_a_known_case():
  """One sample, 4x4 model output; the original image is 8x6 on a 10x10 canvas.

  Query 0 (score 0.88) has logit +5 on the left two columns and -5 on the right two; query 1
  (score 0.12) covers everything. At tau 0.5 only query 0 is selected:
    reference: mask = left 2 columns of 4x4 (8 px); GT = top-left 2x2 -> I 4, U 8.
    original: bilinear 4 -> 6 columns gives logits +5, +5, +3.33, -3.33, -5, -5, so the mask
      is the left 3 columns of 8x6 (24 px); GT = top 4 rows, left 2 columns (8 px) -> I 8,
      U 24; nothing outside the 8x6 image counts.
  """
  pred = np.full((1, 2, 4, 4), -5.0, np.float32)
  pred[0, 0, :, :2] = 5.0
  pred[0, 1] = 5.0
  refer = np.asarray([[[1.0, -1.0], [-1.0, 1.0]]], np.float32)  # scores 0.881, 0.119
  existence = np.zeros((1, 1), np.float32)
  gt_ref = np.zeros((1, 4, 4), np.uint8)
  gt_ref[0, :2, :2] = 1
  gt_orig = np.zeros((1, 10, 10), np.uint8)
  gt_orig[0, :4, :2] = 1
  base = dict(task="gres", tau_grid=(), mask_threshold=0.5, batch_size=1, group_size=1,
              existence_veto=False, existence_threshold=0.5)
  outputs = (pred, refer, existence)
  ref = inference.sample_counts(outputs, {"gt_mask": gt_ref}, **evaluation.EvalSettings(
      score_threshold=0.5, resolution="reference", **base).device_args())
  orig = inference.sample_counts(
      outputs, {"gt_mask_orig": gt_orig, "orig_hw": np.asarray([[8, 6]], np.int32)},
      **evaluation.EvalSettings(score_threshold=0.5, resolution="original", **base).device_args())
  got = lambda c: tuple(int(np.asarray(c[k]).ravel()[0])
                        for k in ("intersection", "pred_area", "gt_area"))
  assert got(ref) == (4, 8, 4)
  assert got(orig) == (8, 24, 8)
  # At tau 0.1 both queries are selected: the union is the whole image in each resolution.
  low = lambda r, targets: inference.sample_counts(outputs, targets, **evaluation.EvalSettings(
      score_threshold=0.1, resolution=r, **base).device_args())
  assert got(low("reference", {"gt_mask": gt_ref})) == (4, 16, 4)
  assert got(low("original", {"gt_mask_orig": gt_orig,
                              "orig_hw": np.asarray([[8, 6]], np.int32)})) == (8, 48, 8)


# ------------------------------------------------------------------------------------------
# Configuration errors name the field.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, kwargs, message", [
    (lambda c: c.__delattr__("eval"), {}, "no 'eval' section"),
    (lambda c: None, {"resolution": "native"}, "resolution 'native'"),
    (lambda c: None, {"score_threshold": 1.0}, "score threshold 1.0"),
    (lambda c: setattr(c.eval, "task", "det"), {}, "eval.task 'det'"),
    (lambda c: setattr(c.data, "image_size", (64, 64)), {}, "data.image_size"),
    (lambda c: setattr(c.data, "max_tokens", 20), {}, "data.max_tokens 20"),
    (lambda c: setattr(c.eval, "tau_grid", ()), {"tau_sweep": True}, "eval.tau_grid is empty"),
])
def test_settings_errors_name_the_field(change, kwargs, message):
  config = H.fake_config("/nonexistent")
  change(config)
  with pytest.raises(ValueError, match=message):
    evaluation.settings_from_config(config, **kwargs)
