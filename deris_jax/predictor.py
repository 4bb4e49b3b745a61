"""DeRIS on your own images: a checkpoint directory in, masks and scores out.

  predictor = Predictor.from_checkpoint("workdir/synthetic/checkpoints")  # its stored config
  result = predictor.predict("photo.jpg", "the man on the left")
  result.mask            # (H, W) bool at the image's own size
  result.scores          # (N,) referring score of every query
  result.selected        # queries with score > tau, highest score first
  result.no_target       # True when no query passes tau (docs/design.md §5)
  results = predictor.predict_batch([("a.jpg", "the dog"), (pil_image, "the red car")])

Images may be a path, encoded bytes, a Pillow image or an (H, W[, 3]) uint8 array; files and
bytes are decoded as the data pipeline decodes them (`deris_jax.preprocess`). Texts are cleaned
and tokenized as in training; an expression with more than data.max_tokens - 2 pieces is
truncated (`Prediction.truncated` says so). Bad input raises `PredictError` naming the problem.

What runs: the jitted inference forward (`inference.forward_fn`) on batches of
`batch_size` pairs (the last one padded by repeating its first pair, so one program serves
every call), then one jitted program that resizes the per-query logits bilinearly to each
image's size (on a canvas rounded up to CANVAS_STEP pixels, so a new photo size rarely
compiles anew) and takes the union of the selected queries' masks, as evaluation at the
original resolution does. With `reference_compat` the decoder's query self-attention mixes
the samples of a group (docs/design.md §4); the predictor sets `model.compat_group_size` to 1
so that a pair's result does not depend on the other pairs of its batch, like the official
demo, which runs one pair at a time.
"""
import dataclasses
import functools
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax
import ml_collections
import numpy as np
import PIL.Image
from flax import nnx

from deris_jax import checkpoints, config_check, config_loader, inference, preprocess
from deris_jax.data import text as text_lib
from deris_jax.data import tokenizer as tokenizer_lib

DEFAULT_SCORE_THRESHOLD = 0.7  # official tools/test.py default, when a config has no eval tau
CANVAS_STEP = 256  # output canvases are multiples of this (few compiled sizes)

ImageInput = Union[str, os.PathLike, bytes, PIL.Image.Image, np.ndarray]


class PredictError(ValueError):
  """Bad input to the predictor: the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The result for one (image, expression) pair."""
  mask: np.ndarray  # (H, W) bool, the union of the selected queries' masks
  scores: np.ndarray  # (N,) float32 referring score (softmax[0]) of every query
  selected: np.ndarray  # (K,) int, queries with score > tau, highest score first
  query_masks: np.ndarray  # (K, H, W) bool, the mask of each selected query, same order
  no_target: bool  # no query passes tau (or, with existence_veto, the existence head vetoes)
  existence_prob: float  # sigmoid of the existence head (not used by the official decision)
  score_threshold: float  # the tau this was decided with
  num_tokens: int  # sentencepiece pieces of the cleaned expression, before truncation
  truncated: bool  # num_tokens > data.max_tokens - 2


@dataclasses.dataclass(frozen=True)
class PreparedPair:
  """A checked pair, ready for the model."""
  pixels: np.ndarray  # (H, W, 3) uint8, the image as decoded
  text: str
  inputs: Dict[str, np.ndarray]  # image (H', W', 3), image_mini (h, w, 3), text_ids (L,), ...
  num_tokens: int
  truncated: bool


def load_image(image: ImageInput) -> np.ndarray:
  """(H, W, 3) uint8 RGB of a path, encoded bytes, a Pillow image or an array."""
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise PredictError(f"image not found: {path}")
    with open(path, "rb") as f:
      data = f.read()
    try:
      return preprocess.decode_image(data, name=f"image {path}")
    except preprocess.ImageError as e:
      raise PredictError(str(e)) from e
  if isinstance(image, bytes):
    try:
      return preprocess.decode_image(image)
    except preprocess.ImageError as e:
      raise PredictError(str(e)) from e
  if isinstance(image, PIL.Image.Image):
    try:
      return preprocess.to_rgb(image)
    except preprocess.ImageError as e:
      raise PredictError(str(e)) from e
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise PredictError(f"an image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
      image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
      raise PredictError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4) with H, W "
                         f">= 1, got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])
  raise PredictError(f"an image must be a path, bytes, a PIL image or a uint8 array, got "
                     f"{type(image).__name__}")


def _canvas(sizes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
  """The smallest multiple of CANVAS_STEP that holds every size."""
  return tuple(CANVAS_STEP * math.ceil(max(s[axis] for s in sizes) / CANVAS_STEP)
               for axis in (0, 1))


@functools.lru_cache(maxsize=None)
def _decide_on_canvas(canvas: Tuple[int, int], existence_veto: bool):
  """The jitted program: logits at the model size -> decisions at each image's size."""

  def decide(pred_masks, refer_logits, existence_logit, orig_hw, score_threshold,
             existence_threshold):
    resized = inference.resize_logits_to_canvas(pred_masks, orig_hw, canvas)  # (B, N, Hc, Wc)
    result = inference.predict(resized, refer_logits, existence_logit,
                               score_threshold=score_threshold, existence_veto=existence_veto,
                               existence_threshold=existence_threshold)
    result["query_masks"] = inference.query_masks(resized)  # (B, N, Hc, Wc)
    return result

  return jax.jit(decide)


def _default_score_threshold(config: ml_collections.ConfigDict) -> float:
  return float(config.eval.score_threshold) if "eval" in config else DEFAULT_SCORE_THRESHOLD


def _check_score_threshold(tau: float) -> float:
  tau = float(tau)
  if not 0.0 <= tau < 1.0:
    raise PredictError(f"score threshold (tau) {tau} must be in [0, 1)")
  return tau


class Predictor:
  """A loaded DeRIS with its preprocessing: `predict(image, text)` -> `Prediction`."""

  def __init__(self, model: nnx.Module, config: ml_collections.ConfigDict, *,
               score_threshold: Optional[float] = None, batch_size: int = 4,
               tokenizer: Optional[tokenizer_lib.XlmrTokenizer] = None):
    """`model` built from `config.model` with `compat_group_size` 1 (`from_checkpoint` does
    that); `config.data` gives the input sizes, normalisation and tokenizer."""
    if "data" not in config:
      raise PredictError("config has no 'data' section (configs/data_common.py): the predictor "
                         "takes the input sizes, normalisation and tokenizer from it")
    if batch_size < 1:
      raise PredictError(f"batch_size must be >= 1, got {batch_size}")
    self.config = config
    self.data_config = config.data
    self.score_threshold = _check_score_threshold(
        _default_score_threshold(config) if score_threshold is None else score_threshold)
    self.batch_size = int(batch_size)
    try:
      self.tokenizer = tokenizer or tokenizer_lib.for_data(config.data)
    except (FileNotFoundError, ValueError) as e:
      raise PredictError(f"no tokenizer: {e}") from e
    graphdef, self.params = nnx.split(model)
    self.forward = inference.forward_fn(graphdef)
    self.existence_veto = bool(config.model.existence_veto)
    self.existence_threshold = float(config.model.existence_threshold)
    self.num_queries = int(config.model.num_queries)
    self.checkpoint: Optional[str] = None  # set by from_checkpoint
    self.step: Optional[int] = None

  @classmethod
  def from_checkpoint(cls, directory, *, which: str = "latest", step: Optional[int] = None,
                      config: Optional[ml_collections.ConfigDict] = None,
                      overrides: Sequence[str] = (), **kwargs) -> "Predictor":
    """Loads a checkpoint directory (train, best, converted or pretrained) with the config it
    stores, or with `config` when given (then changed in place); `overrides`
    ('model.existence_veto=True', ...) apply to either. Raises `checkpoints.CheckpointError`
    for a checkpoint that does not fit, `config_loader.OverrideError` for a bad override."""
    directory = checkpoints.resolve(directory, which)
    step = checkpoints.latest_step(directory) if step is None else step
    if config is None:
      config = checkpoints.stored_config(directory, step)
    for item in overrides:  # on the linked config: a shared value moves both its fields
      config_loader.apply_override(config, item)
    config_check.check_config(config)
    config.model.compat_group_size = 1  # each pair alone (module docstring)
    model, _ = checkpoints.load_model(directory, config.model, step)
    predictor = cls(model, config, **kwargs)
    predictor.checkpoint, predictor.step = str(directory), step
    return predictor

  # ----------------------------------------------------------------------------------------
  def prepare(self, image: ImageInput, text: str) -> PreparedPair:
    """Decodes, resizes and normalises the image and tokenizes the text (PredictError if bad)."""
    if not isinstance(text, str):
      raise PredictError(f"an expression must be a string, got {type(text).__name__}")
    if text_lib.is_empty_expression(text):
      raise PredictError(f"empty expression {text!r}: nothing is left after cleaning")
    pixels = load_image(image)
    max_tokens = int(self.data_config.max_tokens)
    try:
      encoded = self.tokenizer.encode([text], max_tokens)
    except ValueError as e:
      raise PredictError(str(e)) from e
    pieces = int(encoded["num_pieces"][0])
    inputs = preprocess.model_images(pixels, self.data_config)
    inputs["text_ids"] = encoded["ids"][0]  # (L,)
    inputs["text_padding_mask"] = encoded["padding_mask"][0]  # (L,)
    return PreparedPair(pixels=pixels, text=text, inputs=inputs, num_tokens=pieces,
                        truncated=pieces > max_tokens - 2)

  def predict(self, image: ImageInput, text: str,
              score_threshold: Optional[float] = None) -> Prediction:
    """The prediction for one pair; tau defaults to the predictor's."""
    return self.predict_prepared([self.prepare(image, text)], score_threshold)[0]

  def predict_batch(self, pairs: Sequence[Tuple[ImageInput, str]],
                    score_threshold: Optional[float] = None) -> List[Prediction]:
    """Predictions for (image, text) pairs; every pair is checked before the model runs."""
    prepared = []
    for number, (image, text) in enumerate(pairs):
      try:
        prepared.append(self.prepare(image, text))
      except PredictError as e:
        raise PredictError(f"pair {number}: {e}") from e
    return self.predict_prepared(prepared, score_threshold)

  def predict_prepared(self, prepared: Sequence[PreparedPair],
                       score_threshold: Optional[float] = None) -> List[Prediction]:
    """Runs checked pairs in batches of `batch_size`."""
    tau = self.score_threshold if score_threshold is None else _check_score_threshold(
        score_threshold)
    results = []
    for start in range(0, len(prepared), self.batch_size):
      results += self._run(prepared[start:start + self.batch_size], tau)
    return results

  def _run(self, chunk: Sequence[PreparedPair], tau: float) -> List[Prediction]:
    padded = list(chunk) + [chunk[0]] * (self.batch_size - len(chunk))
    inputs = {key: np.stack([pair.inputs[key] for pair in padded])  # (B, ...)
              for key in padded[0].inputs}
    pred_masks, refer_logits, existence_logit = self.forward(
        self.params, *inference.model_inputs(inputs))  # (B, N, h, w), (B, N, 2), (B, 1)
    sizes = [pair.pixels.shape[:2] for pair in padded]
    decide = _decide_on_canvas(_canvas(sizes), self.existence_veto)
    out = jax.device_get(decide(pred_masks, refer_logits, existence_logit,
                                np.asarray(sizes, np.int32), np.float32(tau),
                                np.float32(self.existence_threshold)))
    results = []
    for b, pair in enumerate(chunk):
      h, w = pair.pixels.shape[:2]
      scores = np.asarray(out["scores"][b], np.float32)  # (N,)
      passing = np.flatnonzero(scores > np.float32(tau))
      selected = passing[np.argsort(-scores[passing], kind="stable")]  # (K,)
      no_target = bool(out["no_target"][b])
      results.append(Prediction(
          mask=np.asarray(out["mask"][b, :h, :w], bool),
          scores=scores, selected=selected,
          query_masks=np.asarray(out["query_masks"][b, selected, :h, :w], bool),
          no_target=no_target, existence_prob=float(out["existence_prob"][b]),
          score_threshold=tau, num_tokens=pair.num_tokens, truncated=pair.truncated))
    return results
