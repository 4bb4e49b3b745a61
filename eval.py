"""Evaluates a checkpoint with the official metrics and prints them with their resolution and tau.

  python eval.py --checkpoint ckpt/deris_b_refcoco --split val_refcoco_unc \
      [--resolution {reference,original}] [--score_threshold T] [--tau_sweep] [--out DIR]
  python eval.py ... --split all      # every split of config.eval.splits
  python eval.py --checkpoint workdir/synthetic/checkpoints --which best --split all
  python eval.py --checkpoint ... --config.eval.batch_size=32 --split all
  python eval.py --config configs/deris_b_refcoco.py --checkpoint ... --split all

The config is the one the checkpoint stores (every checkpoint carries its own: training, best,
converted, pretrained); `--config PATH[:ARG]` replaces it, `--config.a.b=VALUE` overrides a
field of either (deris_jax/cli.py: the convention every command shares).

'reference' is the official protocol (model input size, against nearest-resized ground truth,
docs/design.md §5/§10); 'original' is each image's own size. tau defaults to
config.eval.score_threshold (configs/eval_common.py: the value behind the README numbers).
`--tau_sweep` adds the metrics at every tau of config.eval.tau_grid, from the same pass.
`--which best` reads WORKDIR/checkpoints/best of a training run (the epoch with the highest
validation metric, config.eval.best_metric) instead of its latest step; passing
WORKDIR/checkpoints/best as --checkpoint does the same.

Writes DIR/results.json (every split, with the protocol: eval batch, query_SA grouping,
devices) and DIR/per_sample.SPLIT.RESOLUTION.jsonl (one line per sample: ids, expression,
counts, IoU, scores, decision). Runs on every device of every process (`--distributed` calls
`jax.distributed.initialize()` first); process 0 prints and writes.
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import argparse
import json
import math
import pathlib
import sys
from typing import Any, Dict, List, Optional

import jax

from configs import eval_common
from deris_jax import checkpoints, cli, compile_cache, evaluation


def _number(value: float) -> str:
  return "nan" if value is None or math.isnan(value) else f"{value:.2f}"


def format_table(results: List[Dict[str, Any]]) -> str:
  """One row per (split, tau): split, resolution, tau, samples, every metric, 'sweep' marks
  the rows of a --tau_sweep (the unmarked row is the main tau)."""
  header = ["split", "resolution", "tau", "samples"] + list(results[0]["metrics"]) + [""]
  rows = []
  for r in results:
    entries = [(r["score_threshold"], r["metrics"], "")]
    entries += [(tau, values, "sweep") for tau, values in r.get("tau_sweep", {}).items()]
    for tau, values, kind in entries:
      rows.append([r["split"], r["resolution"], f"{float(tau):g}", str(r["num_samples"])]
                  + [_number(v) for v in values.values()] + [kind])
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  return "\n".join(
      "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
      for row in [header] + rows)


def describe_checkpoint(meta: Dict[str, Any]) -> str:
  """'kind', and for a best checkpoint the validation result that selected it."""
  kind = str(meta.get("kind", "?"))
  if kind != "best":
    return kind
  value = meta.get("value")
  return (f"best: {meta.get('aggregate')} {meta.get('metric')} over "
          f"{', '.join(meta.get('splits', []))} {_number(value)} at tau "
          f"{meta.get('score_threshold')}, epoch {meta.get('epoch')}")


def _json_safe(value):
  """NaN (an undefined ratio) -> null; float dict keys -> strings."""
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory")
  parser.add_argument("--which", choices=("latest", "best"), default="latest",
                      help="of a training run's checkpoints: the latest step (default) or the "
                           "best on validation (CHECKPOINT/best)")
  parser.add_argument("--split", required=True, help="a split name, or 'all' (eval.splits)")
  parser.add_argument("--resolution", choices=("reference", "original"), default=None,
                      help="default: config eval.resolution")
  parser.add_argument("--score_threshold", type=float, default=None,
                      help="tau (default: config eval.score_threshold)")
  parser.add_argument("--tau_sweep", action="store_true", help="metrics at every eval.tau_grid")
  parser.add_argument("--out", default="eval_results", help="output folder")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (multi-host)")
  cli.add_arguments(parser, config="optional")
  args, overrides = cli.parse(parser, argv)
  compile_cache.enable()

  if args.distributed:
    jax.distributed.initialize()
  lead = jax.process_index() == 0
  try:
    directory = checkpoints.resolve(args.checkpoint, args.which)
    step = checkpoints.latest_step(directory) if args.step is None else args.step
    config = cli.load(args.config, overrides, checkpoint=directory, step=step)
    source = args.config or f"the config stored in {directory}"
    if "data" not in config:
      raise ValueError(f"{source} has no 'data' section (configs/data_common.py)")
    if "eval" not in config:
      variant = pathlib.Path((args.config or "synthetic").partition(":")[0]).stem
      config.eval = eval_common.eval_config(variant, config.data)
      if lead:
        print(f"note: config has no 'eval' section; using eval_common.eval_config('{variant}')",
              file=sys.stderr)
    splits = list(config.eval.splits) if args.split == "all" else [args.split]
    if not splits:
      raise ValueError("config eval.splits is empty: nothing to evaluate for --split all")
    resolution = args.resolution or config.eval.resolution
    evaluation.settings_from_config(config, resolution=resolution,  # fail before loading
                                    score_threshold=args.score_threshold,
                                    tau_sweep=args.tau_sweep)
    from deris_jax.data import pipeline  # TF boundary: only eval.py's data path needs it
    for split in splits:  # every split is prepared and known before anything runs
      pipeline.open_split(config.data, split)
    model, meta = checkpoints.load_model(directory, config.model, step)
  except (ValueError, FileNotFoundError, KeyError, TypeError, AttributeError) as e:
    print(f"error: {e}", file=sys.stderr)  # config, override or checkpoint
    return 1
  out_dir = pathlib.Path(args.out)
  if lead:
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint {directory} step {step} ({describe_checkpoint(meta)})", file=sys.stderr)
  results = []
  for split in splits:
    per_sample = out_dir / f"per_sample.{split}.{resolution}.jsonl"
    try:
      results.append(evaluation.evaluate(
          model, config, split, resolution=resolution, score_threshold=args.score_threshold,
          tau_sweep=args.tau_sweep, per_sample_path=str(per_sample)))
    except (ValueError, FileNotFoundError) as e:  # e.g. an image larger than data.canvas_size
      print(f"error: {e}", file=sys.stderr)
      return 1
    if lead:
      protocol = results[-1]["protocol"]
      print(f"{split}: {results[-1]['num_samples']} samples in {results[-1]['seconds']:.1f}s "
            f"(eval batch {protocol['eval_batch_size']}, query_SA groups of "
            f"{protocol['compat_group_size']}: {protocol['grouping']}) -> {per_sample}",
            file=sys.stderr)
  if lead:
    print(format_table(results))
    for r in results:
      if r.get("extra_metrics"):  # after the table: not comparable with published numbers
        print(f"{r['split']} (not an official metric): " + "  ".join(
            f"{k} {_number(v)}" for k, v in r["extra_metrics"].items())
            + (" (mean IoU over the samples that have a target)" if "mIoU" in
               r["extra_metrics"] else ""))
    summary = {"checkpoint": args.checkpoint, "checkpoint_kind": meta.get("kind"),
               "checkpoint_step": step, "checkpoint_which": args.which,
               "checkpoint_path": str(directory),
               "config": args.config or "stored in the checkpoint",
               "overrides": overrides, "results": results}
    with open(out_dir / "results.json", "w") as f:
      json.dump(_json_safe(summary), f, indent=1)
    print(f"wrote {out_dir / 'results.json'}")
  return 0


if __name__ == "__main__":
  cli.tune_gc()
  sys.exit(main())
