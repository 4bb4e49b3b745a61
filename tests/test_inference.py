"""Inference post-processing: official fixture outputs, predict semantics, canvas resizing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax import inference, metrics
from deris_jax.ops import resize


@pytest.fixture(scope="module")
def jit_predict():
  return jax.jit(inference.predict, static_argnames=("existence_veto",))


# ------------------------------------------------------------------------------------------
# Against the official post-processing of the fixture (its own tau and batch size).
# ------------------------------------------------------------------------------------------
def _fixture_tau(tiny_dir) -> float:
  """The score threshold the fixture's post-processing used (its config.json)."""
  config = json.loads((tiny_dir / "config.json").read_text())
  return float(config.get("post_params", {}).get("score_threshold", 0.9))


def test_scores_and_binary_masks_match_official(tiny_outputs):
  scores = inference.refer_scores(tiny_outputs["final.refer_logits"])
  np.testing.assert_allclose(np.asarray(scores), tiny_outputs["final.refer_scores"], atol=1e-6)
  binary = np.asarray(inference.query_masks(tiny_outputs["final.pred_masks"]))
  np.testing.assert_array_equal(binary, tiny_outputs["final.binary_masks"].astype(bool))


def test_predict_matches_official_global_mask(tiny_outputs, tiny_dir, jit_predict):
  tau = _fixture_tau(tiny_dir)
  out = jit_predict(tiny_outputs["final.pred_masks"], tiny_outputs["final.refer_logits"],
                    tiny_outputs["final.pred_existence"], score_threshold=tau)
  batch = tiny_outputs["final.pred_masks"].shape[0]
  for b in range(batch):
    np.testing.assert_array_equal(np.asarray(out["mask"][b]),
                                  tiny_outputs[f"final.sample{b}.global_mask"].astype(bool))
  official_scores = np.stack([tiny_outputs[f"final.sample{b}.scores"] for b in range(batch)])
  np.testing.assert_array_equal(np.asarray(out["no_target"]),
                                ~(official_scores > np.float32(tau)).any(axis=1))
  np.testing.assert_allclose(np.asarray(out["existence_prob"]),
                             tiny_outputs["final.existence_prob"][:, 0], atol=1e-6)


@pytest.mark.parametrize("quantile", [0.5, 0.75])
def test_predict_union_at_lower_tau(tiny_outputs, jit_predict, quantile):
  # The official rule applied to the official scores and binary masks, by numpy, at taus
  # taken from the fixture's own score distribution (so that some queries pass).
  batch = tiny_outputs["final.pred_masks"].shape[0]
  official_scores = np.stack([tiny_outputs[f"final.sample{b}.scores"] for b in range(batch)])
  tau = float(np.quantile(official_scores, quantile))
  binary = tiny_outputs["final.binary_masks"].astype(bool)
  selected = official_scores > np.float32(tau)
  want = (binary & selected[:, :, None, None]).any(axis=1)
  out = jit_predict(tiny_outputs["final.pred_masks"], tiny_outputs["final.refer_logits"],
                    tiny_outputs["final.pred_existence"], score_threshold=tau)
  np.testing.assert_array_equal(np.asarray(out["mask"]), want)
  np.testing.assert_array_equal(np.asarray(out["no_target"]), ~selected.any(axis=1))
  assert want.any() and selected.any()
  if quantile == 0.5:
    assert (selected.sum(axis=1) >= 2).any()  # a real multi-query union


# ------------------------------------------------------------------------------------------
# predict semantics on hand-made logits.
# ------------------------------------------------------------------------------------------
def _three_queries():
  """B=1, N=3 on 2x4: query 0 covers column 0, query 1 column 3, query 2 nothing."""
  mask_logits = np.full((1, 3, 2, 4), -5.0, np.float32)
  mask_logits[0, 0, :, 0] = 5.0
  mask_logits[0, 1, :, 3] = 5.0
  refer_logits = np.array([[[2.0, 0.0], [1.0, 0.0], [3.0, 0.0]]], np.float32)
  return mask_logits, refer_logits, np.array([[3.0]], np.float32)


def test_predict_threshold_is_strict(jit_predict):
  mask_logits, refer_logits, existence = _three_queries()
  scores = np.asarray(inference.refer_scores(refer_logits))[0]  # sigmoid(2), sigmoid(1), ...
  np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.array([2.0, 1.0, 3.0]))), rtol=1e-6)
  at_score = jit_predict(mask_logits, refer_logits, existence, score_threshold=float(scores[1]))
  below = jit_predict(mask_logits, refer_logits, existence,
                      score_threshold=float(np.nextafter(scores[1], np.float32(0))))
  # tau == score of query 1: not selected; tau one float32 step lower: selected.
  np.testing.assert_array_equal(np.asarray(at_score["mask"][0]).any(axis=0),
                                [True, False, False, False])
  np.testing.assert_array_equal(np.asarray(below["mask"][0]).any(axis=0),
                                [True, False, False, True])  # union of queries 0 and 1
  assert not np.asarray(at_score["no_target"][0]) and not np.asarray(below["no_target"][0])


def test_predict_no_target_and_empty_union(jit_predict):
  mask_logits, refer_logits, existence = _three_queries()
  nothing = jit_predict(mask_logits, refer_logits, existence, score_threshold=0.99)
  assert bool(nothing["no_target"][0]) and not np.asarray(nothing["mask"]).any()
  # Only query 2 passes, and its mask is empty: an empty union, but a target is predicted.
  only_empty = jit_predict(mask_logits, refer_logits, existence, score_threshold=0.9)
  assert not bool(only_empty["no_target"][0]) and not np.asarray(only_empty["mask"]).any()


def test_mask_threshold_uses_float32_sigmoid():
  logits = np.array([0.0, -1e-7, -1e-6, 1e-6], np.float32)
  # sigmoid(-1e-7) rounds to 0.5 in float32, which the official `>= 0.5` keeps.
  np.testing.assert_array_equal(np.asarray(inference.query_masks(logits)),
                                [True, True, False, True])


@pytest.mark.parametrize("existence_logit, vetoed", [(-0.1, True), (0.1, False)])
def test_existence_veto(jit_predict, existence_logit, vetoed):
  mask_logits, refer_logits, _ = _three_queries()
  existence = np.array([[existence_logit]], np.float32)
  plain = jit_predict(mask_logits, refer_logits, existence, score_threshold=0.5)
  veto = jit_predict(mask_logits, refer_logits, existence, score_threshold=0.5,
                     existence_veto=True)
  assert not bool(plain["no_target"][0]) and np.asarray(plain["mask"]).sum() == 4
  assert bool(veto["no_target"][0]) == vetoed
  assert np.asarray(veto["mask"]).sum() == (0 if vetoed else 4)


def test_predict_traced_threshold_and_shape_errors():
  mask_logits, refer_logits, existence = _three_queries()
  sweep = jax.jit(jax.vmap(lambda tau: inference.predict(
      mask_logits, refer_logits, existence, score_threshold=tau)["mask"].sum()))
  np.testing.assert_array_equal(np.asarray(sweep(jnp.array([0.99, 0.8, 0.6]))), [0, 2, 4])
  with pytest.raises(ValueError, match=r"refer_logits must be \(B, N, 2\) = \(1, 3, 2\)"):
    inference.predict(mask_logits, refer_logits[:, :2], existence, score_threshold=0.5)
  with pytest.raises(ValueError, match=r"existence_logit must be \(B, 1\)"):
    inference.predict(mask_logits, refer_logits, existence[:, 0], score_threshold=0.5)


def test_score_map_thresholds_to_predict(tiny_outputs):
  pixel_scores = np.asarray(inference.score_map(tiny_outputs["final.pred_masks"],
                                                tiny_outputs["final.refer_logits"]))
  for tau in (0.4, 0.45, 0.47, 0.5, 0.9):
    out = inference.predict(tiny_outputs["final.pred_masks"], tiny_outputs["final.refer_logits"],
                            tiny_outputs["final.pred_existence"], score_threshold=tau)
    np.testing.assert_array_equal(pixel_scores > np.float32(tau), np.asarray(out["mask"]))


# ------------------------------------------------------------------------------------------
# Resizing to the original image size on a static canvas.
# ------------------------------------------------------------------------------------------
def test_canvas_resize_matches_torch_and_resize_bilinear():
  with np.load("tests/data/torch_ops_ref.npz") as ref:  # F.interpolate outputs, 7x9 inputs
    ref = {k: ref[k] for k in ref.files}
  sizes = [(14, 18), (28, 5), (3, 4), (7, 9), (1, 1)]
  sources = [0, 1, 0, 1, 0]  # which sample of ref['x'] each canvas row resizes
  logits = ref["x"][sources]  # (5, 3, 7, 9)
  orig_hw = np.array(sizes, np.int32)
  canvas = jax.jit(inference.resize_logits_to_canvas, static_argnums=2)(
      logits, orig_hw, (28, 20))
  canvas = np.asarray(canvas)
  assert canvas.shape == (5, 3, 28, 20) and canvas.dtype == np.float32
  for b, ((h, w), src) in enumerate(zip(sizes, sources)):
    torch_out = ref[f"{h}_{w}_False"][src]
    # ref['x'] ~ N(0, 20): 4e-5 is a few float32 ulps at its magnitude (see test_ops.py).
    np.testing.assert_allclose(canvas[b, :, :h, :w], torch_out, atol=4e-5)
    per_sample = np.asarray(resize.resize_bilinear(logits[b], (h, w), align_corners=False))
    np.testing.assert_allclose(canvas[b, :, :h, :w], per_sample, atol=4e-5)
    outside = np.ones((28, 20), bool)
    outside[:h, :w] = False
    assert (canvas[b][:, outside] == inference.OUTSIDE_LOGIT).all()


def test_canvas_resize_errors():
  logits = np.zeros((2, 1, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"orig_hw\[1\] = \[9, 3\] must be within"):
    inference.resize_logits_to_canvas(logits, np.array([[4, 4], [9, 3]]), (8, 8))
  with pytest.raises(ValueError, match=r"orig_hw must be \(B, 2\) = \(2, 2\)"):
    inference.resize_logits_to_canvas(logits, np.array([[4, 4]]), (8, 8))


def test_two_resolutions_on_a_known_case():
  """One image of 4x8 pixels; the model sees it at 4x4 (the '384' protocol)."""
  column_logits = np.array([5.0, 5.0, -5.0, -5.0], np.float32)
  mask_logits = np.broadcast_to(column_logits, (1, 1, 4, 4)).copy()  # (B, N, 4, 4)
  refer_logits = np.array([[[4.0, -4.0]]], np.float32)
  existence = np.zeros((1, 1), np.float32)
  gt_original = np.zeros((1, 4, 8), bool)
  gt_original[:, :, :5] = True  # 20 px

  # Official protocol: model resolution, GT resized with nearest (cv2: src = floor(dst * 8/4)).
  gt_model = gt_original[:, :, np.floor(np.arange(4) * 2.0).astype(int)]  # columns 0, 2, 4, 6
  out = inference.predict(mask_logits, refer_logits, existence, score_threshold=0.7)
  at_model = metrics.RISMetrics()
  at_model.update(np.asarray(out["mask"]), gt_model)
  # pred columns {0, 1} (8 px) vs GT columns {0, 1, 2} (12 px): IoU 8/12.
  np.testing.assert_allclose(at_model.result()["mIoU"], 100 * 8 / 12, rtol=1e-12)

  # Original resolution on a 6x10 canvas: bilinear 4 -> 8 columns gives logits
  # 5, 5, 5, 2.5, -2.5, -5, -5, -5, so the prediction is columns 0..3 (16 px): IoU 16/20.
  canvas_logits = jax.jit(inference.resize_logits_to_canvas, static_argnums=2)(
      mask_logits, np.array([[4, 8]]), (6, 10))
  np.testing.assert_allclose(np.asarray(canvas_logits)[0, 0, 0, :8],
                             [5, 5, 5, 2.5, -2.5, -5, -5, -5], atol=1e-6)
  out = inference.predict(canvas_logits, refer_logits, existence, score_threshold=0.7)
  gt_canvas = np.zeros((1, 6, 10), bool)
  gt_canvas[:, :4, :8] = gt_original
  at_original = metrics.RISMetrics()
  at_original.update(np.asarray(out["mask"]), gt_canvas)
  np.testing.assert_allclose(at_original.result()["mIoU"], 80.0, rtol=1e-12)
  image_region = (np.arange(6)[:, None] < 4) & (np.arange(10)[None, :] < 8)  # (6, 10)
  np.testing.assert_array_equal(
      np.asarray(inference.canvas_valid_mask(np.array([[4, 8]]), (6, 10)))[0], image_region)
