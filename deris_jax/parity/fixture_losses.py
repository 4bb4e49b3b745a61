"""The official loss pass recorded in a fixture: its fake targets, random points and matches,
laid out as `deris_jax.losses` takes them, and the loss values deris-jax computes from them.

A fixture's `inputs.npz` holds fake targets (`target.sample{b}.masks|refer_index|exists`) and its
`outputs.npz` the random points the official matcher and PointRend sampler drew
(`loss.{stage}.matcher.b{b}.point_coords`, `loss.{stage}.loss_masks.point_coords`), the
Hungarian matches (`loss.{stage}.indices.b{b}.query|target`) and the loss values
(`loss.raw.*`, `loss.total.*`). Stages aux0, aux1, aux2, final are rounds 0..3.
"""
import dataclasses
from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deris_jax import losses
from deris_jax.ops import resize

STAGES = ("aux0", "aux1", "aux2", "final")  # round order 0..3

# Fixture loss keys deris-jax does not produce, with the reason.
NOT_PRODUCED = {
    r"point_coords$": "the official run's random points: inputs of the loss check",
    r"loss\.raw\.loss_(bbox|giou)": "box losses: weight 0 / dropped key in the official "
                                    "criterion, not computed",
    r"loss\.total\.loss_(det|perp)$": "constant 0 in the official objective, not computed",
}


@dataclasses.dataclass
class OfficialLossPass:
  targets: Dict[str, np.ndarray]  # gt_masks (B,K,H,W), gt_valid (B,K), exists (B,), weight (B,)
  matcher_points: np.ndarray  # (R+1, B, P, 2)
  mask_points: np.ndarray  # (R+1, B, K, P, 2)
  query_for_target: Dict[str, np.ndarray]  # stage -> (B, K) matched query per slot, -1 empty


def official_loss_pass(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                       num_slots: int = 0) -> OfficialLossPass:
  """Targets, points and matches of the fixture's loss pass.

  Args:
    num_slots: target slots K (at least the largest target count; more exercises padding).
  """
  b = inputs["perception_image"].shape[0]
  h, w = inputs["perception_image"].shape[-2:]
  refer = [inputs[f"target.sample{i}.refer_index"] for i in range(b)]
  k = max(num_slots, max(len(r) for r in refer), 1)
  gt_masks = np.zeros((b, k, h, w), np.uint8)
  gt_valid = np.zeros((b, k), bool)
  for i in range(b):
    masks = inputs[f"target.sample{i}.masks"][refer[i]]
    gt_masks[i, :len(masks)] = masks
    gt_valid[i, :len(masks)] = True
  targets = dict(gt_masks=gt_masks, gt_valid=gt_valid,
                 exists=np.array([inputs[f"target.sample{i}.exists"] for i in range(b)],
                                 np.int32),
                 weight=np.ones((b,), np.float32))
  matcher_points = np.stack([np.stack([outputs[f"loss.{s}.matcher.b{i}.point_coords"]
                                       for i in range(b)]) for s in STAGES])  # (R+1, B, P, 2)
  num_points = matcher_points.shape[2]
  # The official per-mask points are listed by (sample, matched query ascending), the order of
  # the recorded indices; each goes to its (sample, target slot). Empty slots get unused points.
  mask_points = np.full((len(STAGES), b, k, num_points, 2), 0.5, np.float32)
  query_for_target = {}
  for r, stage in enumerate(STAGES):
    listed = outputs[f"loss.{stage}.loss_masks.point_coords"]
    row = 0
    assigned = np.full((b, k), -1, np.int64)
    for i in range(b):
      slots = outputs[f"loss.{stage}.indices.b{i}.target"]
      assigned[i, slots] = outputs[f"loss.{stage}.indices.b{i}.query"]
      for slot in slots:
        mask_points[r, i, slot] = listed[row]
        row += 1
    if row != len(listed):
      raise ValueError(f"fixture: {stage} lists {len(listed)} mask point sets for {row} matches")
    query_for_target[stage] = assigned
  return OfficialLossPass(targets, matcher_points, mask_points, query_for_target)


def model_loss_outputs(taps: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The loss inputs from a forward's taps: final masks at input resolution, aux rounds
  upsampled x4 (align_corners=True) as the official decoder does."""
  num_rounds = sum(1 for k in taps if k.startswith("decoder.round") and k.endswith(".mask_logits"))
  h, w = taps["final.pred_masks"].shape[-2:]
  up = lambda x: np.asarray(resize.resize_bilinear(jnp.asarray(x), (h, w), align_corners=True))
  aux = range(num_rounds - 1)
  return dict(
      pred_masks=taps["final.pred_masks"], refer_logits=taps["final.refer_logits"],
      existence_logit=taps["final.pred_existence"],
      aux_pred_masks=np.stack([up(taps[f"decoder.round{r}.mask_logits"]) for r in aux]),
      aux_refer_logits=np.stack([taps[f"decoder.round{r}.refer_logits"] for r in aux]))


def loss_values(outputs: Mapping[str, np.ndarray], loss_pass: OfficialLossPass,
                config=None) -> Dict[str, np.ndarray]:
  """deris-jax's matches and loss terms under the fixture's names (`loss.*`)."""
  config = config or losses.default_loss_config()
  targets = loss_pass.targets
  _, metrics = jax.jit(lambda o, t, mp, kp: losses.deris_loss_at_points(
      o, t, matcher_points=mp, mask_points=kp, config=config))(
          outputs, targets, loss_pass.matcher_points, loss_pass.mask_points)
  out = {}
  for name, value in metrics.items():
    kind, _, key = name.partition("/")
    if kind == "total" or (kind == "raw" and key != "loss_label_nt"):
      out[f"loss.{kind}.{key}"] = np.asarray(value, np.float32)
  match = jax.jit(lambda m, l, g, v, p: losses.match_round(m, l, g, v, p, config=config))
  rounds = [(outputs["aux_pred_masks"][r], outputs["aux_refer_logits"][r])
            for r in range(len(STAGES) - 1)] + [(outputs["pred_masks"], outputs["refer_logits"])]
  for r, (stage, (masks, logits)) in enumerate(zip(STAGES, rounds)):
    assignment = match(masks, logits, targets["gt_masks"], targets["gt_valid"],
                       loss_pass.matcher_points[r])
    query_for_target = np.asarray(assignment.query_for_target)
    for i in range(query_for_target.shape[0]):
      slots = np.nonzero(query_for_target[i] >= 0)[0]
      order = np.argsort(query_for_target[i][slots], kind="stable")  # official: query ascending
      out[f"loss.{stage}.indices.b{i}.query"] = query_for_target[i][slots][order].astype(np.int32)
      out[f"loss.{stage}.indices.b{i}.target"] = slots[order].astype(np.int32)
  return out


def official_loss_outputs(fixture, taps: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Parity hook: the loss keys of a fixture recomputed from deris-jax's own forward."""
  if not any(k.startswith("loss.") for k in fixture.outputs):
    return {}
  loss_pass = official_loss_pass(fixture.inputs, fixture.outputs)
  return loss_values(model_loss_outputs(taps), loss_pass)
