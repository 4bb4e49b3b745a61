"""The DeRIS objective against the official loss pass recorded in the deris_tiny fixture."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax import losses
from deris_jax.parity import fixture_losses
from deris_jax.ops import resize, sample

STAGES = fixture_losses.STAGES  # round order 0..3
K_MAX = 3  # one more target slot than the fixture needs: padding is exercised everywhere


@pytest.fixture(scope="module")
def official(tiny_inputs, tiny_outputs):
  """Outputs, targets and the official random points, laid out as deris_loss takes them."""
  loss_pass = fixture_losses.official_loss_pass(tiny_inputs, tiny_outputs, num_slots=K_MAX)
  # The fixture's own tensors (not our forward): this file tests the objective alone.
  outputs = fixture_losses.model_loss_outputs(tiny_outputs)
  return dict(outputs=outputs, targets=loss_pass.targets,
              matcher_points=loss_pass.matcher_points, mask_points=loss_pass.mask_points,
              indices=loss_pass.query_for_target, raw=tiny_outputs)


def _round(outputs, r):
  if r == 3:
    return outputs["pred_masks"], outputs["refer_logits"]
  return outputs["aux_pred_masks"][r], outputs["aux_refer_logits"][r]


@jax.jit
def _loss_at_points(outputs, targets, matcher_points, mask_points):
  return losses.deris_loss_at_points(outputs, targets, matcher_points=matcher_points,
                                     mask_points=mask_points, config=losses.default_loss_config())


def _small_config(num_points=64):
  config = losses.default_loss_config()
  config.num_points = num_points
  return config


@jax.jit
def _loss_rng(outputs, targets, rng):
  return losses.deris_loss(outputs, targets, rng, config=_small_config())


def test_aux_upsampling_reproduces_the_official_final_masks(tiny_outputs):
  """The x4 align_corners=True upsampling used for aux rounds, checked on round 3."""
  up = resize.resize_bilinear(tiny_outputs["decoder.round3.mask_logits"],
                              tiny_outputs["final.pred_masks"].shape[-2:], align_corners=True)
  np.testing.assert_allclose(np.asarray(up), tiny_outputs["final.pred_masks"], atol=1e-5)


@jax.jit
def _match(pred_masks, refer_logits, gt_masks, gt_valid, points):
  return losses.match_round(pred_masks, refer_logits, gt_masks, gt_valid, points,
                            config=losses.default_loss_config())


@pytest.mark.parametrize("r", range(4))
def test_matching_reproduces_official_indices(official, r):
  pred_masks, refer_logits = _round(official["outputs"], r)
  targets = official["targets"]
  got = _match(pred_masks, refer_logits, targets["gt_masks"], targets["gt_valid"],
               official["matcher_points"][r])
  want = official["indices"][STAGES[r]]
  np.testing.assert_array_equal(np.asarray(got.query_for_target), want)
  matched = np.zeros_like(np.asarray(got.query_matched))
  for i, row in enumerate(want):
    matched[i, row[row >= 0]] = True
  np.testing.assert_array_equal(np.asarray(got.query_matched), matched)


def test_every_official_loss_term_is_reproduced(official):
  total, metrics = _loss_at_points(official["outputs"], official["targets"],
                                   official["matcher_points"], official["mask_points"])
  raw = official["raw"]
  for term in ("class", "mask", "dice"):
    for suffix in ("", "_0", "_1", "_2"):
      key = f"loss_{term}{suffix}"
      np.testing.assert_allclose(float(metrics[f"raw/{key}"]), raw[f"loss.raw.{key}"],
                                 rtol=1e-4, err_msg=key)
  for key in ("loss_class", "loss_mask", "loss_label_nt"):
    np.testing.assert_allclose(float(metrics[f"total/{key}"]), raw[f"loss.total.{key}"],
                               rtol=1e-4, err_msg=key)
  official_total = sum(float(raw[f"loss.total.{k}"]) for k in
                       ("loss_class", "loss_mask", "loss_det", "loss_label_nt", "loss_perp"))
  np.testing.assert_allclose(float(total), official_total, rtol=1e-4)
  assert float(metrics["num_masks"]) == 3.0


@jax.jit
def _round_terms(pred_masks, refer_logits, gt_masks, query, pair_weight, points, weight):
  loss_mask, loss_dice = losses.mask_losses(pred_masks, gt_masks, query, pair_weight, points,
                                            jnp.float32(3.0))
  matched = jnp.zeros(refer_logits.shape[:2], bool).at[
      jnp.arange(query.shape[0])[:, None], query].max(pair_weight > 0)  # (B, N)
  loss_cls = losses.class_loss(refer_logits, matched, weight, no_object_weight=0.1)
  return loss_cls, loss_mask, loss_dice


def test_lower_level_terms_compose_to_the_official_values(official):
  """mask_losses / class_loss / existence_loss with the official matches and points."""
  outputs, targets, raw = official["outputs"], official["targets"], official["raw"]
  weight = targets["weight"]
  for r, stage in enumerate(STAGES):
    suffix = "" if stage == "final" else f"_{r}"
    pred_masks, refer_logits = _round(outputs, r)
    query = official["indices"][stage]
    got = _round_terms(pred_masks, refer_logits, targets["gt_masks"], np.maximum(query, 0),
                       (query >= 0).astype(np.float32), official["mask_points"][r], weight)
    for term, value in zip(("class", "mask", "dice"), got):
      np.testing.assert_allclose(float(value), raw[f"loss.raw.loss_{term}{suffix}"], rtol=1e-4,
                                 err_msg=f"{term}{suffix}")
  exist = losses.existence_loss(outputs["existence_logit"], targets["exists"], weight)
  np.testing.assert_allclose(float(exist), raw["loss.total.loss_label_nt"], rtol=1e-4)


def test_class_loss_is_the_weighted_mean_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 2)).astype(np.float32) * 3
  matched = rng.random((3, 5)) < 0.3
  weight = np.array([1.0, 0.0, 1.0], np.float32)
  log_prob = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.where(matched, log_prob[..., 0], log_prob[..., 1])
  w = np.where(matched, 1.0, 0.1) * weight[:, None]
  want = (w * ce).sum() / w.sum()
  got = losses.class_loss(logits, matched, weight, no_object_weight=0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_uncertain_points_are_the_most_uncertain_candidates():
  rng = np.random.default_rng(1)
  pred_masks = rng.normal(size=(2, 4, 9, 11)).astype(np.float32)
  query = np.array([[3, 0], [1, 1]])
  candidates = rng.random((2, 2, 30, 2)).astype(np.float32)
  fresh = rng.random((2, 2, 5, 2)).astype(np.float32)
  got = np.asarray(jax.jit(losses.importance_points, static_argnames="num_uncertain")(
      pred_masks, query, candidates, fresh, num_uncertain=7))
  assert got.shape == (2, 2, 12, 2)
  logits = np.asarray(sample.point_sample(  # an independent sampler, tested against torch
      pred_masks[np.arange(2)[:, None], query].reshape(4, 9, 11), candidates.reshape(4, 30, 2)))
  for row, (i, k) in enumerate(np.ndindex(2, 2)):
    # torch.topk's set (ties to the earlier candidate), in candidate order.
    kept = np.sort(np.argsort(np.abs(logits[row]), kind="stable")[:7])
    np.testing.assert_array_equal(got[i, k, :7], candidates[i, k][kept])
    np.testing.assert_array_equal(got[i, k, 7:], fresh[i, k])


def test_point_counts_and_draws():
  config = losses.default_loss_config()
  counts = losses.point_counts(config)
  assert counts == (12544, 37632, 9408, 3136)  # the official int() truncations
  config.num_points = 10
  counts = losses.point_counts(config)
  assert counts == (10, 30, 7, 3)
  matcher, candidates, fresh = losses.random_points(
      jax.random.key(0), batch_size=3, num_targets=2, num_rounds=4, counts=counts)
  assert matcher.shape == (4, 3, 10, 2)
  assert candidates.shape == (4, 3, 2, 30, 2) and fresh.shape == (4, 3, 2, 3, 2)
  for draws in (matcher, candidates, fresh):
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
  # Example b's draws do not depend on the batch size.
  fewer = losses.random_points(jax.random.key(0), batch_size=2, num_targets=2, num_rounds=4,
                               counts=counts)
  np.testing.assert_array_equal(np.asarray(fewer[0]), np.asarray(matcher[:, :2]))
  np.testing.assert_array_equal(np.asarray(fewer[1]), np.asarray(candidates[:, :2]))
  assert not np.array_equal(np.asarray(matcher[0]), np.asarray(matcher[1]))  # rounds differ
  config.importance_sample_ratio = 1.5
  with pytest.raises(ValueError, match="importance_sample_ratio=1.5"):
    losses.point_counts(config)


def _with_padding_example(outputs, targets, rng):
  """The batch plus one weight-0 example holding random garbage."""
  def pad(x, axis, garbage):
    return np.concatenate([x, garbage.astype(x.dtype)], axis=axis)
  b = targets["weight"].shape[0]
  new_out = {
      "pred_masks": pad(outputs["pred_masks"], 0,
                        rng.normal(size=(1,) + outputs["pred_masks"].shape[1:]) * 5),
      "refer_logits": pad(outputs["refer_logits"], 0, rng.normal(size=(1, 10, 2))),
      "existence_logit": pad(outputs["existence_logit"], 0, np.full((1, 1), 7.0)),
      "aux_pred_masks": pad(outputs["aux_pred_masks"], 1,
                            rng.normal(size=(3, 1) + outputs["pred_masks"].shape[1:])),
      "aux_refer_logits": pad(outputs["aux_refer_logits"], 1, rng.normal(size=(3, 1, 10, 2))),
  }
  new_tgt = {
      "gt_masks": pad(targets["gt_masks"], 0,
                      rng.random((1,) + targets["gt_masks"].shape[1:]) < 0.5),
      "gt_valid": pad(targets["gt_valid"], 0, np.ones((1, K_MAX), bool)),
      "exists": pad(targets["exists"], 0, np.zeros((1,))),
      "weight": pad(targets["weight"], 0, np.zeros((1,))),
  }
  assert new_tgt["weight"].shape == (b + 1,)
  return new_out, new_tgt


def _assert_same_metrics(got, want, rtol=1e-6):
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=rtol, atol=1e-7,
                               err_msg=key)


def test_padding_examples_change_nothing(official):
  outputs, targets = _with_padding_example(official["outputs"], official["targets"],
                                           np.random.default_rng(2))
  key = jax.random.key(5)
  _, want = _loss_rng(official["outputs"], official["targets"], key)
  _, got = _loss_rng(outputs, targets, key)
  _assert_same_metrics(got, want)


def test_random_point_loss_is_finite_and_close_to_the_official_scale(official):
  total, metrics = _loss_rng(official["outputs"], official["targets"], jax.random.key(0))
  assert np.isfinite(float(total))
  _, again = _loss_rng(official["outputs"], official["targets"], jax.random.key(0))
  _assert_same_metrics(again, metrics, rtol=0)  # deterministic given the key
  _, other = _loss_rng(official["outputs"], official["targets"], jax.random.key(1))
  assert float(other["raw/loss_mask"]) != float(metrics["raw/loss_mask"])
  # Matching and class terms on fresh random points stay near the official values (64 points).
  for key in ("loss_mask", "loss_dice", "loss_class"):
    np.testing.assert_allclose(float(metrics[f"raw/{key}"]), official["raw"][f"loss.raw.{key}"],
                               rtol=0.35, err_msg=key)
  np.testing.assert_allclose(float(total), float(sum(
      metrics[f"total/{k}"] for k in ("loss_class", "loss_mask", "loss_label_nt"))), rtol=1e-6)


def test_sample_without_target(official):
  """No target: no mask/dice contribution, all its queries 'not referred', existence 0."""
  outputs = official["outputs"]
  targets = {k: np.array(v) for k, v in official["targets"].items()}
  targets["gt_valid"][1] = False
  targets["exists"][1] = 0
  _, metrics = _loss_rng(outputs, targets, jax.random.key(3))
  first_only = dict(targets, weight=np.array([1.0, 0.0], np.float32))  # sample 1 as padding
  _, first = _loss_rng(outputs, first_only, jax.random.key(3))
  assert float(metrics["num_masks"]) == 1.0
  for r in ("", "_0", "_1", "_2"):
    for key in (f"raw/loss_mask{r}", f"raw/loss_dice{r}"):
      np.testing.assert_allclose(float(metrics[key]), float(first[key]), rtol=1e-6, err_msg=key)
  logit = outputs["existence_logit"][:, 0].astype(np.float64)
  labels = np.array([1.0, 0.0])
  want = np.mean(np.maximum(logit, 0) - logit * labels + np.log1p(np.exp(-np.abs(logit))))
  np.testing.assert_allclose(float(metrics["raw/loss_label_nt"]), want, rtol=1e-6)

  targets["gt_valid"][:] = False
  targets["exists"][:] = 0
  total, empty = _loss_rng(outputs, targets, jax.random.key(3))
  assert np.isfinite(float(total))
  assert float(empty["num_masks"]) == 1.0
  assert float(empty["total/loss_mask"]) == 0.0
  # Nothing matched: every query is "not referred", so the weighted mean is a plain mean.
  refer = np.asarray(outputs["refer_logits"], np.float64)
  log_prob = refer - np.log(np.exp(refer).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(empty["raw/loss_class"]), -log_prob[..., 1].mean(), rtol=1e-5)


def test_gradients_are_finite_and_skip_padding(official):
  rng = np.random.default_rng(4)
  outputs, targets = _with_padding_example(official["outputs"], official["targets"], rng)
  grad_fn = jax.jit(jax.grad(lambda o, t, k: losses.deris_loss(o, t, k, config=_small_config())[0]))
  grads = grad_fn(outputs, targets, jax.random.key(0))
  for key, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all(), key
    padded = g[:, -1] if key.startswith("aux") else g[-1]
    real = g[:, :-1] if key.startswith("aux") else g[:-1]
    assert np.abs(padded).max() == 0.0, key
    assert np.abs(real).max() > 0.0, key


def test_bad_inputs_name_what_is_wrong(official):
  outputs = dict(official["outputs"])
  outputs["refer_logits"] = outputs["refer_logits"][:, :, :1]
  with pytest.raises(ValueError, match=r"outputs\['refer_logits'\] has shape \(2, 10, 1\)"):
    losses.deris_loss(outputs, official["targets"], jax.random.key(0), config=_small_config())
  targets = dict(official["targets"])
  del targets["weight"]
  with pytest.raises(KeyError, match="targets lacks \\['weight'\\]"):
    losses.deris_loss(official["outputs"], targets, jax.random.key(0), config=_small_config())
  config = _small_config()
  del config.cost_dice
  with pytest.raises(KeyError, match="cost_dice"):
    losses.deris_loss(official["outputs"], official["targets"], jax.random.key(0), config=config)
  with pytest.raises(ValueError, match="mask_points has 3 rounds"):
    losses.deris_loss_at_points(official["outputs"], official["targets"],
                                matcher_points=official["matcher_points"],
                                mask_points=official["mask_points"][:3],
                                config=losses.default_loss_config())
