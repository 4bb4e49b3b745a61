"""The objective on small synthetic batches against a numpy reference written from the official
criterion: more targets than queries (gRefCOCO, K > N), and the two `loss.normalizer` options.

Every point is a pixel centre of an 8 x 8 map (a power of two: the bilinear sample is exactly
the pixel), so the reference reads pixels instead of interpolating; the matching is scipy's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from configs import common
from deris_jax import losses

H = W = 8
NUM_AUX = 1  # one auxiliary round + the final one: rounds 0 (aux) and 1 (final)
NUM_POINTS = 16


def _config(normalizer="global", world_size=1):
  config = losses.default_loss_config()
  config.normalizer = normalizer
  config.official_world_size = world_size
  return config


def make_batch(num_queries, valid, weight=None, seed=0):
  """Random logits, masks, validity `valid` (B, K) and pixel-centre points for every round.

  Returns (outputs, targets, matcher_pixels (R+1, B, P, 2) as (y, x), mask_pixels
  (R+1, B, K, P, 2) as (y, x)).
  """
  rng = np.random.default_rng(seed)
  valid = np.asarray(valid, bool)
  b, k = valid.shape
  rounds = NUM_AUX + 1
  masks = rng.normal(size=(rounds, b, num_queries, H, W)).astype(np.float32) * 2
  refer = rng.normal(size=(rounds, b, num_queries, 2)).astype(np.float32)
  outputs = dict(pred_masks=masks[-1], refer_logits=refer[-1],
                 existence_logit=rng.normal(size=(b, 1)).astype(np.float32),
                 aux_pred_masks=masks[:-1], aux_refer_logits=refer[:-1])
  gt = (rng.random((b, k, H, W)) < 0.4).astype(np.uint8) * valid[:, :, None, None]
  targets = dict(gt_masks=gt, gt_valid=valid, exists=valid.any(1).astype(np.int32),
                 weight=(np.ones(b, np.float32) if weight is None
                         else np.asarray(weight, np.float32)))
  matcher_pixels = rng.integers(0, H, size=(rounds, b, NUM_POINTS, 2))
  mask_pixels = rng.integers(0, H, size=(rounds, b, k, NUM_POINTS, 2))
  return outputs, targets, matcher_pixels, mask_pixels


def _to_points(pixels):
  """(..., 2) integer (y, x) pixels -> normalised (x, y) pixel centres."""
  return np.stack([(pixels[..., 1] + 0.5) / W, (pixels[..., 0] + 0.5) / H],
                  axis=-1).astype(np.float32)


def _at(maps, pixels):
  """maps (M, H, W) read at pixels (P, 2) (y, x) -> (M, P) float64."""
  return maps[:, pixels[:, 0], pixels[:, 1]].astype(np.float64)


def _bce(x, t):
  return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _dice(x, t):
  p = 1 / (1 + np.exp(-x))
  return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def reference(outputs, targets, matcher_pixels, mask_pixels, *, world_size=1):
  """The official objective of `world_size` DDP GPUs (1 = the "global" normaliser), float64.

  GPU g holds consecutive examples; per GPU: num_masks = max(T / W, 1) with T all real
  targets, mask/dice = sum over its matched pairs / num_masks, class = weighted mean CE over
  its queries, existence = mean BCE; the objective is the mean over the GPUs holding any real
  example. Returns (metrics dict, matches per round: list of (B, K) query per slot).
  """
  config = losses.default_loss_config()
  valid, weight = targets["gt_valid"], targets["weight"].astype(np.float64)
  b, k = valid.shape
  group = b // world_size
  groups = [range(g * group, (g + 1) * group) for g in range(world_size)]
  active = [g for g in groups if weight[list(g)].sum() > 0]
  num_masks = max((valid * weight[:, None]).sum() / len(active), 1.0)  # per GPU, all-reduced
  rounds = [(outputs["aux_pred_masks"][r], outputs["aux_refer_logits"][r])
            for r in range(NUM_AUX)] + [(outputs["pred_masks"], outputs["refer_logits"])]
  metrics, matches = {}, []
  for r, (masks, refer) in enumerate(rounds):
    suffix = "" if r == NUM_AUX else f"_{r}"
    per_gpu = {"class": [], "mask": [], "dice": []}
    match = np.full((b, k), -1)
    for g in active:
      ce_sum = ce_weight = mask_sum = dice_sum = 0.0
      for i in g:
        log_prob = refer[i] - np.log(np.exp(refer[i].astype(np.float64)).sum(-1, keepdims=True))
        x = _at(masks[i], matcher_pixels[r, i])  # (N, P)
        t = _at(targets["gt_masks"][i], matcher_pixels[r, i])  # (K, P)
        cost = (config.cost_mask * _bce(x[:, None], t[None]).mean(-1)
                + config.cost_dice * _dice(x[:, None], t[None])
                - config.cost_class * np.exp(log_prob[:, :1]))  # (N, K)
        cols = np.flatnonzero(valid[i])
        rows, picked = optimize.linear_sum_assignment(cost[:, cols])
        match[i, cols[picked]] = rows
        matched = np.zeros(len(refer[i]), bool)
        matched[rows] = True
        ce = -np.where(matched, log_prob[:, 0], log_prob[:, 1])
        w = np.where(matched, 1.0, config.no_object_weight) * weight[i]
        ce_sum += (w * ce).sum()
        ce_weight += w.sum()
        for query, slot in zip(rows, cols[picked]):
          xp = _at(masks[i][query:query + 1], mask_pixels[r, i, slot])[0]
          tp = _at(targets["gt_masks"][i][slot:slot + 1], mask_pixels[r, i, slot])[0]
          mask_sum += weight[i] * _bce(xp, tp).mean()
          dice_sum += weight[i] * _dice(xp, tp)
      per_gpu["class"].append(ce_sum / ce_weight)
      per_gpu["mask"].append(mask_sum / num_masks)
      per_gpu["dice"].append(dice_sum / num_masks)
    for term, values in per_gpu.items():
      metrics[f"raw/loss_{term}{suffix}"] = np.mean(values)
    matches.append(match)
  logit = outputs["existence_logit"][:, 0].astype(np.float64)
  bce = _bce(logit, targets["exists"].astype(np.float64))
  metrics["raw/loss_label_nt"] = np.mean([(weight[list(g)] * bce[list(g)]).sum()
                                          / weight[list(g)].sum() for g in active])
  metrics["num_masks"] = num_masks * len(active)  # the effective normaliser of the sums
  return metrics, matches


@jax.jit
def _matches(outputs, targets, matcher_points):
  config = losses.default_loss_config()
  rounds = [(outputs["aux_pred_masks"][r], outputs["aux_refer_logits"][r])
            for r in range(NUM_AUX)] + [(outputs["pred_masks"], outputs["refer_logits"])]
  return [losses.match_round(m, l, targets["gt_masks"], targets["gt_valid"], matcher_points[r],
                             config=config).query_for_target for r, (m, l) in enumerate(rounds)]


def _loss(outputs, targets, matcher_pixels, mask_pixels, config):
  fn = jax.jit(lambda o, t, mp, kp: losses.deris_loss_at_points(
      o, t, matcher_points=mp, mask_points=kp, config=config))
  return fn(outputs, targets, _to_points(matcher_pixels), _to_points(mask_pixels))


def _assert_matches_reference(metrics, want, rtol=2e-5):
  for key, value in want.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=rtol, atol=1e-6, err_msg=key)
  weights = {"class": 2.0, "mask": 5.0, "dice": 5.0}
  rounds = [f"_{r}" for r in range(NUM_AUX)] + [""]
  scale = {s: (0.2 if s else 1.0) for s in rounds}
  total = (sum(weights[t] * scale[s] * want[f"raw/loss_{t}{s}"] for t in weights for s in rounds)
           + want["raw/loss_label_nt"])
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# K > N: more target slots (and more valid targets) than queries


def _more_targets_batch():
  """N = 3 queries, K = 5 slots: 5 valid (V > N), 3 valid (V = N), 2 valid with holes, none."""
  valid = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
  return make_batch(3, valid, seed=1)


def test_more_targets_than_queries_match_the_reference():
  outputs, targets, matcher_pixels, mask_pixels = _more_targets_batch()
  _, metrics = _loss(outputs, targets, matcher_pixels, mask_pixels, _config())
  want, want_matches = reference(outputs, targets, matcher_pixels, mask_pixels)
  got_matches = _matches(outputs, targets, _to_points(matcher_pixels))
  for got, match in zip(got_matches, want_matches):
    np.testing.assert_array_equal(np.asarray(got), match)
    assert (match[0] >= 0).sum() == 3  # 5 valid targets, 3 queries: 2 stay unmatched
  assert want["num_masks"] == 10.0  # all valid targets, matched or not
  _assert_matches_reference(metrics, want)


def test_more_targets_than_queries_mask_term_by_hand():
  """loss_mask (final round) = sum of BCE over the matched pairs only / all 10 valid targets."""
  outputs, targets, matcher_pixels, mask_pixels = _more_targets_batch()
  _, metrics = _loss(outputs, targets, matcher_pixels, mask_pixels, _config())
  match = np.asarray(_matches(outputs, targets, _to_points(matcher_pixels))[-1])
  pairs = [(i, q, s) for i in range(4) for s, q in enumerate(match[i]) if q >= 0]
  assert len(pairs) == 3 + 3 + 2  # sample 0: 3 of its 5 targets
  bce = [_bce(_at(outputs["pred_masks"][i][q:q + 1], mask_pixels[-1, i, s])[0],
              _at(targets["gt_masks"][i][s:s + 1], mask_pixels[-1, i, s])[0]).mean()
         for i, q, s in pairs]
  np.testing.assert_allclose(float(metrics["raw/loss_mask"]), sum(bce) / 10.0, rtol=2e-5)
  assert float(metrics["num_masks"]) == 10.0


def test_more_targets_than_queries_gradients_are_finite():
  outputs, targets, _, _ = _more_targets_batch()
  config = _config()
  config.num_points = 16
  grad_fn = jax.jit(jax.value_and_grad(
      lambda o, t, key: losses.deris_loss(o, t, key, config=config)[0]))
  loss, grads = grad_fn(outputs, targets, jax.random.key(0))
  assert np.isfinite(float(loss))
  for key, g in grads.items():
    assert np.isfinite(np.asarray(g)).all(), key
  assert np.abs(np.asarray(grads["pred_masks"])[0]).max() > 0


def test_grefcoco_shapes_trace():
  """N = 20 queries, K = 32 slots (the released gRefCOCO configs), official normaliser."""
  b, n, k = 4, 20, 32
  outputs = dict(pred_masks=jnp.zeros((b, n, 96, 96)), refer_logits=jnp.zeros((b, n, 2)),
                 existence_logit=jnp.zeros((b, 1)), aux_pred_masks=jnp.zeros((3, b, n, 96, 96)),
                 aux_refer_logits=jnp.zeros((3, b, n, 2)))
  targets = dict(gt_masks=jnp.zeros((b, k, 384, 384), jnp.uint8),
                 gt_valid=jnp.zeros((b, k), bool), exists=jnp.zeros((b,), jnp.int32),
                 weight=jnp.ones((b,)))
  config = _config("official", 4)
  total, metrics = jax.eval_shape(
      lambda o, t: losses.deris_loss(o, t, jax.random.key(0), config=config), outputs, targets)
  assert total.shape == () and metrics["num_masks"].shape == ()


# ----------------------------------------------------------------------------------------------
# loss.normalizer = "official": W consecutive per-GPU groups


@pytest.mark.parametrize("valid", [
    [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]],  # 3 targets, 2 groups without any
    [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]],  # 1 target in total: official = global / 4
])
def test_official_groups_of_one(valid):
  outputs, targets, matcher_pixels, mask_pixels = make_batch(4, valid, seed=2)
  _, official = _loss(outputs, targets, matcher_pixels, mask_pixels, _config("official", 4))
  _, global_ = _loss(outputs, targets, matcher_pixels, mask_pixels, _config())
  want_official, _ = reference(outputs, targets, matcher_pixels, mask_pixels, world_size=4)
  want_global, _ = reference(outputs, targets, matcher_pixels, mask_pixels, world_size=1)
  _assert_matches_reference(official, want_official)
  _assert_matches_reference(global_, want_global)
  total_targets = int(np.sum(valid))
  assert float(official["num_masks"]) == max(total_targets, 4)
  assert float(global_["num_masks"]) == total_targets
  for key in ("raw/loss_mask", "raw/loss_dice_0"):
    np.testing.assert_allclose(float(official[key]) * max(total_targets, 4) / total_targets,
                               float(global_[key]), rtol=1e-6, err_msg=key)
  # Groups of one: the existence term is the plain mean either way.
  np.testing.assert_allclose(float(official["raw/loss_label_nt"]),
                             float(global_["raw/loss_label_nt"]), rtol=1e-6)


def test_official_groups_of_two_mean_of_means():
  """B = 8, W = 4: class and existence are means of per-group weighted means; one group is
  all padding (left out: W_eff = 3), one holds a padding example."""
  valid = [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1], [1, 0, 0]]
  weight = [1, 1, 1, 0, 1, 1, 0, 0]  # groups: (1, 1), (1, 0), (1, 1), (0, 0)
  outputs, targets, matcher_pixels, mask_pixels = make_batch(4, valid, weight, seed=3)
  _, got = _loss(outputs, targets, matcher_pixels, mask_pixels, _config("official", 4))
  want, _ = reference(outputs, targets, matcher_pixels, mask_pixels, world_size=4)
  _assert_matches_reference(got, want)
  assert float(got["num_masks"]) == 4.0  # T = 2 + 1 + 1 + 0 real targets = 4 >= W_eff = 3
  # Fewer real targets than active groups: num_masks = W_eff = 3 (not W = 4, not T = 2).
  few = dict(targets, gt_valid=np.array(valid, bool) & np.array([0, 0, 0, 1, 1, 0, 1, 1],
                                                                bool)[:, None])
  few["gt_valid"][0, 0] = True
  _, got = _loss(outputs, few, matcher_pixels, mask_pixels, _config("official", 4))
  want, _ = reference(outputs, few, matcher_pixels, mask_pixels, world_size=4)
  _assert_matches_reference(got, want)
  assert float(got["num_masks"]) == 3.0
  _, global_ = _loss(outputs, targets, matcher_pixels, mask_pixels, _config())
  want_global, _ = reference(outputs, targets, matcher_pixels, mask_pixels, world_size=1)
  _assert_matches_reference(global_, want_global)
  assert abs(float(got["raw/loss_class"]) - float(global_["raw/loss_class"])) > 1e-4
  assert abs(float(got["raw/loss_label_nt"]) - float(global_["raw/loss_label_nt"])) > 1e-4


def test_official_class_loss_by_hand():
  """class_loss with num_groups: mean over the groups with weight of per-group weighted means."""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(8, 5, 2)).astype(np.float32) * 3
  matched = rng.random((8, 5)) < 0.3
  weight = np.array([1, 1, 1, 0, 0, 0, 1, 1], np.float32)  # group 1 (examples 2, 3) half,
  log_prob = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # group 2 empty
  ce = -np.where(matched, log_prob[..., 0], log_prob[..., 1])
  w = np.where(matched, 1.0, 0.1) * weight[:, None]
  means = [(w[g:g + 2] * ce[g:g + 2]).sum() / w[g:g + 2].sum() for g in (0, 2, 6)]
  got = losses.class_loss(logits, matched, weight, no_object_weight=0.1, num_groups=4)
  np.testing.assert_allclose(float(got), np.mean(means), rtol=1e-6)
  one = losses.class_loss(logits, matched, weight, no_object_weight=0.1, num_groups=1)
  np.testing.assert_allclose(float(one), (w * ce).sum() / w.sum(), rtol=1e-6)


def test_official_padding_gets_no_gradient():
  valid = [[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]]
  outputs, targets, _, _ = make_batch(4, valid, weight=[1, 1, 1, 0], seed=5)
  config = _config("official", 2)
  config.num_points = 16
  grads = jax.jit(jax.grad(lambda o, t: losses.deris_loss(o, t, jax.random.key(1),
                                                          config=config)[0]))(outputs, targets)
  for key, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all(), key
    padded = g[:, -1] if key.startswith("aux") else g[-1]
    assert np.abs(padded).max() == 0.0, key


def test_normalizer_config_errors():
  outputs, targets, matcher_pixels, mask_pixels = make_batch(4, [[1, 0, 0]] * 6, seed=6)
  with pytest.raises(ValueError, match=r"loss.official_world_size=4 does not divide .* B=6"):
    _loss(outputs, targets, matcher_pixels, mask_pixels, _config("official", 4))
  with pytest.raises(ValueError, match=r"loss.normalizer='ddp' must be one of"):
    _loss(outputs, targets, matcher_pixels, mask_pixels, _config("ddp", 4))
  with pytest.raises(ValueError, match=r"loss.official_world_size=0 must be an int >= 1"):
    _loss(outputs, targets, matcher_pixels, mask_pixels, _config("official", 0))
  # "global" ignores the world size.
  _loss(outputs, targets, matcher_pixels, mask_pixels, _config("global", 4))


def test_released_configs_take_the_default_objective_with_the_official_normaliser():
  assert (common.loss_config().normalizer, common.loss_config().official_world_size) == (
      "global", 1)
  from deris_jax.config_loader import load_config
  for variant in ("deris_b_refcoco", "deris_l_refcoco", "deris_b_grefcoco", "deris_l_grefcoco"):
    loss = load_config(f"configs/{variant}.py").loss.to_dict()
    assert (loss.pop("normalizer"), loss.pop("official_world_size")) == ("official", 4), variant
    default = losses.default_loss_config().to_dict()
    del default["normalizer"], default["official_world_size"]
    assert loss == default, variant
