"""The DeRIS training objective: Hungarian matching, point-sampled mask losses, existence BCE.

What the official code computes (docs/design.md §6; `simplehead_Independent_matching.py`,
`Mask_Criterion.py`, Mask2Former `matcher.py` / `point_features.py`), per prediction round r
(rounds 0..R-1 are the auxiliary rounds, round R the final one), each matched independently:

- Matching cost (per sample, N queries x K referred instances, all of class 0):
  `cost_class * -softmax(refer_logits)[:, 0] + cost_mask * BCE + cost_dice * dice`, the mask
  terms on `num_points` uniform random points shared by every mask of the sample
  (`grid_sample`, align_corners=False). Solved exactly on the device (`deris_jax.matching`),
  like `scipy.optimize.linear_sum_assignment` on the N x K_valid matrix: with K_valid <= N
  every target gets a query; with K_valid > N (gRefCOCO: N = 20 queries, up to 32 instances)
  every query gets a target and K_valid - N targets stay unmatched (no mask/dice term).
- `loss_class`: cross-entropy over all B*N queries, matched -> class 0, others -> class 1,
  class weights [1, no_object_weight], PyTorch's weighted mean sum(w*ce) / sum(w).
- `loss_mask` / `loss_dice`: on the matched (query, target) pairs, PointRend importance
  sampling per mask (`num_points * oversample_ratio` uniform candidates, the
  `importance_sample_ratio` most uncertain by -|logit|, the rest fresh uniform points); BCE
  mean over points and dice with +1 smoothing; summed over matched masks and divided by
  `num_masks`, which counts ALL targets, matched or not (`sum(len(t["labels"]))`).
- `loss_label_nt`: BCE of the existence logit against "has >= 1 referred instance", batch mean.
- Total = sum over rounds of weights (class 2, mask 5, dice 5; x aux_weight 0.2 for auxiliary
  rounds) + existence_weight * loss_label_nt. The box losses weigh 0 (or are dropped) in the
  official code and are not computed here.

Normalisers (`loss.normalizer`). The official run is DDP on W GPUs (W = 4 in the DeRIS
README): each GPU g computes its loss L_g on its B/W samples with num_masks M = max(T / W, 1)
(T = all targets of all GPUs, all-reduced, the same M everywhere), and DDP averages the
gradients, so the objective is (1/W) sum_g L_g. Here the whole (sharded) global batch is one
jitted computation:
- "global" (default): `num_masks = max(T, 1)`; `loss_class` and `loss_label_nt` are weighted
  means over the global batch. Equal to the official objective whenever each GPU would see >= 1
  target on average, except for the per-GPU split of `loss_class`'s matched-query weights.
- "official": the global batch is `loss.official_world_size` = W consecutive groups of B/W
  samples (one per official GPU): mask/dice = sum over all matched pairs / max(T, W) (= the
  official (1/W) sum_g sum_pairs_g / M); `loss_class` and `loss_label_nt` = the mean over
  groups of each group's weighted mean.
The `num_masks` metric is the effective normaliser of the mask/dice sums (max(T, 1) or
max(T, W)).

Differences from the official code, all deliberate:
- The "global" normaliser by default (above); "official" reproduces the DDP objective.
- Padding examples: `targets['weight']` (1 real, 0 padding) multiplies every example's
  contribution to every sum and normaliser (class, existence, mask/dice and `num_masks`).
  Under "official", a group (official GPU) made only of padding takes no part: the group means
  are averaged over the groups with any weight, and W in max(T, W) counts those groups.
- Existence BCE is computed from the logit (log-sigmoid form). The official applies
  `F.binary_cross_entropy` to `sigmoid(logit)` with its log clamped at -100; the two agree
  except for a no-target sample whose logit is >= ~16, where float32 sigmoid rounds to 1 and
  the official loss jumps to 100 with zero gradient (measured: logit 16 -> 15.94 vs 16.0,
  logit 17 -> 100 vs 17).
- Random points: example b draws all its points from (rng, b) (`ops/keyed_bits.py`, a keyed
  hash instead of threefry: the same law, cheaper to compile and run), so a real example's
  points (and thus its loss) do not depend on the batch size or on padding examples appended
  to the batch.
- The importance points are kept in candidate order, not most uncertain first: the set
  `torch.topk` keeps (ties to the earlier candidate), found without a sort on the CPU
  (`ops.top_set`); only summation order differs.
"""
from typing import Callable, Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from deris_jax import matching
from deris_jax.ops import keyed_bits, sample, top_set

Metrics = dict
_HIGHEST = jax.lax.Precision.HIGHEST
_REQUIRED_CONFIG_KEYS = (
    "num_points", "oversample_ratio", "importance_sample_ratio", "class_weight", "mask_weight",
    "dice_weight", "cost_class", "cost_mask", "cost_dice", "no_object_weight", "aux_weight",
    "existence_weight", "normalizer", "official_world_size")
NORMALIZERS = ("global", "official")


def default_loss_config() -> mlc.ConfigDict:
  """The `loss` config section of the released models (docs/design.md §6)."""
  return mlc.ConfigDict(dict(
      num_points=12544,  # TRAIN_NUM_POINTS, matcher and losses
      oversample_ratio=3.0,  # OVERSAMPLE_RATIO: candidates = num_points * 3
      importance_sample_ratio=0.75,  # IMPORTANCE_SAMPLE_RATIO
      class_weight=2.0,  # CLASS_WEIGHT: loss_class weight
      mask_weight=5.0,  # MASK_WEIGHT: loss_mask (BCE) weight
      dice_weight=5.0,  # DICE_WEIGHT: loss_dice weight
      cost_class=2.0,  # matcher: CLASS_WEIGHT * matching_cost_weight['cls'] (1)
      cost_mask=5.0,  # matcher: MASK_WEIGHT * matching_cost_weight['mask'] (1)
      cost_dice=5.0,  # matcher: DICE_WEIGHT * matching_cost_weight['mask'] (1)
      no_object_weight=0.1,  # empty_weight[1]: CE weight of the "not referred" class
      aux_weight=0.2,  # loss_weight['aux']: every auxiliary round's weights x 0.2
      existence_weight=1.0,  # loss_weight['existence']
      # "global": one global-batch normaliser; "official": the DDP objective of
      # official_world_size GPUs, the global batch split into that many consecutive groups.
      normalizer="global",
      official_world_size=1,  # GPUs of the official run (global batch = per-GPU batch x this)
  ))


# ----------------------------------------------------------------------------------------------
# Point sampling


def sample_selected(maps: jax.Array, select: jax.Array, points: jax.Array) -> jax.Array:
  """Bilinear samples of chosen maps at normalised points (`point_sample`, align_corners=False).

  Args:
    maps: (B, M, H, W) maps (logits or masks, any dtype).
    select: (B, S) int, which of the M maps each output row samples (must be in range).
    points: (B, S, P, 2) or (B, 1, P, 2) normalised (x, y) in [0, 1]; a size-1 axis 1 shares
      the points among the S rows.
  Returns:
    (B, S, P) float32 samples (neighbours outside the map count as 0, like grid_sample).
  """
  b, m, h, w = maps.shape
  corners, weights = sample.bilinear_corners(points, h, w)  # (B, S|1, P, 4)
  flat_index = select[:, :, None, None] * (h * w) + corners  # (B, S, P, 4)
  out_shape = flat_index.shape
  values = jnp.take_along_axis(maps.reshape(b, m * h * w), flat_index.reshape(b, -1), axis=1)
  values = values.reshape(out_shape).astype(jnp.float32)  # (B, S, P, 4)
  return jnp.sum(values * weights, axis=-1)  # (B, S, P)


def select_uncertain_points(pred_masks: jax.Array, query_index: jax.Array,
                            candidates: jax.Array, num_uncertain: int) -> jax.Array:
  """The `num_uncertain` candidates of each matched mask with the largest -|logit|.

  Args:
    pred_masks: (B, N, H, W) mask logits (no gradient flows through the choice of points).
    query_index: (B, K) the query whose mask each target slot is compared with (in range).
    candidates: (B, K, C, 2) normalised (x, y) candidate points per slot.
    num_uncertain: how many to keep (<= C).
  Returns:
    (B, K, num_uncertain, 2) in candidate order: the set `torch.topk` keeps (ties to the
    earlier candidate), not its most-uncertain-first order. The loss is a mean over the points,
    so only the set matters (`ops.top_set`, which needs no sort on the CPU).
  """
  logits = sample_selected(jax.lax.stop_gradient(pred_masks), query_index, candidates)  # (B,K,C)
  most_uncertain = top_set.top_set(-jnp.abs(logits), num_uncertain)  # (B, K, U)
  return jnp.take_along_axis(candidates, most_uncertain[..., None], axis=2)  # (B, K, U, 2)


def importance_points(pred_masks: jax.Array, query_index: jax.Array, candidates: jax.Array,
                      fresh: jax.Array, *, num_uncertain: int) -> jax.Array:
  """PointRend `get_uncertain_point_coords_with_randomness`, given its uniform draws.

  Args:
    pred_masks: (B, N, H, W) mask logits.
    query_index: (B, K) the query whose mask each target slot is compared with (in range).
    candidates: (B, K, C, 2) uniform candidates (C = int(num_points * oversample_ratio)).
    fresh: (B, K, num_points - num_uncertain, 2) uniform points appended as they are.
    num_uncertain: int(importance_sample_ratio * num_points).
  Returns:
    (B, K, num_points, 2): the most uncertain candidates, then the fresh points.
  """
  chosen = select_uncertain_points(pred_masks, query_index, candidates, num_uncertain)
  return jnp.concatenate([chosen, fresh], axis=2)  # (B, K, P, 2)


class PointCounts(NamedTuple):
  """How many points each stage draws (the official integer truncations)."""
  num_points: int  # matcher points per sample = loss points per mask
  num_candidates: int  # int(num_points * oversample_ratio)
  num_uncertain: int  # int(importance_sample_ratio * num_points)
  num_random: int  # num_points - num_uncertain


def point_counts(config: mlc.ConfigDict) -> PointCounts:
  """The point counts of a loss config, checked like the official asserts."""
  if config.num_points < 1:
    raise ValueError(f"loss config num_points={config.num_points} must be >= 1")
  if config.oversample_ratio < 1:
    raise ValueError(f"loss config oversample_ratio={config.oversample_ratio} must be >= 1")
  if not 0 <= config.importance_sample_ratio <= 1:
    raise ValueError(f"loss config importance_sample_ratio={config.importance_sample_ratio} "
                     "must be in [0, 1]")
  num_uncertain = int(config.importance_sample_ratio * config.num_points)
  return PointCounts(config.num_points, int(config.num_points * config.oversample_ratio),
                     num_uncertain, config.num_points - num_uncertain)


def random_points(rng: jax.Array, *, batch_size: int, num_targets: int, num_rounds: int,
                  counts: PointCounts) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Every uniform draw of the objective, from one key per example.

  Example b draws from (rng, b) only (`keyed_bits.uniform`, counter b), so its points do not
  depend on the batch size or on padding examples appended to the batch.

  Returns:
    matcher_points (R, B, P, 2), candidates (R, B, K, C, 2), fresh (R, B, K, P - U, 2), with
    R = num_rounds.
  """
  per_slot = counts.num_candidates + counts.num_random
  per_round = counts.num_points + num_targets * per_slot
  draws = jax.vmap(lambda b: keyed_bits.uniform(rng, b, (num_rounds, per_round, 2)))(
      jnp.arange(batch_size, dtype=jnp.uint32))  # (B, R, per_round, 2)
  draws = jnp.moveaxis(draws, 1, 0)  # (R, B, per_round, 2)
  matcher_points = draws[:, :, :counts.num_points]  # (R, B, P, 2)
  slots = draws[:, :, counts.num_points:].reshape(
      num_rounds, batch_size, num_targets, per_slot, 2)  # (R, B, K, C + P - U, 2)
  split = counts.num_candidates
  return matcher_points, slots[..., :split, :], slots[..., split:, :]


# ----------------------------------------------------------------------------------------------
# Matching


def pair_costs(pred_points: jax.Array, gt_points: jax.Array, refer_logits: jax.Array, *,
               cost_class: float, cost_mask: float, cost_dice: float) -> jax.Array:
  """The official matching cost of one sample (`hungarian_matcher_HierVG`).

  Args:
    pred_points: (N, P) query mask logits at the sample's shared points.
    gt_points: (K, P) target masks at the same points (soft labels in [0, 1]).
    refer_logits: (N, 2) referring logits; class 0 = referred.
  Returns:
    (N, K) float32 cost.
  """
  num_points = pred_points.shape[-1]
  x = pred_points.astype(jnp.float32)
  t = gt_points.astype(jnp.float32)
  bce = (jnp.matmul(jax.nn.softplus(-x), t.T, precision=_HIGHEST)
         + jnp.matmul(jax.nn.softplus(x), (1.0 - t).T, precision=_HIGHEST)) / num_points  # (N,K)
  prob = jax.nn.sigmoid(x)  # (N, P)
  numerator = 2.0 * jnp.matmul(prob, t.T, precision=_HIGHEST)  # (N, K)
  denominator = prob.sum(-1)[:, None] + t.sum(-1)[None, :]  # (N, K)
  dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)  # (N, K)
  referred = jax.nn.softmax(refer_logits.astype(jnp.float32), axis=-1)[:, 0:1]  # (N, 1)
  return cost_mask * bce + cost_class * -referred + cost_dice * dice


def matching_costs(pred_masks: jax.Array, refer_logits: jax.Array, gt_masks: jax.Array,
                   points: jax.Array, *, config: mlc.ConfigDict) -> jax.Array:
  """The official matching cost of one round for a batch, at given shared points.

  Args:
    pred_masks: (B, N, H, W) mask logits.
    refer_logits: (B, N, 2).
    gt_masks: (B, K, H', W') target masks (bool/uint8/float).
    points: (B, P, 2) normalised (x, y) shared by every mask of a sample (the official
      matcher's `torch.rand(1, num_points, 2)` per sample).
    config: the loss config (`cost_class`, `cost_mask`, `cost_dice`).
  Returns:
    (B, N, K) float32 costs, gradient stopped (the official matcher runs under no_grad).
  """
  b, n = pred_masks.shape[:2]
  k = gt_masks.shape[1]
  shared = points[:, None]  # (B, 1, P, 2)
  pred_points = sample_selected(pred_masks, jnp.broadcast_to(jnp.arange(n), (b, n)), shared)
  gt_points = sample_selected(gt_masks, jnp.broadcast_to(jnp.arange(k), (b, k)), shared)
  cost_fn = lambda p, g, l: pair_costs(p, g, l, cost_class=config.cost_class,  # noqa: E731
                                       cost_mask=config.cost_mask, cost_dice=config.cost_dice)
  costs = jax.vmap(cost_fn)(pred_points, gt_points, refer_logits)  # (B, N, K)
  return jax.lax.stop_gradient(costs)


def match_round(pred_masks: jax.Array, refer_logits: jax.Array, gt_masks: jax.Array,
                gt_valid: jax.Array, points: jax.Array, *,
                config: mlc.ConfigDict) -> matching.Assignment:
  """Hungarian matching of one round for a batch (`matching_costs` + the exact solver).

  Args:
    pred_masks, refer_logits, gt_masks, points, config: as in `matching_costs`.
    gt_valid: (B, K) bool; any K (K > N: at most N targets of a sample are matched).
  Returns:
    A batched `matching.Assignment` (every field has a leading B axis).
  """
  costs = matching_costs(pred_masks, refer_logits, gt_masks, points, config=config)
  return jax.vmap(matching.linear_sum_assignment)(costs, gt_valid)


# ----------------------------------------------------------------------------------------------
# Loss terms


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, 0 (with zero gradient) where the denominator is 0."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def mask_losses(pred_masks: jax.Array, gt_masks: jax.Array, query_index: jax.Array,
                pair_weight: jax.Array, points: jax.Array,
                num_masks: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """`loss_mask` (sigmoid BCE) and `loss_dice` of the matched pairs at given points.

  Args:
    pred_masks: (B, N, H, W) mask logits.
    gt_masks: (B, K, H', W') target masks.
    query_index: (B, K) matched query per target slot (anything where pair_weight is 0).
    pair_weight: (B, K) float, 1 for a real matched pair, 0 for padding or an unmatched
      target.
    points: (B, K, P, 2) the points of each pair (official: `loss_masks` point_coords).
    num_masks: () the normaliser.
  Returns:
    (loss_mask, loss_dice), each () float32: weighted sums over pairs / num_masks.
  """
  b, k = gt_masks.shape[:2]
  query = jnp.clip(query_index, 0, pred_masks.shape[1] - 1)  # (B, K)
  logits = sample_selected(pred_masks, query, points)  # (B, K, P)
  labels = sample_selected(gt_masks, jnp.broadcast_to(jnp.arange(k), (b, k)), points)  # (B,K,P)
  labels = jax.lax.stop_gradient(labels)
  bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)  # (B, K)
  prob = jax.nn.sigmoid(logits)  # (B, K, P)
  numerator = 2.0 * jnp.sum(prob * labels, axis=-1)  # (B, K)
  denominator = jnp.sum(prob, axis=-1) + jnp.sum(labels, axis=-1)  # (B, K)
  dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)  # (B, K)
  pair_weight = pair_weight.astype(jnp.float32)
  return jnp.sum(pair_weight * bce) / num_masks, jnp.sum(pair_weight * dice) / num_masks


def _check_groups(batch_size: int, num_groups: int) -> int:
  """The group size B / num_groups; a ValueError naming loss.official_world_size otherwise."""
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"loss.official_world_size={num_groups!r} must be an int >= 1")
  if batch_size % num_groups:
    raise ValueError(f"loss.official_world_size={num_groups} does not divide the global batch "
                     f"B={batch_size}: the official normaliser splits the batch into that many "
                     "equal per-GPU groups")
  return batch_size // num_groups


def active_groups(example_weight: jax.Array, num_groups: int) -> jax.Array:
  """(num_groups,) bool: the consecutive groups of the batch holding any example weight."""
  group_size = _check_groups(example_weight.shape[0], num_groups)
  group_weight = example_weight.astype(jnp.float32).reshape(num_groups, group_size)  # (W, G)
  return jnp.sum(group_weight, axis=1) > 0  # (W,)


def _mean_of_group_means(values: jax.Array, weight: jax.Array, example_weight: jax.Array,
                         num_groups: int) -> jax.Array:
  """Mean over the active groups of each group's weighted mean of `values`.

  Args:
    values, weight: (B, ...) per-element values and weights (0 for padding examples).
    example_weight: (B,) decides which groups take part.
    num_groups: W; the batch is W consecutive groups of B / W examples.
  Returns:
    () float32; 0 if no group is active.
  """
  _check_groups(values.shape[0], num_groups)
  weighted = (weight * values).reshape(num_groups, -1)  # (W, G * ...)
  weight = jnp.broadcast_to(weight, values.shape).reshape(num_groups, -1)  # (W, G * ...)
  group_mean = _safe_divide(jnp.sum(weighted, axis=1), jnp.sum(weight, axis=1))  # (W,)
  active = active_groups(example_weight, num_groups)  # (W,)
  return _safe_divide(jnp.sum(jnp.where(active, group_mean, 0.0)),
                      jnp.sum(active.astype(jnp.float32)))


def class_loss(refer_logits: jax.Array, query_matched: jax.Array, example_weight: jax.Array, *,
               no_object_weight: float, num_groups: int = 1) -> jax.Array:
  """Weighted 2-class cross-entropy over all queries (`F.cross_entropy(weight=empty_weight)`).

  Args:
    refer_logits: (B, N, 2); class 0 = referred.
    query_matched: (B, N) bool, the queries matched to a target (target class 0).
    example_weight: (B,) 1 real, 0 padding.
    no_object_weight: the class weight of class 1 (the official empty_weight[1]).
    num_groups: 1: one weighted mean over the batch; W > 1 (loss.normalizer "official"): the
      mean over the W consecutive groups (official GPUs) with any weight of each group's
      weighted mean.
  Returns:
    () sum(w * ce) / sum(w) (per group, then averaged over groups if num_groups > 1).
  """
  log_prob = jax.nn.log_softmax(refer_logits.astype(jnp.float32), axis=-1)  # (B, N, 2)
  ce = -jnp.where(query_matched, log_prob[..., 0], log_prob[..., 1])  # (B, N)
  weight = (jnp.where(query_matched, 1.0, no_object_weight)
            * example_weight.astype(jnp.float32)[:, None])  # (B, N)
  if num_groups == 1:
    return _safe_divide(jnp.sum(weight * ce), jnp.sum(weight))
  return _mean_of_group_means(ce, weight, example_weight, num_groups)


def existence_loss(existence_logit: jax.Array, exists: jax.Array, example_weight: jax.Array,
                   num_groups: int = 1) -> jax.Array:
  """BCE of the existence logit (B, 1) against exists (B,); weighted batch mean, ().

  num_groups > 1 (loss.normalizer "official"): the mean over the consecutive groups with any
  weight of each group's weighted mean.
  """
  logit = existence_logit.reshape(-1).astype(jnp.float32)  # (B,)
  weight = example_weight.astype(jnp.float32)  # (B,)
  bce = optax.sigmoid_binary_cross_entropy(logit, exists.astype(jnp.float32))  # (B,)
  if num_groups == 1:
    return _safe_divide(jnp.sum(weight * bce), jnp.sum(weight))
  return _mean_of_group_means(bce, weight, weight, num_groups)


# ----------------------------------------------------------------------------------------------
# The objective

# (pred_masks, query_index (B, K), a round's point data) -> (B, K, P, 2) points of each pair.
MaskPointsFn = Callable[[jax.Array, jax.Array, object], jax.Array]


def _check_config(config: mlc.ConfigDict) -> None:
  missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in config]
  if missing:
    raise KeyError(f"loss config lacks {missing}; start from losses.default_loss_config()")
  if config.normalizer not in NORMALIZERS:
    raise ValueError(f"loss.normalizer={config.normalizer!r} must be one of {NORMALIZERS}")
  world_size = config.official_world_size
  if not isinstance(world_size, int) or world_size < 1:
    raise ValueError(f"loss.official_world_size={world_size!r} must be an int >= 1")


def _num_groups(config: mlc.ConfigDict, batch_size: int) -> int:
  """How many consecutive groups the normalisers treat separately (1 under "global")."""
  if config.normalizer == "global":
    return 1
  _check_groups(batch_size, config.official_world_size)
  return config.official_world_size


def _check_shapes(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array]) -> None:
  """Raises a ValueError naming the key whose shape disagrees with the others."""
  for name, group, keys in (
      ("outputs", outputs, ("pred_masks", "refer_logits", "existence_logit", "aux_pred_masks",
                            "aux_refer_logits")),
      ("targets", targets, ("gt_masks", "gt_valid", "exists", "weight"))):
    missing = [k for k in keys if k not in group]
    if missing:
      raise KeyError(f"deris_loss: {name} lacks {missing} (has {sorted(group)})")
  pred = outputs["pred_masks"].shape
  if len(pred) != 4:
    raise ValueError(f"deris_loss: outputs['pred_masks'] must be (B, N, H, W), got {pred}")
  b, n = pred[:2]
  gt = targets["gt_masks"].shape
  if len(gt) != 4 or gt[0] != b:
    raise ValueError(f"deris_loss: targets['gt_masks'] must be (B={b}, K, H, W), got {gt}")
  k = gt[1]
  aux = outputs["aux_pred_masks"].shape
  num_aux = aux[0] if len(aux) == 5 else -1
  expected = {
      ("outputs", "refer_logits"): (b, n, 2),
      ("outputs", "existence_logit"): (b, 1),
      ("outputs", "aux_pred_masks"): (num_aux,) + pred,
      ("outputs", "aux_refer_logits"): (num_aux, b, n, 2),
      ("targets", "gt_valid"): (b, k),
      ("targets", "exists"): (b,),
      ("targets", "weight"): (b,),
  }
  for (name, key), shape in expected.items():
    got = (outputs if name == "outputs" else targets)[key].shape
    if tuple(got) != shape:
      raise ValueError(f"deris_loss: {name}['{key}'] has shape {tuple(got)}, expected {shape} "
                       f"(pred_masks {pred}, gt_masks {gt})")


def _round_suffix(round_index: int, num_rounds: int) -> str:
  """The official key suffix: '' for the final round, '_i' for auxiliary round i."""
  return "" if round_index == num_rounds - 1 else f"_{round_index}"


def _rounds(aux: jax.Array, final: jax.Array) -> jax.Array:
  """(R, ...) auxiliary rounds and the (...) final round -> (R+1, ...) in round order."""
  return jnp.concatenate([aux, final[None]])


def _objective(outputs, targets, config, matcher_points: jax.Array, mask_point_data,
               mask_points_fn: MaskPointsFn) -> Tuple[jax.Array, Metrics]:
  """The objective given the matcher points (R+1, B, P, 2) and the per-round mask point data.

  `mask_point_data` is a pytree whose leaves have a leading round axis (R+1); the slice of a
  round goes to `mask_points_fn(pred_masks, query_index, data)` -> (B, K, P, 2).

  Every round's matching costs and loss terms are one `jax.vmap` over the round axis: one
  compiled body whose operations are R+1 times larger. A `lax.map` over the auxiliary rounds
  beside the final round compiled the body twice and stacked every round's mask gradient
  inside a loop; the vmap holds all rounds' point samples at once instead (DeRIS-B at the
  released batch 16: XLA's estimate 18.22 -> 18.41 GiB per device; BENCHMARKS.md "The loss
  without a sort and with its rounds vmapped").
  """
  num_aux = outputs["aux_pred_masks"].shape[0]
  pred_masks = _rounds(outputs["aux_pred_masks"], outputs["pred_masks"])  # (R+1, B, N, H, W)
  refer_logits = _rounds(outputs["aux_refer_logits"], outputs["refer_logits"])  # (R+1, B, N, 2)
  gt_masks, gt_valid = targets["gt_masks"], targets["gt_valid"].astype(bool)
  example_weight = targets["weight"].astype(jnp.float32)  # (B,)
  target_weight = gt_valid * example_weight[:, None]  # (B, K) every real target, matched or not
  num_groups = _num_groups(config, example_weight.shape[0])
  # The mask/dice normaliser counts all targets: max(T, 1), or max(T, W) for the official DDP
  # objective (W = the groups with any weight; the official (1/W) sum_g sum_g / max(T/W, 1)).
  floor = (1.0 if num_groups == 1 else
           jnp.maximum(jnp.sum(active_groups(example_weight, num_groups)), 1).astype(jnp.float32))
  num_masks = jnp.maximum(jnp.sum(target_weight), floor)

  # Every round's (small) cost matrix, then one batched exact solve for all rounds.
  def round_costs(pred_masks, refer_logits, points):
    return matching_costs(pred_masks, refer_logits, gt_masks, points, config=config)

  costs = jax.vmap(round_costs)(pred_masks, refer_logits, matcher_points)  # (R+1, B, N, K)
  solve = jax.vmap(jax.vmap(matching.linear_sum_assignment), in_axes=(0, None))
  assignments = solve(costs, gt_valid)  # fields (R+1, B, ...)
  query_index = jnp.maximum(assignments.query_for_target, 0)  # (R+1, B, K), 0 if unmatched

  def round_terms(pred_masks, refer_logits, query, matched, target_matched, point_data):
    points = mask_points_fn(pred_masks, query, point_data)  # (B, K, P, 2)
    pair_weight = target_weight * target_matched  # (B, K) real and matched
    loss_mask, loss_dice = mask_losses(pred_masks, gt_masks, query, pair_weight, points,
                                       num_masks)
    loss_cls = class_loss(refer_logits, matched, example_weight,
                          no_object_weight=config.no_object_weight, num_groups=num_groups)
    return jnp.stack([loss_cls, loss_mask, loss_dice])  # (3,)

  terms = jax.vmap(round_terms)(pred_masks, refer_logits, query_index,
                                assignments.query_matched, assignments.target_matched,
                                mask_point_data)  # (R+1, 3)

  round_scale = jnp.array([config.aux_weight] * num_aux + [1.0], jnp.float32)  # (R+1,)
  term_weight = jnp.array([config.class_weight, config.mask_weight, config.dice_weight],
                          jnp.float32)  # (3,)
  weighted = terms * round_scale[:, None] * term_weight  # (R+1, 3)
  total_class = jnp.sum(weighted[:, 0])
  total_mask = jnp.sum(weighted[:, 1:])
  metrics = {}
  for r in range(num_aux + 1):
    suffix = _round_suffix(r, num_aux + 1)
    for t, name in enumerate(("class", "mask", "dice")):
      metrics[f"raw/loss_{name}{suffix}"] = terms[r, t]

  loss_exist = existence_loss(outputs["existence_logit"], targets["exists"], example_weight,
                              num_groups)
  total_exist = config.existence_weight * loss_exist
  total = total_class + total_mask + total_exist
  metrics.update({"raw/loss_label_nt": loss_exist, "total/loss_class": total_class,
                  "total/loss_mask": total_mask, "total/loss_label_nt": total_exist,
                  "loss": total, "num_masks": num_masks})
  return total, metrics


def deris_loss(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
               rng: jax.Array, *, config: mlc.ConfigDict) -> Tuple[jax.Array, Metrics]:
  """The DeRIS training loss of a (global) batch; jit-able, static shapes.

  Args:
    outputs: `pred_masks` (B, N, H, W) final-round mask logits, `refer_logits` (B, N, 2),
      `existence_logit` (B, 1), `aux_pred_masks` (R, B, N, H, W) and `aux_refer_logits`
      (R, B, N, 2) for the auxiliary rounds 0..R-1.
    targets: `gt_masks` (B, K, H', W') referred-instance masks (bool/uint8/float), any K
      (a sample with more than N valid targets matches N of them; `num_masks` counts all),
      `gt_valid` (B, K) bool, `exists` (B,) int, `weight` (B,) float (1 real, 0 padding).
    rng: a PRNG key for the random points.
    config: the loss config (`default_loss_config()`).
  Returns:
    (total loss (), metrics): `raw/loss_{class,mask,dice}[_r]` unweighted per round (no suffix
    = final), `raw/loss_label_nt`, the weighted `total/loss_{class,mask,label_nt}`, `loss`
    (their sum) and `num_masks` (the effective mask/dice normaliser, see the module doc).
  """
  _check_config(config)
  _check_shapes(outputs, targets)
  counts = point_counts(config)
  matcher_points, candidates, fresh = random_points(
      rng, batch_size=outputs["pred_masks"].shape[0], num_targets=targets["gt_masks"].shape[1],
      num_rounds=outputs["aux_pred_masks"].shape[0] + 1, counts=counts)

  def mask_points(pred_masks, query_index, draws):
    return importance_points(pred_masks, query_index, *draws, num_uncertain=counts.num_uncertain)

  return _objective(outputs, targets, config, matcher_points, (candidates, fresh), mask_points)


def deris_loss_at_points(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array], *,
                         matcher_points: jax.Array, mask_points: jax.Array,
                         config: mlc.ConfigDict) -> Tuple[jax.Array, Metrics]:
  """`deris_loss` with every random point given (to reproduce the official numbers).

  Args:
    outputs, targets, config: as in `deris_loss`.
    matcher_points: (R+1, B, P, 2) the matcher's shared points, round order 0..R (R = final).
    mask_points: (R+1, B, K, P', 2) the loss points of each (example, target slot) pair.
  """
  _check_config(config)
  _check_shapes(outputs, targets)
  num_rounds = outputs["aux_pred_masks"].shape[0] + 1
  for name, points in (("matcher_points", matcher_points), ("mask_points", mask_points)):
    if points.shape[0] != num_rounds:
      raise ValueError(f"deris_loss_at_points: {name} has {points.shape[0]} rounds, expected "
                       f"{num_rounds} (aux rounds + final), shape {points.shape}")
  return _objective(outputs, targets, config, matcher_points, mask_points,
                    lambda pred_masks, query_index, points: points)
