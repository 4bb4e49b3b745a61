"""Inference post-processing: per-query outputs -> one mask and a no-target decision per sample.

What the official code does (`mix_gref_hiervg_mr_loopback.py::get_predictions_parts`,
`deris/evaluations/grefcoco.py`, docs/design.md §5):
  score_n   = softmax(refer_logits_n)[0]                         (class 0 = "referred")
  mask      = OR over queries with score_n > tau of (sigmoid(mask_logits_n) >= 0.5)
  no_target = no query has score_n > tau                         (then the mask is empty)
The existence head is trained but unused; the corrected model may let it veto
(`existence_veto=True`: sigmoid(existence_logit) < existence_threshold -> no target, empty mask).

Resolution. The official protocol evaluates at the model resolution (384x384) against ground
truth resized with nearest neighbour; the logits are simply used as they are. For evaluation at
the original image size, `resize_logits_to_canvas` resizes each sample's logits (bilinear,
align_corners=False, like `F.interpolate`) to its own (h, w) inside a static (Hc, Wc) canvas,
so a batch of differently sized images keeps one static shape under jit; threshold afterwards.
The official pipeline resizes images without keeping the aspect ratio and without padding, so
the logits cover the whole original image.

All functions are pure, shape-static and jit-able; thresholds may be traced scalars, the
boolean switches must be static.

The device program of an evaluation or a prediction is here too: `forward_fn` (the jitted
forward of a model structure) and `sample_counts` (per-sample intersection, areas, decisions
and scores at several taus, the only numbers an evaluation brings back to the host).
"""
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from deris_jax import batch as batch_lib
from deris_jax import cpu_options
from deris_jax import forward

Threshold = Union[float, jax.Array]

# Logit written outside an image's own (h, w) on the canvas: sigmoid is exactly 0 in float32,
# so those pixels never enter a mask, and it stays finite (safe to resize or average again).
OUTSIDE_LOGIT = -1e4


def _check_shape(name: str, x: jax.Array, ndim: int, expected: str) -> None:
  if x.ndim != ndim:
    raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")


def refer_scores(refer_logits: jax.Array) -> jax.Array:
  """(B, N, 2) referring logits -> (B, N) float32 scores softmax(...)[..., 0]."""
  refer_logits = jnp.asarray(refer_logits)
  if refer_logits.ndim < 1 or refer_logits.shape[-1] != 2:
    raise ValueError(f"refer_logits must be (B, N, 2), got shape {tuple(refer_logits.shape)}")
  return jax.nn.softmax(refer_logits.astype(jnp.float32), axis=-1)[..., 0]  # (B, N)


def query_masks(mask_logits: jax.Array, mask_threshold: Threshold = 0.5) -> jax.Array:
  """Per-query binary masks: sigmoid(logit) >= mask_threshold, computed in float32.

  The official code thresholds the float32 sigmoid, not the logit; they differ for small
  negative logits (down to about -1.8e-7), whose float32 sigmoid rounds to exactly 0.5.
  """
  probs = jax.nn.sigmoid(jnp.asarray(mask_logits).astype(jnp.float32))
  return probs >= jnp.asarray(mask_threshold, jnp.float32)


def predict(mask_logits: jax.Array, refer_logits: jax.Array, existence_logit: jax.Array, *,
            score_threshold: Threshold, mask_threshold: Threshold = 0.5,
            existence_veto: bool = False,
            existence_threshold: Threshold = 0.5) -> Dict[str, jax.Array]:
  """Union mask and no-target decision of each sample.

  Args:
    mask_logits: (B, N, H, W) per-query mask logits (any float dtype).
    refer_logits: (B, N, 2) referring logits.
    existence_logit: (B, 1) existence-head logit (used only with `existence_veto`).
    score_threshold: tau; a query is selected when its float32 score is > tau (strict).
    mask_threshold: a pixel of a query mask is on when sigmoid(logit) >= this.
    existence_veto: static; if True, sigmoid(existence_logit) < existence_threshold forces
      no target and an empty mask (corrected model only; the official model never does this).
    existence_threshold: see `existence_veto`.
  Returns:
    dict(mask=(B, H, W) bool, no_target=(B,) bool, scores=(B, N) float32,
         existence_prob=(B,) float32).
  """
  mask_logits = jnp.asarray(mask_logits)
  refer_logits = jnp.asarray(refer_logits)
  existence_logit = jnp.asarray(existence_logit)
  _check_shape("mask_logits", mask_logits, 4, "(B, N, H, W)")
  batch, num_queries = mask_logits.shape[:2]
  if refer_logits.shape != (batch, num_queries, 2):
    raise ValueError(f"refer_logits must be (B, N, 2) = ({batch}, {num_queries}, 2) to match "
                     f"mask_logits {tuple(mask_logits.shape)}, got {tuple(refer_logits.shape)}")
  if existence_logit.shape != (batch, 1):
    raise ValueError(f"existence_logit must be (B, 1) = ({batch}, 1), got "
                     f"{tuple(existence_logit.shape)}")

  scores = refer_scores(refer_logits)  # (B, N)
  selected = scores > jnp.asarray(score_threshold, jnp.float32)  # (B, N)
  binary = query_masks(mask_logits, mask_threshold)  # (B, N, H, W)
  mask = jnp.any(binary & selected[:, :, None, None], axis=1)  # (B, H, W)
  no_target = ~jnp.any(selected, axis=1)  # (B,)
  existence_prob = jax.nn.sigmoid(existence_logit[:, 0].astype(jnp.float32))  # (B,)
  if existence_veto:
    vetoed = existence_prob < jnp.asarray(existence_threshold, jnp.float32)  # (B,)
    no_target = no_target | vetoed
    mask = mask & ~vetoed[:, None, None]
  return dict(mask=mask, no_target=no_target, scores=scores, existence_prob=existence_prob)


def score_map(mask_logits: jax.Array, refer_logits: jax.Array, *,
              mask_threshold: Threshold = 0.5) -> jax.Array:
  """(B, H, W) float32: the highest score of the queries whose binary mask covers each pixel.

  -inf where no query covers the pixel. For every tau, `score_map(...) > tau` equals
  `predict(..., score_threshold=tau)['mask']`, which lets `metrics.TauSweep` evaluate a grid
  of thresholds from one forward pass while moving only (B, H, W) floats to the host.
  """
  mask_logits = jnp.asarray(mask_logits)
  _check_shape("mask_logits", mask_logits, 4, "(B, N, H, W)")
  scores = refer_scores(refer_logits)  # (B, N)
  if scores.shape != mask_logits.shape[:2]:
    raise ValueError(f"refer_logits {tuple(jnp.shape(refer_logits))} do not match mask_logits "
                     f"{tuple(mask_logits.shape)} in (B, N)")
  binary = query_masks(mask_logits, mask_threshold)  # (B, N, H, W)
  covered = jnp.where(binary, scores[:, :, None, None], -jnp.inf)  # (B, N, H, W)
  return jnp.max(covered, axis=1)  # (B, H, W)


def _check_orig_hw(orig_hw, canvas_hw: Tuple[int, int]) -> None:
  """Validates sizes that are known on the host; traced sizes cannot be checked."""
  try:
    sizes = np.asarray(orig_hw)
  except jax.errors.TracerArrayConversionError:
    return
  if sizes.ndim != 2 or sizes.shape[1] != 2:
    raise ValueError(f"orig_hw must be (B, 2) (height, width), got shape {sizes.shape}")
  too_small = (sizes < 1).any(axis=1)
  too_large = (sizes > np.asarray(canvas_hw)[None, :]).any(axis=1)
  if too_small.any() or too_large.any():
    bad = int(np.flatnonzero(too_small | too_large)[0])
    raise ValueError(f"orig_hw[{bad}] = {sizes[bad].tolist()} must be within [1, 1] .. "
                     f"{list(canvas_hw)} (the canvas)")


def _interpolation_weights(in_size: int, out_sizes: jax.Array, canvas: int) -> jax.Array:
  """(B, canvas, in_size) float32 weights of PyTorch linear interpolation, align_corners=False.

  Row d of sample b interpolates output pixel d of an `out_sizes[b]`-long axis, computed like
  PyTorch's float32 kernel: src = max((d + 0.5) * in/out - 0.5, 0). Rows d >= out_sizes[b]
  are zero. Not `jax.image.scale_and_translate`, which takes a traced scale but gets in/out
  back as 1 / (out/in), rounded twice: vmapped over the batch on the CPU it drifts 1e-4 from
  torch on the 7x9 -> 37x50 case of tests/data/torch_ops_ref.npz, where this stays at 3e-5.
  """
  out = jnp.maximum(out_sizes.astype(jnp.float32), 1.0)[:, None]  # (B, 1)
  dst = jnp.arange(canvas, dtype=jnp.float32)[None, :]  # (1, canvas)
  src = jnp.maximum((dst + 0.5) * (jnp.float32(in_size) / out) - 0.5, 0.0)  # (B, canvas)
  lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)  # (B, canvas)
  hi = jnp.minimum(lo + 1, in_size - 1)  # (B, canvas)
  frac = src - lo.astype(jnp.float32)  # (B, canvas)
  weights = (jax.nn.one_hot(lo, in_size, dtype=jnp.float32) * (1.0 - frac)[..., None]
             + jax.nn.one_hot(hi, in_size, dtype=jnp.float32) * frac[..., None])  # (B, canvas, in)
  inside = dst < out_sizes.astype(jnp.float32)[:, None]  # (B, canvas)
  return jnp.where(inside[..., None], weights, 0.0)


def canvas_valid_mask(orig_hw: jax.Array, canvas_hw: Sequence[int]) -> jax.Array:
  """(B, Hc, Wc) bool: True inside each sample's own (h, w) at the top-left of the canvas."""
  canvas_h, canvas_w = (int(v) for v in canvas_hw)
  _check_orig_hw(orig_hw, (canvas_h, canvas_w))
  orig_hw = jnp.asarray(orig_hw, jnp.int32)
  rows = jnp.arange(canvas_h)[None, :] < orig_hw[:, 0:1]  # (B, Hc)
  cols = jnp.arange(canvas_w)[None, :] < orig_hw[:, 1:2]  # (B, Wc)
  return rows[:, :, None] & cols[:, None, :]  # (B, Hc, Wc)


def resize_logits_to_canvas(logits: jax.Array, orig_hw: jax.Array, canvas_hw: Sequence[int], *,
                            fill_logit: float = OUTSIDE_LOGIT) -> jax.Array:
  """Resizes each sample's logits to its own original size, on a static canvas.

  Sample b is resized bilinearly (PyTorch `F.interpolate`, align_corners=False) from (h, w)
  to orig_hw[b] and written at the top-left of a (Hc, Wc) canvas; the rest is `fill_logit`.

  Args:
    logits: (B, N, h, w) mask logits (any float dtype).
    orig_hw: (B, 2) int (height, width) of each original image, 1 <= size <= canvas; may be
      traced (checked only when given as host values).
    canvas_hw: static (Hc, Wc), e.g. (640, 640) for COCO.
    fill_logit: the logit outside an image (default: sigmoid exactly 0).
  Returns:
    (B, N, Hc, Wc) float32 logits.
  """
  logits = jnp.asarray(logits)
  _check_shape("logits", logits, 4, "(B, N, h, w)")
  canvas_h, canvas_w = (int(v) for v in canvas_hw)
  _check_orig_hw(orig_hw, (canvas_h, canvas_w))
  orig_hw = jnp.asarray(orig_hw, jnp.int32)
  if orig_hw.shape != (logits.shape[0], 2):
    raise ValueError(f"orig_hw must be (B, 2) = ({logits.shape[0]}, 2), got "
                     f"{tuple(orig_hw.shape)}")
  in_h, in_w = logits.shape[2:]
  weights_h = _interpolation_weights(in_h, orig_hw[:, 0], canvas_h)  # (B, Hc, h)
  weights_w = _interpolation_weights(in_w, orig_hw[:, 1], canvas_w)  # (B, Wc, w)
  highest = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("bHh,bnhw->bnHw", weights_h, logits.astype(jnp.float32),
                    precision=highest)  # (B, N, Hc, w)
  resized = jnp.einsum("bnHw,bWw->bnHW", rows, weights_w, precision=highest)  # (B, N, Hc, Wc)
  inside = canvas_valid_mask(orig_hw, (canvas_h, canvas_w))  # (B, Hc, Wc)
  return jnp.where(inside[:, None], resized, jnp.float32(fill_logit))


# ------------------------------------------------------------------------------------------
# The device program of evaluation and prediction.
# ------------------------------------------------------------------------------------------
def model_inputs(batch: Mapping[str, Any]) -> Tuple[Any, ...]:
  """The forward's positional inputs taken from a pipeline batch, in order."""
  return tuple(batch[k] for k in batch_lib.MODEL_INPUTS)


# (graphdef, compiler options, jitted forward); a list: GraphDef is unhashable.
_FORWARDS: List[Tuple[Any, Any, Callable]] = []


def forward_fn(graphdef) -> Callable:
  """The jitted inference forward of a model structure, compiled once per structure and shape.

  Returns fn(params, image, image_mini, text_ids, text_padding_mask) (`model_inputs` order;
  params as `forward.apply` takes them) ->
  (pred_masks (B, N, H, W) f32, refer_logits (B, N, 2), existence_logit (B, 1)).
  """
  options = cpu_options.compiler_options()
  for known, known_options, fn in _FORWARDS:
    if known == graphdef and known_options == options:
      return fn

  def forward_outputs(params, *inputs):
    batch = dict(zip(batch_lib.MODEL_INPUTS, inputs, strict=True))
    out = forward.apply(graphdef, params, batch)
    return out.pred_masks, out.refer_logits, out.existence_logit

  fn = jax.jit(forward_outputs, compiler_options=options)
  _FORWARDS.append((graphdef, options, fn))
  return fn


@jax.jit
def _sample_counts_reference(outputs, targets, taus, mask_threshold, existence_threshold,
                             existence_veto):
  return _counts(outputs, targets["gt_mask"].astype(bool), taus, mask_threshold,
                 existence_threshold, existence_veto)


@jax.jit
def _sample_counts_original(outputs, targets, taus, mask_threshold, existence_threshold,
                            existence_veto):
  pred_masks, refer_logits, existence_logit = outputs
  gt = targets["gt_mask_orig"].astype(bool)  # (B, Hc, Wc)
  resized = resize_logits_to_canvas(pred_masks, targets["orig_hw"],
                                              gt.shape[1:])  # (B, N, Hc, Wc)
  return _counts((resized, refer_logits, existence_logit), gt, taus, mask_threshold,
                 existence_threshold, existence_veto)


def _counts(outputs, gt, taus, mask_threshold, existence_threshold, existence_veto):
  pred_masks, refer_logits, existence_logit = outputs
  pixel_scores = score_map(pred_masks, refer_logits,
                                     mask_threshold=mask_threshold)  # (B, H, W)
  scores = refer_scores(refer_logits)  # (B, N)
  existence_prob = jax.nn.sigmoid(existence_logit[:, 0].astype(jnp.float32))  # (B,)
  # existence_veto is a traced bool so both settings share one program.
  vetoed = existence_veto & (existence_prob < existence_threshold)  # (B,)
  pixel_scores = jnp.where(vetoed[:, None, None], -jnp.inf, pixel_scores)  # (B, H, W)
  taus = taus.astype(jnp.float32)  # (T,)
  pred = pixel_scores[:, None] > taus[None, :, None, None]  # (B, T, H, W)
  max_score = jnp.max(scores, axis=1)  # (B,)
  return dict(
      intersection=jnp.sum(pred & gt[:, None], axis=(2, 3), dtype=jnp.int32),  # (B, T)
      pred_area=jnp.sum(pred, axis=(2, 3), dtype=jnp.int32),  # (B, T)
      gt_area=jnp.sum(gt, axis=(1, 2), dtype=jnp.int32),  # (B,)
      no_target=~(max_score[:, None] > taus[None]) | vetoed[:, None],  # (B, T)
      scores=scores,  # (B, N)
      existence_prob=existence_prob)  # (B,)


SAMPLE_COUNTS = {"reference": _sample_counts_reference, "original": _sample_counts_original}


def device_targets(batch: Mapping[str, np.ndarray], resolution: str) -> Dict[str, np.ndarray]:
  """The ground truth the device step needs (the union over instances is taken on the host)."""
  if resolution == "original":
    return {"gt_mask_orig": batch["gt_mask_orig"], "orig_hw": batch["orig_hw"]}
  return {"gt_mask": batch["gt_masks"].max(axis=1)}  # (B, H, W) uint8


def sample_counts(outputs, targets, *, resolution: str, taus: Sequence[float],
                  mask_threshold: float, existence_threshold: float,
                  existence_veto: bool) -> Dict[str, jax.Array]:
  """Per-sample counts at every tau of `taus` (see `_counts`); `targets` from `device_targets`.

  One compiled program per resolution: the thresholds and the veto switch are traced.
  """
  return SAMPLE_COUNTS[resolution](
      outputs, targets, jnp.asarray(taus, jnp.float32), jnp.float32(mask_threshold),
      jnp.float32(existence_threshold), jnp.bool_(existence_veto))
