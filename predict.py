"""Runs DeRIS on any image and expression: a mask PNG, an overlay PNG and a JSON of scores.

  python predict.py --config configs/deris_b_refcoco.py --checkpoint ckpt/deris_b_refcoco \
      --image photo.jpg --text "the man on the left" [--out predictions]
  python predict.py --config ... --checkpoint ... --batch pairs.jsonl [--out predictions]
  python predict.py --config ... --checkpoint WORKDIR/checkpoints --which best ...

`--batch` reads one JSON object per line: {"image": PATH, "text": "...", "name": optional};
relative image paths are relative to the JSONL file. For each pair it writes NAME.mask.png
(0/255 at the image's own size), NAME.overlay.png (the mask tinted over the image, the
expression as caption) and NAME.json (per-query scores, the selected queries, the no-target
decision, the existence probability). NAME is the image's file stem (single pair) or the
line's "name" (default: line number and stem).

Preprocessing is the data pipeline's (reference.md §8) in numpy and Pillow, without
TensorFlow: the image is resized straight to both input sizes (bilinear, half-pixel centres,
no antialiasing, rounded to uint8 like `pipeline_ops.resize_bilinear_uint8`), normalised with
`data.mean`/`data.std`; the text is cleaned and tokenized by `deris_jax.data.tokenizer`, the
tokenizer coming from `data.tokenizer_path` or, when that is None (the synthetic set), from the
prepared dataset's metadata. EXIF orientation is not applied (the pipeline does not either).
Each pair runs as a batch of one, like the official demo (with `reference_compat`, query_SA
then attends within the sample only). Inference follows §5 at the model resolution; for the
output mask the per-query logits are resized bilinearly to the image size and thresholded
there (the official demo instead resizes the binary mask with nearest).

Every input is checked before the model is loaded and before anything is written: a missing
or unreadable image, an empty expression or a checkpoint that does not fit the config stop
with one line on stderr and exit status 1; an expression longer than data.max_tokens - 2
pieces is truncated with a warning.
"""
import argparse
import json
import os
import pathlib
import sys
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
from flax import nnx

from deris_jax import checkpoints, inference
from deris_jax.config_loader import load_config
from deris_jax.data import text as text_lib
from deris_jax.data import tokenizer as tok

TINT_RGB = (255, 40, 40)  # overlay colour of the mask
TINT_ALPHA = 0.5
CAPTION_FONT_SIZE = 14
MIN_OVERLAY_WIDTH = 256  # the caption strip is at least this wide


class PredictError(ValueError):
  """Bad input: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------
# Preprocessing (numpy/Pillow twin of deris_jax/data/pipeline_ops.py).
# ------------------------------------------------------------------------------------------
def load_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a JPEG/PNG/... file; PredictError if missing or unreadable."""
  if not os.path.isfile(path):
    raise PredictError(f"image not found: {path}")
  try:
    with PIL.Image.open(path) as image:
      image.load()
      rgb = image.convert("RGB")
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise PredictError(f"cannot read image {path}: {e}") from e
  array = np.asarray(rgb, np.uint8)
  if array.ndim != 3 or min(array.shape[:2]) < 1:
    raise PredictError(f"image {path} is empty (shape {array.shape})")
  return array


def _linear_taps(in_size: int, out_size: int):
  """TF ResizeBilinear (half-pixel centres) source rows: lower, upper, lerp, all float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(src)
  lower = np.maximum(floor, 0).astype(np.int64)  # (out,)
  upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)  # (out,)
  return lower, upper, (src - floor).astype(np.float32)


def resize_bilinear_uint8(image: np.ndarray, size) -> np.ndarray:
  """(H, W, 3) uint8 -> (h, w, 3) uint8 as `pipeline_ops.resize_bilinear_uint8` (TF bilinear,
  no antialiasing, float32 arithmetic in TF's order, round half to even, clip)."""
  y0, y1, ly = _linear_taps(image.shape[0], int(size[0]))
  x0, x1, lx = _linear_taps(image.shape[1], int(size[1]))
  pixels = image.astype(np.float32)
  top_left, top_right = pixels[y0][:, x0], pixels[y0][:, x1]  # (h, w, 3)
  bottom_left, bottom_right = pixels[y1][:, x0], pixels[y1][:, x1]  # (h, w, 3)
  lx = lx[None, :, None]
  top = top_left + (top_right - top_left) * lx
  bottom = bottom_left + (bottom_right - bottom_left) * lx
  resized = top + (bottom - top) * ly[:, None, None]  # (h, w, 3)
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 RGB -> float32 (x - mean) / std."""
  return (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_image(image: np.ndarray, data_config) -> Dict[str, np.ndarray]:
  """(H, W, 3) uint8 -> {'image': (1, H', W', 3), 'image_mini': (1, h, w, 3)} float32."""
  return {
      key: normalize(resize_bilinear_uint8(image, data_config[size]), data_config.mean,
                     data_config.std)[None]
      for key, size in (("image", "image_size"), ("image_mini", "cognition_image_size"))}


def _data_dir(data_config) -> pathlib.Path:
  # Same default as deris_jax.data.registry (which imports TensorFlow).
  return pathlib.Path(os.path.expanduser(
      data_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


def load_tokenizer(data_config) -> tok.XlmrTokenizer:
  """data.tokenizer_path, else the model stored in the prepared dataset's metadata.json."""
  if data_config.get("tokenizer_path"):
    try:
      return tok.XlmrTokenizer(data_config.tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
      raise PredictError(str(e)) from e
  folder = _data_dir(data_config) / data_config.name / data_config.builder_config
  versions = sorted((p for p in folder.glob("*/metadata.json")),
                    key=lambda p: tuple(int(v) for v in p.parent.name.split(".")
                                        if v.isdigit()))
  if not versions:
    raise PredictError(
        f"config data.tokenizer_path is None and no prepared dataset {data_config.name}/"
        f"{data_config.builder_config} is under {folder.parent.parent} (data.data_dir) to read "
        "its tokenizer from: prepare it (python -m deris_jax.data.prepare) or set "
        "data.tokenizer_path")
  with open(versions[-1]) as f:
    metadata = json.load(f)
  if "tokenizer_spm" not in metadata:
    raise PredictError(f"{versions[-1]} stores no tokenizer: set data.tokenizer_path")
  return tok.XlmrTokenizer(model_proto=bytes.fromhex(metadata["tokenizer_spm"]))


def encode_text(tokenizer: tok.XlmrTokenizer, text: str, max_tokens: int) -> Dict[str, Any]:
  """{'text_ids' (1, L), 'text_padding_mask' (1, L), 'num_pieces', 'truncated'}."""
  if text_lib.is_empty_expression(text):
    raise PredictError(f"empty expression {text!r}: nothing is left after cleaning")
  try:
    encoded = tokenizer.encode([text], max_tokens)
  except ValueError as e:
    raise PredictError(str(e)) from e
  pieces = int(encoded["num_pieces"][0])
  return {"text_ids": encoded["ids"], "text_padding_mask": encoded["padding_mask"],
          "num_pieces": pieces, "truncated": pieces > max_tokens - 2}


# ------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------
def read_pairs(args) -> List[Dict[str, str]]:
  """[{'image_path', 'text', 'name', 'where'}] from --image/--text or --batch."""
  if args.batch:
    if args.image or args.text is not None:
      raise PredictError("give either --batch or --image and --text, not both")
    if not os.path.isfile(args.batch):
      raise PredictError(f"batch file not found: {args.batch}")
    base = pathlib.Path(args.batch).resolve().parent
    pairs = []
    with open(args.batch) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{args.batch} line {number}"
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise PredictError(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
            not isinstance(item.get("text"), str):
          raise PredictError(f'{where}: expected {{"image": PATH, "text": "..."}}')
        image = item["image"] if os.path.isabs(item["image"]) else str(base / item["image"])
        name = str(item.get("name") or f"{number:05d}_{pathlib.Path(image).stem}")
        pairs.append({"image_path": image, "text": item["text"], "name": name,
                      "where": where})
    if not pairs:
      raise PredictError(f"batch file {args.batch} has no pairs")
  else:
    if not args.image or args.text is None:
      raise PredictError("give --image and --text (or --batch FILE.jsonl)")
    pairs = [{"image_path": args.image, "text": args.text, "name": pathlib.Path(args.image).stem,
              "where": "--image/--text"}]
  names = [p["name"] for p in pairs]
  duplicate = next((n for n in names if names.count(n) > 1), None)
  if duplicate is not None:
    raise PredictError(f"two pairs would write outputs named '{duplicate}': give them distinct "
                       "'name' fields")
  return pairs


def prepare_inputs(pairs, data_config, tokenizer) -> List[Dict[str, Any]]:
  """Loads every image and encodes every text (all checked before anything runs)."""
  prepared = []
  for pair in pairs:
    try:
      image = load_image(pair["image_path"])
      encoded = encode_text(tokenizer, pair["text"], data_config.max_tokens)
    except PredictError as e:
      raise PredictError(f"{pair['where']}: {e}" if pair["where"] != "--image/--text" else
                         str(e)) from e
    if encoded["truncated"]:
      print(f"warning: {pair['where']}: the expression has {encoded['num_pieces']} tokens; "
            f"truncated to {data_config.max_tokens - 2} (data.max_tokens "
            f"{data_config.max_tokens} with bos/eos)", file=sys.stderr)
    prepared.append({**pair, "pixels": image, **encoded,
                     **preprocess_image(image, data_config)})
  return prepared


def require_data_section(config) -> None:
  """predict reads the data section; its agreement with the model is checked at load time
  (`load_config` -> `deris_jax.config_check`)."""
  if "data" not in config:
    raise PredictError("config has no 'data' section (configs/data_common.py): predict takes "
                       "the input sizes, normalisation and tokenizer from it")


# ------------------------------------------------------------------------------------------
# Model and outputs.
# ------------------------------------------------------------------------------------------
class Predictor:
  """A loaded model: `run(prepared_pair)` -> mask at the image size and the decision."""

  def __init__(self, model, model_config, score_threshold: float):
    graphdef, self.state = nnx.split(model)
    self.forward = inference.forward_fn(graphdef)
    self.score_threshold = float(score_threshold)
    self.existence_veto = bool(model_config.existence_veto)
    self.existence_threshold = float(model_config.existence_threshold)
    self._at_size = jax.jit(self._mask_at_size, static_argnames=("size", "existence_veto"))

  def _mask_at_size(self, pred_masks, refer_logits, existence_logit, score_threshold,
                    existence_threshold, *, size, existence_veto):
    orig_hw = jnp.asarray([size], jnp.int32)  # (1, 2)
    resized = inference.resize_logits_to_canvas(pred_masks, orig_hw, size)  # (1, N, h, w)
    return inference.predict(resized, refer_logits, existence_logit,
                             score_threshold=score_threshold, existence_veto=existence_veto,
                             existence_threshold=existence_threshold)

  def run(self, pair: Dict[str, Any]) -> Dict[str, Any]:
    outputs = self.forward(self.state, pair["image"], pair["image_mini"], pair["text_ids"],
                           pair["text_padding_mask"])
    size = tuple(int(v) for v in pair["pixels"].shape[:2])
    result = self._at_size(*outputs, np.float32(self.score_threshold),
                           np.float32(self.existence_threshold), size=size,
                           existence_veto=self.existence_veto)
    scores = np.asarray(result["scores"][0])
    return {"mask": np.asarray(result["mask"][0]), "scores": scores,
            "no_target": bool(result["no_target"][0]),
            "existence_prob": float(result["existence_prob"][0]),
            "selected": np.flatnonzero(scores > np.float32(self.score_threshold))}


def _caption_lines(text: str, font, width: int) -> List[str]:
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if line and font.getlength(candidate) > width:
      lines.append(line)
      line = word
    else:
      line = candidate
  return lines + [line] if line else lines


def overlay_image(pixels: np.ndarray, mask: np.ndarray, caption: str) -> PIL.Image.Image:
  """The mask tinted over the image, with the caption in a white strip below."""
  tinted = pixels.astype(np.float32)
  tinted[mask] = (1 - TINT_ALPHA) * tinted[mask] + TINT_ALPHA * np.asarray(TINT_RGB, np.float32)
  font = PIL.ImageFont.load_default(size=CAPTION_FONT_SIZE)
  width = max(pixels.shape[1], MIN_OVERLAY_WIDTH)
  lines = _caption_lines(caption, font, width - 8)
  line_height = CAPTION_FONT_SIZE + 4
  canvas = PIL.Image.new("RGB", (width, pixels.shape[0] + 8 + line_height * len(lines)),
                         "white")
  canvas.paste(PIL.Image.fromarray(np.round(tinted).astype(np.uint8)), (0, 0))
  draw = PIL.ImageDraw.Draw(canvas)
  for k, line in enumerate(lines):
    draw.text((4, pixels.shape[0] + 4 + k * line_height), line, fill="black", font=font)
  return canvas


def write_outputs(out_dir: pathlib.Path, pair: Dict[str, Any], result: Dict[str, Any],
                  score_threshold: float, checkpoint_dir: str) -> Dict[str, Any]:
  name = pair["name"]
  mask_path = out_dir / f"{name}.mask.png"
  overlay_path = out_dir / f"{name}.overlay.png"
  PIL.Image.fromarray(result["mask"].astype(np.uint8) * 255).save(mask_path)
  decision = ("no target" if result["no_target"] else
              f"{len(result['selected'])} of {len(result['scores'])} queries > tau")
  caption = f'"{pair["text"]}"  (tau {score_threshold:g}: {decision})'
  overlay_image(pair["pixels"], result["mask"], caption).save(overlay_path)
  summary = {
      "image": pair["image_path"], "text": pair["text"],
      "image_size": list(pair["pixels"].shape[:2]),
      "num_tokens": pair["num_pieces"], "truncated": pair["truncated"],
      "score_threshold": score_threshold,
      "scores": [round(float(s), 6) for s in result["scores"]],
      "selected_queries": [int(q) for q in result["selected"]],
      "no_target": result["no_target"],
      "existence_prob": round(result["existence_prob"], 6),
      "mask_area": int(result["mask"].sum()),
      "mask_png": mask_path.name, "overlay_png": overlay_path.name,
      "checkpoint": checkpoint_dir,
      "mask_resizing": "per-query logits resized bilinearly to the image size, then "
                       "thresholded",
  }
  with open(out_dir / f"{name}.json", "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg] of the checkpoint")
  parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory")
  parser.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="of a training run's checkpoints: the latest step (default) or the "
                           "best on validation (CHECKPOINT/best)")
  parser.add_argument("--image", default=None, help="an image file (JPEG, PNG, ...)")
  parser.add_argument("--text", default=None, help="the referring expression")
  parser.add_argument("--batch", default=None, help="JSONL of {image, text[, name]} pairs")
  parser.add_argument("--out", default="predictions", help="output folder")
  parser.add_argument("--score_threshold", type=float, default=None,
                      help="tau (default: config eval.score_threshold, else 0.7)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.existence_veto=True")
  args = parser.parse_args(argv)

  try:
    config = load_config(args.config, args.override)  # checks data against model
    require_data_section(config)
    tau = args.score_threshold
    if tau is None:
      tau = config.eval.score_threshold if "eval" in config else 0.7  # §5 tools/test.py
    if not 0.0 <= tau < 1.0:
      raise PredictError(f"--score_threshold {tau} must be in [0, 1)")
    pairs = prepare_inputs(read_pairs(args), config.data, load_tokenizer(config.data))
    directory = checkpoints.resolve(args.checkpoint, args.which)
    model, _ = checkpoints.load_model(directory, config.model, args.step)
  except (PredictError, checkpoints.CheckpointError, FileNotFoundError, KeyError, TypeError,
          ValueError) as e:  # ValueError: the config (load_config and its check)
    print(f"error: {e}", file=sys.stderr)
    return 1
  predictor = Predictor(model, config.model, tau)
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  for pair in pairs:
    summary = write_outputs(out_dir, pair, predictor.run(pair), tau, str(directory))
    decision = "no target" if summary["no_target"] else f"mask of {summary['mask_area']} px"
    print(f"{pair['name']}: {decision} (max score {max(summary['scores']):.3f}, tau {tau:g})")
  print(f"wrote {3 * len(pairs)} files to {out_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
