"""Runs DeRIS on any image and expression: a mask PNG, an overlay PNG and a JSON of scores.

  python predict.py --checkpoint workdir/synthetic/checkpoints --image photo.jpg \
      --text "the man on the left" [--out predictions] [--per_query]
  python predict.py --checkpoint ... --batch pairs.jsonl [--out predictions]
  python predict.py --checkpoint WORKDIR/checkpoints --which best ...
  python predict.py --checkpoint ... --config configs/deris_b_refcoco.py ...  # not the stored

A checkpoint stores the config it was written with (train, best, converted and pretrained
alike), so `--checkpoint` is enough; `--config` replaces the stored config (needed for a
checkpoint from an older layout, which says so). `--batch` reads one JSON object per line:
{"image": PATH, "text": "...", "name": optional}; relative image paths are relative to the
JSONL file. For each pair it writes NAME.mask.png (0/255 at the image's own size),
NAME.overlay.png (the mask tinted and outlined over the image, small images upscaled, the
expression and the selected queries with their scores as caption), NAME.json (per-query
scores, the selected queries, the no-target decision, the existence probability) and, with
`--per_query`, NAME.query<Q>.png for each selected query Q. NAME is the image's file stem
(single pair) or the line's "name" (default: line number and stem).

The work is done by `deris_jax.predictor.Predictor` (preprocessing as the data pipeline,
docs/design.md §5 and §8) and `deris_jax.overlay` (the pictures). Every input is checked
before anything is written: a missing or unreadable image, an empty expression or a
checkpoint that does not fit the config stop with one line on stderr and exit status 1; an
expression longer than data.max_tokens - 2 pieces is truncated with a
warning.
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import argparse
import json
import os
import pathlib
import sys
from typing import Dict, List, Optional

import PIL.Image

from deris_jax import checkpoints, cli, compile_cache, overlay
from deris_jax.config_loader import load_config
from deris_jax.predictor import PredictError, Prediction, Predictor


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
              "where": None}]
  names = [p["name"] for p in pairs]
  duplicate = next((n for n in names if names.count(n) > 1), None)
  if duplicate is not None:
    raise PredictError(f"two pairs would write outputs named '{duplicate}': give them distinct "
                       "'name' fields")
  return pairs


def prepare_pairs(predictor: Predictor, pairs):
  """Checks and prepares every pair (before anything runs or is written)."""
  prepared = []
  for pair in pairs:
    try:
      item = predictor.prepare(pair["image_path"], pair["text"])
    except PredictError as e:
      raise PredictError(f"{pair['where']}: {e}" if pair["where"] else str(e)) from e
    if item.truncated:
      where = f"{pair['where']}: " if pair["where"] else ""
      max_tokens = predictor.data_config.max_tokens
      print(f"warning: {where}the expression has {item.num_tokens} tokens; truncated to "
            f"{max_tokens - 2} (data.max_tokens {max_tokens} with bos/eos)", file=sys.stderr)
    prepared.append(item)
  return prepared


def write_outputs(out_dir: pathlib.Path, pair, prepared, result: Prediction, checkpoint: str,
                  per_query: bool) -> Dict:
  name = pair["name"]
  mask_path = out_dir / f"{name}.mask.png"
  overlay_path = out_dir / f"{name}.overlay.png"
  PIL.Image.fromarray(result.mask.astype("uint8") * 255).save(mask_path)
  overlay.render(prepared.pixels, result.mask,
                 overlay.prediction_caption(pair["text"], result)).save(overlay_path)
  panels = []
  if per_query:
    for query, query_mask in zip(result.selected, result.query_masks):
      panel = out_dir / f"{name}.query{int(query)}.png"
      overlay.render(prepared.pixels, query_mask,
                     overlay.query_caption(pair["text"], result, int(query))).save(panel)
      panels.append(panel.name)
  summary = {
      "image": pair["image_path"], "text": pair["text"],
      "image_size": list(prepared.pixels.shape[:2]),
      "num_tokens": prepared.num_tokens, "truncated": prepared.truncated,
      "score_threshold": result.score_threshold,
      "scores": [round(float(s), 6) for s in result.scores],
      "selected_queries": [int(q) for q in result.selected],
      "no_target": result.no_target,
      "existence_prob": round(result.existence_prob, 6),
      "mask_area": int(result.mask.sum()),
      "mask_png": mask_path.name, "overlay_png": overlay_path.name, "query_pngs": panels,
      "checkpoint": checkpoint,
      "mask_resizing": "per-query logits resized bilinearly to the image size, then "
                       "thresholded",
  }
  with open(out_dir / f"{name}.json", "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory")
  parser.add_argument("--which", choices=checkpoints.WHICH, default="latest",
                      help="of a training run's checkpoints: the latest step (default) or the "
                           "best on validation (CHECKPOINT/best)")
  parser.add_argument("--image", default=None, help="an image file (JPEG, PNG, ...)")
  parser.add_argument("--text", default=None, help="the referring expression")
  parser.add_argument("--batch", default=None, help="JSONL of {image, text[, name]} pairs")
  parser.add_argument("--out", default="predictions", help="output folder")
  parser.add_argument("--per_query", action="store_true",
                      help="also write one panel per selected query")
  parser.add_argument("--score_threshold", type=float, default=None,
                      help="tau (default: config eval.score_threshold, else 0.7)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  cli.add_arguments(parser, config="optional")
  args, overrides = cli.parse(parser, argv)
  compile_cache.enable()

  try:
    pairs = read_pairs(args)
    config = None if args.config is None else load_config(args.config)
    predictor = Predictor.from_checkpoint(
        args.checkpoint, which=args.which, step=args.step, config=config,
        overrides=overrides, score_threshold=args.score_threshold)
    prepared = prepare_pairs(predictor, pairs)
  except (PredictError, checkpoints.CheckpointError, FileNotFoundError, KeyError, TypeError,
          ValueError) as e:  # ValueError: the config (load_config and its check)
    print(f"error: {e}", file=sys.stderr)
    return 1
  results = predictor.predict_prepared(prepared)
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = 0
  for pair, item, result in zip(pairs, prepared, results):
    summary = write_outputs(out_dir, pair, item, result, predictor.checkpoint, args.per_query)
    written += 3 + len(summary["query_pngs"])
    decision = "no target" if result.no_target else f"mask of {summary['mask_area']} px"
    print(f"{pair['name']}: {decision} (max score {max(summary['scores']):.3f}, "
          f"tau {result.score_threshold:g})")
  print(f"wrote {written} files to {out_dir}")
  return 0


if __name__ == "__main__":
  cli.tune_gc()
  sys.exit(main())
