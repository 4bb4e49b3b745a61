"""A web demo of a checkpoint: upload an image (or pick an example), type an expression, move tau.

  python demo.py --checkpoint workdir/synthetic/checkpoints [--port 7860] [--which best]
  python demo.py --checkpoint ckpt/deris_b_refcoco --examples my_examples/

then open http://127.0.0.1:7860 in a browser. The page shows the overlay (the mask tinted and
outlined over the image, with the selected queries and their scores), the binary mask at the
image's size, every query's referring score, and "no target" when no query passes tau. It runs
`deris_jax.predictor.Predictor` on the uploaded file itself (decoded as the data pipeline
decodes it, EXIF orientation not applied), with the config the checkpoint stores (`--config`
replaces it).

Examples: `--examples DIR` holds images and an `examples.jsonl` of {"image", "text"} lines
(relative paths). By default a checkpoint trained on the synthetic shapes (`python train.py`)
gets examples/synthetic, shapes from that set's validation split; other checkpoints get none.
"""
from deris_jax import malloc

if __name__ == "__main__":  # first, before the heavy imports (deris_jax/malloc.py)
  malloc.reexec_with_fast_malloc()

import argparse
import json
import os
import pathlib
import sys
from typing import List, Optional, Sequence

import numpy as np

from deris_jax import checkpoints, cli, compile_cache, overlay
from deris_jax.config_loader import load_config
from deris_jax.predictor import PredictError, Predictor

ROOT = pathlib.Path(__file__).resolve().parent
SYNTHETIC_EXAMPLES = ROOT / "examples" / "synthetic"
EXAMPLES_FILE = "examples.jsonl"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the server

import gradio as gr  # noqa: E402  (after the analytics switch)


def read_examples(directory: pathlib.Path) -> List[List[str]]:
  """[[image path, text], ...] from DIR/examples.jsonl; ValueError naming a bad line."""
  listing = directory / EXAMPLES_FILE
  if not listing.is_file():
    raise FileNotFoundError(f"examples folder {directory} has no {EXAMPLES_FILE}")
  examples = []
  for number, line in enumerate(listing.read_text().splitlines(), 1):
    if not line.strip():
      continue
    item = json.loads(line)
    image = directory / item["image"]
    if not image.is_file():
      raise FileNotFoundError(f"{listing} line {number}: image {image} not found")
    examples.append([str(image), item["text"]])
  return examples


def default_examples(predictor: Predictor) -> List[List[str]]:
  """The synthetic shapes for a checkpoint trained on them, else none."""
  if predictor.data_config.name == "deris_synthetic":
    return read_examples(SYNTHETIC_EXAMPLES)
  return []


def segment(predictor: Predictor, image_path: Optional[str], text: str, tau: float):
  """One prediction for the page: (overlay, mask, score rows, verdict)."""
  if not image_path:
    raise gr.Error("upload an image or pick an example first")
  try:
    prepared = predictor.prepare(image_path, text or "")
    result = predictor.predict_prepared([prepared], score_threshold=float(tau))[0]
  except PredictError as e:
    raise gr.Error(str(e)) from e
  picture = overlay.render(prepared.pixels, result.mask,
                           overlay.prediction_caption(text, result))
  mask = result.mask.astype(np.uint8) * 255  # (H, W) at the image's size
  chosen = set(result.selected.tolist())
  rows = [[q, round(float(s), 4), "selected" if q in chosen else ""]
          for q, s in sorted(enumerate(result.scores), key=lambda item: -item[1])]
  verdict = "  \n".join(overlay.decision_lines(result))
  if result.no_target:
    verdict = "**no target**  \n" + verdict
  else:
    verdict += f"  \nthe mask is their union: {int(result.mask.sum())} pixels"
  if prepared.truncated:
    verdict += (f"  \n(the expression has {prepared.num_tokens} tokens; truncated to "
                f"{predictor.data_config.max_tokens - 2})")
  return np.asarray(picture), mask, rows, verdict


def build_app(predictor: Predictor, examples: Sequence[Sequence[str]] = ()) -> gr.Blocks:
  """The page: inputs on the left, the overlay, mask, verdict and scores on the right."""
  where = predictor.checkpoint or "a model"
  with gr.Blocks(title="DeRIS demo") as app:
    gr.Markdown(f"## DeRIS: referring image segmentation\nCheckpoint `{where}`"
                + (f" (step {predictor.step})" if predictor.step is not None else ""))
    with gr.Row():
      with gr.Column():
        image = gr.Image(type="filepath", image_mode=None, label="image")
        text = gr.Textbox(label="expression", placeholder="e.g. the red circle on the left")
        tau = gr.Slider(0.0, 0.99, value=predictor.score_threshold, step=0.01,
                        label="tau (a query is selected when its score is above it)")
        button = gr.Button("Segment", variant="primary")
        if examples:
          gr.Examples(examples=[list(e) for e in examples], inputs=[image, text])
      with gr.Column():
        shown = gr.Image(label="overlay", type="numpy", format="png")
        verdict = gr.Markdown()
        mask = gr.Image(label="mask (at the image's size)", type="numpy", format="png",
                        image_mode="L")
        scores = gr.Dataframe(headers=["query", "score", ""], label="referring scores",
                              interactive=False)
    inputs, outputs = [image, text, tau], [shown, mask, scores, verdict]
    run = lambda image_path, expression, threshold: segment(predictor, image_path, expression,
                                                             threshold)
    button.click(run, inputs, outputs, api_name="segment")
    text.submit(run, inputs, outputs, api_name=False)
  return app


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory")
  parser.add_argument("--which", choices=checkpoints.WHICH, default="latest")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--examples", default=None,
                      help=f"folder with images and an {EXAMPLES_FILE} of image/text pairs")
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
  parser.add_argument("--port", type=int, default=7860)
  cli.add_arguments(parser, config="optional")
  args, overrides = cli.parse(parser, argv)
  compile_cache.enable()
  try:
    config = None if args.config is None else load_config(args.config)
    predictor = Predictor.from_checkpoint(args.checkpoint, which=args.which, step=args.step,
                                          config=config, overrides=overrides)
    examples = (read_examples(pathlib.Path(args.examples)) if args.examples
                else default_examples(predictor))
  except (PredictError, checkpoints.CheckpointError, FileNotFoundError, KeyError, TypeError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"serving {predictor.checkpoint} (step {predictor.step}) on "
        f"http://{args.host}:{args.port}")
  build_app(predictor, examples).launch(server_name=args.host, server_port=args.port,
                                        quiet=True, show_error=True)
  return 0


if __name__ == "__main__":
  cli.tune_gc()
  sys.exit(main())
