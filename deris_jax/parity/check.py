"""Runs the official fixture through deris-jax and compares every tensor it recorded.

A fixture directory (format of ../shared/fixtures/deris_tiny) holds `config.json` (the official
model configuration), `state_dict.safetensors` (official key names), `inputs.npz` and
`outputs.npz` (intermediate and final tensors captured from the official forward). The model is
built from config.json (nothing about a particular fixture is hard-coded), the state dict is
converted, and the forward runs on the inputs (the whole batch, then each sample alone). A float
tensor passes within atol + rtol·|ref| (1e-4 + 1e-4; boxes in pixels: 2e-2); an integer or
boolean tensor must be equal. `python -m deris_jax.parity` prints the comparison.
"""
import dataclasses
import json
import pathlib
import re
from typing import Dict, List, Optional, Tuple, Union

import jax
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from deris_jax import forward
from deris_jax.convert import deris_checkpoint
from deris_jax.models.deris import build_model
from deris_jax.parity import fixture_losses

ATOL, RTOL, BOX_ATOL = 1e-4, 1e-4, 2e-2


def _number(value) -> float:
  """Parses '0.3 (inactive in eval)' or 0.3 -> 0.3."""
  return float(str(value).split()[0])


def model_config_from_fixture(cfg: dict) -> ml_collections.ConfigDict:
  """The deris-jax `config.model` equivalent to a fixture's config.json.

  Every size comes from config.json; the few fields it has no counterpart for are set to what
  the official model computes (float32, its quirks, no existence veto) or to layout choices
  that do not change the numbers (no remat, no scan). Built here, not from configs/, so the
  comparison depends on the fixture alone; tests/test_parity.py checks that
  configs/deris_tiny.py gives this same section for the tiny fixture.
  """
  dec, pd, sw, bt, und = cfg["decoder"], cfg["pixel_decoder"], cfg["swin"], cfg["beit3"], \
      cfg["understanding"]
  hidden = dec["hidden_dim"]
  for name, value in [("pixel_decoder.conv_dim", pd["conv_dim"]),
                      ("pixel_decoder.mask_dim", pd["mask_dim"]),
                      ("understanding.hidden_channels", und["hidden_channels"])]:
    if value != hidden:
      raise ValueError(f"config.json: {name}={value} differs from decoder.hidden_dim={hidden}; "
                       "DeRIS needs one width")
  text_heads = re.search(r"n_heads=(\d+)", dec.get("Q2TCA", "n_heads=8"))
  return ml_collections.ConfigDict(dict(
      dtype=cfg.get("dtype", "float32"),
      reference_compat=True,  # the official quirks
      compat_group_size=cfg["batch_size"],  # the fixture's outputs are batch-of-B values
      num_queries=cfg["num_queries"],
      hidden_dim=hidden,
      image_size=tuple(cfg["perception_image_hw"]),
      cognition_image_size=tuple(cfg["cognition_image_hw"]),
      max_tokens=cfg["text"]["max_token"],
      remat=False,
      scan_layers=False,
      existence_veto=False,  # the official model has no veto
      existence_threshold=0.5,  # unused without the veto
      swin=dict(patch_size=sw["patch_size"], mlp_ratio=sw["mlp_ratio"],
                drop_path_rate=_number(sw["drop_path_rate"]), embed_dim=sw["embed_dim"],
                depths=tuple(sw["depths"]), num_heads=tuple(sw["num_heads"]),
                window_size=sw["window_size"]),
      pixel_decoder=dict(num_heads=pd["nheads"], num_points=pd["n_points"],
                         num_layers=pd["encoder_layers"], ffn_dim=pd["dim_feedforward"],
                         num_groups=pd["groupnorm_groups"]),
      beit3=dict(vocab_size=bt["vocab_size"], patch_size=bt["patch_size"],
                 max_source_positions=bt["max_source_positions"],
                 layernorm_eps=bt["layernorm_eps"], embed_dim=bt["embed_dim"],
                 num_layers=bt["layers"], num_heads=bt["heads"], ffn_dim=bt["ffn_dim"],
                 drop_path_rate=_number(bt["drop_path_rate"])),
      decoder=dict(num_heads=dec["nheads"], ffn_dim=dec["dim_feedforward"],
                   num_layers=dec["dec_layers"],
                   text_num_heads=int(text_heads.group(1)) if text_heads else 8),
      existence=dict(num_layers=und["aligner_layers"], num_heads=und["aligner_heads"],
                     ffn_dim=und["aligner_ffn"], dropout=_number(und["aligner_dropout"])),
  ))


@dataclasses.dataclass
class Fixture:
  path: pathlib.Path
  config_json: dict
  model_config: ml_collections.ConfigDict
  state_dict: Dict[str, np.ndarray]
  inputs: Dict[str, np.ndarray]
  outputs: Dict[str, np.ndarray]


def load_fixture(path) -> Fixture:
  """Reads a fixture directory; a missing file is an error naming it."""
  path = pathlib.Path(path)
  files = ["config.json", "state_dict.safetensors", "inputs.npz", "outputs.npz"]
  missing = [f for f in files if not (path / f).is_file()]
  if missing:
    raise FileNotFoundError(f"fixture {path}: missing {', '.join(missing)}")
  cfg = json.loads((path / "config.json").read_text())
  with np.load(path / "inputs.npz") as d:
    inputs = {k: d[k] for k in d.files}
  with np.load(path / "outputs.npz") as d:
    outputs = {k: d[k] for k in d.files}
  return Fixture(path, cfg, model_config_from_fixture(cfg),
                 load_file(str(path / "state_dict.safetensors")), inputs, outputs)


def build_converted_model(fixture: Fixture, model_config=None):
  """A DeRIS built from the fixture config with the fixture's weights converted in."""
  config = model_config or fixture.model_config
  model = build_model(config)
  deris_checkpoint.load_official(model, fixture.state_dict, window_size=config.swin.window_size,
                                 source=str(fixture.path / "state_dict.safetensors"))
  return model


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def model_inputs(inputs: Dict[str, np.ndarray], sl=slice(None)) -> Dict[str, np.ndarray]:
  """The fixture's inputs (rows `sl`) as a batch of `batch.MODEL_INPUTS` (NHWC images)."""
  return dict(image=nchw_to_nhwc(inputs["perception_image"][sl]),  # (B, H, W, 3)
              image_mini=nchw_to_nhwc(inputs["cognition_image"][sl]),  # (B, h, w, 3)
              text_ids=inputs["text_ids"][sl].astype(np.int32),  # (B, L)
              text_padding_mask=inputs["text_padding_mask"][sl].astype(bool))  # (B, L)


def run_with_taps(model, inputs, *slices: slice
                  ) -> Union[Dict[str, np.ndarray], List[Dict[str, np.ndarray]]]:
  """Runs the (eval-mode) forward under jit and returns every tap as numpy; given `slices`
  of the batch, a list of such dicts, one per slice (one jitted program: slices of one size
  share its compilation)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, batch):
    taps = {}
    forward.apply(graphdef, params, batch, taps=taps)
    return taps

  outputs = [jax.tree_util.tree_map(np.asarray, run(params, model_inputs(inputs, sl)))
             for sl in (slices or (slice(None),))]
  return outputs if slices else outputs[0]


def postprocess(taps: Dict[str, np.ndarray], image_hw, score_threshold: float,
                mask_threshold: float) -> Dict[str, np.ndarray]:
  """The official `get_predictions_parts` outputs (scores, pixel boxes, nt, union masks)."""
  out = {}
  masks = taps["final.pred_masks"]
  binary = 1.0 / (1.0 + np.exp(-masks.astype(np.float64))) >= mask_threshold  # (B, N, H, W)
  out["final.binary_masks"] = binary.astype(np.uint8)
  h, w = image_hw
  for b in range(masks.shape[0]):
    scores = taps["final.refer_scores"][b]
    cx, cy, bw, bh = np.moveaxis(taps["final.pred_boxes_cxcywh"][b], -1, 0)
    out[f"final.sample{b}.scores"] = scores
    out[f"final.sample{b}.boxes_xyxy"] = np.stack(
        [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
    out[f"final.sample{b}.nt"] = 1.0 - taps["final.existence_prob"][b]
    out[f"final.sample{b}.global_mask"] = np.any(binary[b][scores > score_threshold],
                                                 axis=0).astype(np.uint8)
  return out


def _encoder_metadata(taps) -> Dict[str, np.ndarray]:
  """Static pixel-decoder metadata derived from the level shapes we computed."""
  shapes = [taps[f"perception.pixel_decoder.input_proj.{r}"].shape[1:3]
            for r in ("res5", "res4", "res3")]
  b = taps["perception.pixel_decoder.input_proj.res5"].shape[0]
  sizes = [h * w for h, w in shapes]
  return {
      "perception.pixel_decoder.encoder.spatial_shapes": np.array(shapes, np.int32),
      "perception.pixel_decoder.encoder.level_start_index":
          np.cumsum([0] + sizes[:-1]).astype(np.int32),
      "perception.pixel_decoder.encoder.valid_ratios": np.ones((b, len(shapes), 2), np.float32),
  }


# Fixture layout -> deris-jax layout, for the keys whose layout differs.
_NCHW = re.compile(r"^(batch1\.sample\d+\.)?(perception\.backbone\.(patch_embed|res\d)|"
                   r"perception\.pixel_decoder\.(input_proj\..*|fpn\..*|mask_features|"
                   r"multi_scale_features\.\d)|decoder\.pos_embed\.level\d|"
                   r"decoder\.img_feat_upsampled|decoder\.mask_features_fused|cognition\.img_feat)$")
_ATTN_MASK = re.compile(r"decoder\.round\d+\.attn_mask$")


def to_our_layout(name: str, ref: np.ndarray, batch: int) -> np.ndarray:
  if _NCHW.match(name):
    return nchw_to_nhwc(ref)
  if _ATTN_MASK.search(name):  # (B*heads, N, HW), every head the same -> (B, N, HW)
    per_head = ref.reshape((batch, -1) + ref.shape[1:])
    if not (per_head == per_head[:, :1]).all():
      raise AssertionError(f"{name}: the fixture's heads carry different masks")
    return per_head[:, 0]
  return ref


@dataclasses.dataclass
class Comparison:
  name: str
  shape: Tuple[int, ...]
  max_abs: float
  max_rel: float
  passed: bool
  note: str = ""
  is_float: bool = True


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> Comparison:
  got = np.asarray(got)
  if got.shape != ref.shape:
    return Comparison(name, ref.shape, float("inf"), float("inf"), False,
                      f"shape {got.shape} != fixture {ref.shape}")
  if not np.issubdtype(ref.dtype, np.floating):
    diff = got.astype(np.int64) != ref.astype(np.int64)
    n = int(diff.sum())
    return Comparison(name, ref.shape, float(n), float(n) / max(ref.size, 1), n == 0,
                      f"{n} of {ref.size} differ" if n else "", is_float=False)
  atol = BOX_ATOL if name.endswith("boxes_xyxy") else ATOL
  err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
  rel = err / np.maximum(np.abs(ref), atol)
  passed = bool(np.all(err <= atol + RTOL * np.abs(ref)))
  return Comparison(name, ref.shape, float(err.max(initial=0)), float(rel.max(initial=0)), passed)


def run_parity(fixture: Fixture, only: Optional[str] = None, model_config=None
               ) -> Tuple[List[Comparison], List[str]]:
  """Compares every producible fixture tensor (with the fixture's model config, or
  `model_config`, e.g. with a switch turned on). Returns (comparisons, skipped key notes)."""
  model = build_converted_model(fixture, model_config)
  batch = fixture.inputs["perception_image"].shape[0]
  # The batch, then each sample alone (the batch-axis attention quirk becomes a no-op).
  ours, *singles = run_with_taps(model, fixture.inputs, slice(None),
                                 *(slice(b, b + 1) for b in range(batch)))
  ours.update(_encoder_metadata(ours))
  post = fixture.config_json.get("post_params", {})
  ours.update(postprocess(ours, fixture.config_json["perception_image_hw"],
                          post.get("score_threshold", 0.9), post.get("mask_threshold", 0.5)))
  for b, single in enumerate(singles):
    ours.update({f"batch1.sample{b}.{k}": v for k, v in single.items()})
  ours.update(_loss_outputs(fixture, ours))

  comparisons, skipped = [], []
  for name in sorted(fixture.outputs):
    if only and not re.search(only, name):
      continue
    if name not in ours:
      skipped.append(name)
      continue
    ref = to_our_layout(name, fixture.outputs[name], batch if "batch1" not in name else 1)
    comparisons.append(compare(name, ours[name], ref))
  return comparisons, skipped


def _loss_outputs(fixture: Fixture, ours: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Matches and loss values on the fixture's fake targets with its recorded random points."""
  return fixture_losses.official_loss_outputs(fixture, ours)


def not_produced_reason(name: str) -> str:
  for pattern, reason in fixture_losses.NOT_PRODUCED.items():
    if re.search(pattern, name):
      return reason
  return "no deris-jax counterpart"
