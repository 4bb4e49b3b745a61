"""RIS / GRES metrics: hand-computed cases, shard merging, padding, state gathering, tau sweep."""
import jax
import numpy as np
import pytest

from deris_jax import inference, metrics


def _box(shape, rows, cols):
  mask = np.zeros(shape, bool)
  mask[rows, cols] = True
  return mask


# ------------------------------------------------------------------------------------------
# RIS.
# ------------------------------------------------------------------------------------------
def _ris_hand_batch():
  """(pred, gt) for 4 samples on 4x4: perfect, empty prediction, partial, empty union."""
  shape = (4, 4)
  square = _box(shape, slice(0, 2), slice(0, 2))  # 4 px
  wide = _box(shape, slice(0, 2), slice(0, 3))  # 6 px, contains square
  empty = np.zeros(shape, bool)
  pred = np.stack([square, empty, square, empty])
  gt = np.stack([square, square, wide, empty])
  return pred, gt


def test_ris_hand_computed():
  pred, gt = _ris_hand_batch()
  m = metrics.RISMetrics()
  m.update(pred, gt)
  got = m.result()
  # IoU per sample: 1, 0 (I=0, U=4), 4/6, 0 (U=0 < 1). I: 4+0+4+0, U: 4+4+6+0.
  want = {"mIoU": 100 * (1 + 2 / 3) / 4, "oIoU": 100 * 8 / 14, "Pr@0.5": 50.0, "Pr@0.6": 50.0,
          "Pr@0.7": 25.0, "Pr@0.8": 25.0, "Pr@0.9": 25.0}
  assert list(got) == list(want)
  np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-12)
  assert m.num_samples == 4


def test_ris_threshold_is_inclusive():
  # IoU exactly 0.5 (I=2, U=4) and exactly 0.7 (I=7, U=10) count for Pr@0.5 / Pr@0.7.
  pred = np.stack([_box((1, 10), 0, slice(0, 2)), _box((1, 10), 0, slice(0, 7))])
  gt = np.stack([_box((1, 10), 0, slice(0, 4)), _box((1, 10), 0, slice(0, 10))])
  m = metrics.RISMetrics()
  m.update(pred, gt)
  got = m.result()
  assert got["Pr@0.5"] == 100.0 and got["Pr@0.6"] == 50.0 and got["Pr@0.7"] == 50.0
  assert got["Pr@0.8"] == 0.0
  np.testing.assert_allclose(got["mIoU"], 60.0, rtol=1e-12)


def test_ris_errors():
  m = metrics.RISMetrics()
  with pytest.raises(ValueError, match="no samples"):
    m.result()
  with pytest.raises(TypeError, match="pred_masks must be a boolean"):
    m.update(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), bool))
  with pytest.raises(ValueError, match=r"pred_masks \(1, 2, 2\) and gt_masks \(1, 3, 2\)"):
    m.update(np.zeros((1, 2, 2), bool), np.zeros((1, 3, 2), bool))
  with pytest.raises(ValueError, match=r"valid must have shape \(1,\)"):
    m.update(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), bool), valid=np.ones(2, bool))


# ------------------------------------------------------------------------------------------
# GRES.
# ------------------------------------------------------------------------------------------
def _gres_hand_batch():
  """5 samples on 4x4: no-target right, no-target wrong, two-object target perfect,
  target missed (no target predicted), target partial."""
  shape = (4, 4)
  empty = np.zeros(shape, bool)
  two_objects = _box(shape, 0, slice(0, 2)) | _box(shape, 3, slice(2, 4))  # 2 + 2 px
  square = _box(shape, slice(0, 2), slice(0, 2))  # 4 px
  wide = _box(shape, slice(0, 2), slice(0, 3))  # 6 px
  false_alarm = _box(shape, 2, slice(0, 3))  # 3 px
  pred = np.stack([empty, false_alarm, two_objects, empty, square])
  gt = np.stack([empty, empty, two_objects, square, wide])
  pred_nt = np.array([True, False, False, True, False])
  gt_nt = np.array([True, True, False, False, False])
  return pred, gt, pred_nt, gt_nt


def test_gres_hand_computed():
  m = metrics.GRESMetrics()
  m.update(*_gres_hand_batch())
  got = m.result()
  # IoU: 1, 0, 1, 0, 4/6.  I: 0 + 0 + 4 + 0 + 4.  U: 0 + 3 (false alarm area) + 4 + 4 + 6.
  want = {"gIoU": 100 * (2 + 2 / 3) / 5, "cIoU": 100 * 8 / 17, "N-acc": 50.0,
          "T-acc": 100 * 2 / 3, "Pr@0.7": 100 / 3, "Pr@0.8": 100 / 3, "Pr@0.9": 100 / 3}
  assert list(got) == list(want)
  np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-12)
  assert m.num_samples == 5
  # not an official metric: the mean IoU of the 3 target samples (perfect, missed, 4/6)
  assert m.extra_result() == pytest.approx({"mIoU": 100 * (1 + 0 + 4 / 6) / 3}, rel=1e-12)


def test_gres_predicted_no_target_zeroes_intersection():
  # Official rule: a target sample predicted "no target" gets I = 0 even if the mask overlaps;
  # its union still counts.
  mask = _box((4, 4), slice(0, 2), slice(0, 2))[None]
  m = metrics.GRESMetrics()
  m.update(mask, mask, np.array([True]), np.array([False]))
  got = m.result()
  assert got["gIoU"] == 0.0 and got["cIoU"] == 0.0 and got["T-acc"] == 0.0
  assert m.state()["union_sum"] == 4
  assert np.isnan(got["N-acc"])  # no no-target sample: undefined, not 0


def test_gres_only_no_target_correct():
  empty = np.zeros((2, 3, 3), bool)
  m = metrics.GRESMetrics()
  m.update(empty, empty, np.array([True, True]), np.array([True, True]))
  got = m.result()
  assert got["gIoU"] == 100.0 and got["N-acc"] == 100.0
  for key in ("cIoU", "T-acc", "Pr@0.7"):  # sum U = 0 and no target samples
    assert np.isnan(got[key])


# ------------------------------------------------------------------------------------------
# Merging, padding, gathered states.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_batch():
  rng = np.random.default_rng(0)
  batch = 40
  pred = rng.random((batch, 9, 11)) < rng.random((batch, 1, 1))
  gt = rng.random((batch, 9, 11)) < rng.random((batch, 1, 1))
  gt_nt = rng.random(batch) < 0.3
  gt[gt_nt] = False
  pred_nt = rng.random(batch) < 0.3
  pred[pred_nt] = False
  return pred, gt, pred_nt, gt_nt


def _assert_same_state(a, b):
  sa, sb = a.state(), b.state()
  assert sa.keys() == sb.keys()
  for key in sa:
    if sa[key].dtype == np.float64:
      np.testing.assert_allclose(sa[key], sb[key], rtol=1e-13, err_msg=key)
    else:
      np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@pytest.mark.parametrize("kind", ["ris", "gres"])
def test_merged_shards_equal_one_pass(random_batch, kind):
  pred, gt, pred_nt, gt_nt = random_batch
  args = (pred, gt) if kind == "ris" else (pred, gt, pred_nt, gt_nt)
  one_pass = metrics.METRICS[kind]()
  one_pass.update(*args)
  shards = []
  for part in np.split(np.arange(len(pred)), [7, 25]):  # uneven shards
    shard = metrics.METRICS[kind]()
    shard.update(*(a[part] for a in args))
    shards.append(shard)
  merged = metrics.METRICS[kind]().merge(shards[0]).merge(shards[1]).merge(shards[2])
  _assert_same_state(merged, one_pass)
  # An all-gather stacks one state per host on a new leading axis.
  gathered = {k: np.stack([s.state()[k] for s in shards]) for k in one_pass.state()}
  _assert_same_state(metrics.METRICS[kind].from_state(gathered), one_pass)
  for key, value in one_pass.result().items():
    np.testing.assert_allclose(merged.result()[key], value, rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("kind", ["ris", "gres"])
def test_padded_samples_are_ignored(random_batch, kind):
  pred, gt, pred_nt, gt_nt = random_batch
  args = (pred, gt) if kind == "ris" else (pred, gt, pred_nt, gt_nt)
  unpadded = metrics.METRICS[kind]()
  unpadded.update(*(a[:30] for a in args))
  padded = metrics.METRICS[kind]()
  padded.update(*args, valid=np.arange(len(pred)) < 30)  # samples 30.. are padding
  _assert_same_state(padded, unpadded)


def test_from_state_rejects_bad_states():
  state = metrics.RISMetrics().state()
  with pytest.raises(KeyError, match=r"missing keys \['union_sum'\]"):
    metrics.RISMetrics.from_state({k: v for k, v in state.items() if k != "union_sum"})
  downcast = dict(state, iou_sum=state["iou_sum"].astype(np.float32))
  with pytest.raises(TypeError, match=r"state\['iou_sum'\] has dtype float32"):
    metrics.RISMetrics.from_state(downcast)
  with pytest.raises(ValueError, match=r"state\['pr_hits'\] has shape \(3,\)"):
    metrics.RISMetrics.from_state(dict(state, pr_hits=np.zeros(3, np.int64)))
  with pytest.raises(TypeError, match="cannot merge GRESMetrics into RISMetrics"):
    metrics.RISMetrics().merge(metrics.GRESMetrics())


# ------------------------------------------------------------------------------------------
# Tau sweep.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_case():
  rng = np.random.default_rng(1)
  batch, queries, size = 6, 5, 12
  mask_logits = rng.normal(size=(batch, queries, size, size)).astype(np.float32)
  refer_logits = rng.normal(scale=2.0, size=(batch, queries, 2)).astype(np.float32)
  existence_logit = rng.normal(size=(batch, 1)).astype(np.float32)
  gt = rng.random((batch, size, size)) < 0.4
  gt_nt = np.array([False, True, False, True, False, False])
  gt[gt_nt] = False
  scores = np.asarray(inference.refer_scores(refer_logits))
  # A tau equal to one query's float32 score checks the strict '>' in both paths.
  taus = (0.1, 0.5, float(scores[0, 2]), 0.7, 0.9, 0.99)
  return dict(mask_logits=mask_logits, refer_logits=refer_logits,
              existence_logit=existence_logit, gt=gt, gt_nt=gt_nt, taus=taus)


@pytest.mark.parametrize("kind", ["ris", "gres"])
@pytest.mark.parametrize("veto", [False, True])
def test_tau_sweep_equals_separate_runs(sweep_case, kind, veto):
  c = sweep_case
  gres = kind == "gres"
  valid = np.array([True] * 5 + [False])
  predict = jax.jit(inference.predict, static_argnames=("existence_veto",))
  separate = []
  for tau in c["taus"]:
    out = predict(c["mask_logits"], c["refer_logits"], c["existence_logit"],
                  score_threshold=tau, existence_veto=veto)
    acc = metrics.METRICS[kind]()
    extra = (np.asarray(out["no_target"]), c["gt_nt"]) if gres else ()
    acc.update(np.asarray(out["mask"]), c["gt"], *extra, valid=valid)
    separate.append(acc)
  vetoed = None
  if veto:
    vetoed = np.asarray(out["existence_prob"]) < 0.5
    assert vetoed.any() and not vetoed.all()
  gt_nt = c["gt_nt"] if gres else None
  scores = np.asarray(inference.refer_scores(c["refer_logits"]))

  from_queries = metrics.TauSweep(c["taus"], kind)
  binary = np.asarray(inference.query_masks(c["mask_logits"]))
  from_queries.update(scores, binary, c["gt"], gt_nt, valid=valid, veto=vetoed)
  from_map = metrics.TauSweep(c["taus"], kind)
  pixel_scores = np.asarray(inference.score_map(c["mask_logits"], c["refer_logits"]))
  from_map.update_from_score_map(pixel_scores, scores, c["gt"], gt_nt, valid=valid, veto=vetoed)

  for sweep in (from_queries, from_map):
    for acc, want in zip(sweep.accumulators, separate):
      _assert_same_state(acc, want)
  # The grid is not trivial: the metrics change with tau.
  assert len({round(r[list(r)[0]], 9) for r in from_map.result().values()}) >= 3


def test_tau_sweep_merge_and_state(sweep_case):
  c = sweep_case
  scores = np.asarray(inference.refer_scores(c["refer_logits"]))
  binary = np.asarray(inference.query_masks(c["mask_logits"]))
  whole = metrics.TauSweep(c["taus"], "gres")
  whole.update(scores, binary, c["gt"], c["gt_nt"])
  parts = [metrics.TauSweep(c["taus"], "gres") for _ in range(2)]
  for part, rows in zip(parts, (slice(0, 2), slice(2, None))):
    part.update(scores[rows], binary[rows], c["gt"][rows], c["gt_nt"][rows])
  gathered = {k: np.stack([p.state()[k] for p in parts]) for k in whole.state()}
  restored = metrics.TauSweep.from_state(gathered, c["taus"], "gres")
  merged = parts[0].merge(parts[1])
  for sweep in (merged, restored):
    for acc, want in zip(sweep.accumulators, whole.accumulators):
      _assert_same_state(acc, want)
  assert list(whole.result()) == list(c["taus"])


def test_tau_sweep_compares_in_float32():
  # float32(0.8) > 0.8 in float64; the official torch comparison (and predict) is in float32,
  # so a query scoring exactly float32(0.8) does not pass tau = 0.8.
  sweep = metrics.TauSweep([0.8, 0.79], "gres")
  mask = np.ones((1, 1, 2, 2), bool)
  sweep.update(np.array([[np.float32(0.8)]]), mask, mask[:, 0], np.array([False]))
  at_08, at_079 = sweep.result().values()
  assert at_08["T-acc"] == 0.0 and at_079["T-acc"] == 100.0


def test_tau_sweep_errors():
  with pytest.raises(ValueError, match="unknown metric 'iou'"):
    metrics.TauSweep([0.5], "iou")
  with pytest.raises(ValueError, match="distinct"):
    metrics.TauSweep([0.5, 0.5], "ris")
  sweep = metrics.TauSweep([0.5], "ris")
  mask = np.ones((1, 1, 2, 2), bool)
  with pytest.raises(ValueError, match="gt_no_target is required for 'gres' and not accepted"):
    sweep.update(np.ones((1, 1), np.float32), mask, mask[:, 0], np.array([False]))
