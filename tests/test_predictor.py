"""deris_jax.predictor: loading from a checkpoint alone, the decision, batches, bad input."""
import io

import numpy as np
import PIL.Image
import pytest

from deris_jax import inference, predictor as predictor_lib
from deris_jax.data import pipeline
from deris_jax.data import synthetic
from deris_jax.data import tokenizer as tokenizer_lib
from deris_jax.ops import resize
from tests import fixture_values

TAU = fixture_values.TAU  # the median of the fixture's scores: some queries pass, some not


@pytest.fixture(scope="module")
def predictor(predict_setup):
  return predictor_lib.Predictor.from_checkpoint(predict_setup["checkpoint"],
                                                 score_threshold=TAU)


def test_the_checkpoint_alone_gives_its_config(predict_setup, predictor):
  stored = predict_setup["config_dict"]
  assert predictor.config.model.num_queries == stored.model.num_queries
  assert predictor.config.data.to_dict() == stored.data.to_dict()
  assert predictor.config.model.compat_group_size == 1  # each pair alone
  assert predictor.step == 7 and predictor.checkpoint.endswith("ckpt")


def test_a_prediction_is_the_union_of_its_selected_queries(predict_setup, predictor):
  result = predictor.predict(predict_setup["jpeg"], "The red circle!")
  assert result.mask.shape == (37, 61) and result.mask.dtype == bool
  assert result.scores.shape == (fixture_values.NUM_QUERIES,) and result.score_threshold == TAU
  passing = np.flatnonzero(result.scores > TAU)
  assert sorted(result.selected.tolist()) == passing.tolist()
  assert list(result.scores[result.selected]) == sorted(result.scores[passing], reverse=True)
  assert result.query_masks.shape == (len(passing), 37, 61)
  np.testing.assert_array_equal(result.mask, result.query_masks.any(axis=0))
  assert result.no_target == (len(passing) == 0) and result.mask.sum() > 0


def test_the_mask_matches_an_independent_resize(predict_setup, predictor):
  """The model's logits resized with ops.resize (torch's bilinear) and thresholded."""
  prepared = predictor.prepare(predict_setup["jpeg"], "The red circle!")
  batch = {k: np.stack([v] * predictor.batch_size) for k, v in prepared.inputs.items()}
  logits, refer, _ = predictor.forward(predictor.params, *inference.model_inputs(batch))
  scores = np.asarray(inference.refer_scores(refer))[0]
  result = predictor.predict(predict_setup["jpeg"], "The red circle!")
  np.testing.assert_allclose(scores, result.scores, atol=1e-6)
  resized = np.asarray(resize.resize_bilinear(logits[:1], (37, 61), align_corners=False))[0]
  want = (resized[scores > TAU] >= 0).any(axis=0)  # (37, 61)
  assert (result.mask == want).mean() > 0.999 and want.sum() > 0


def test_batches_equal_single_pairs_whatever_the_input_type(predict_setup, predictor):
  jpeg, png = predict_setup["jpeg"], predict_setup["png"]
  with open(jpeg, "rb") as f:
    jpeg_bytes = f.read()
  pixels = np.asarray(PIL.Image.open(png).convert("RGB"))
  pairs = [(jpeg, "the red circle"), (png, "all blue shapes"), (jpeg_bytes, "a square"),
           (PIL.Image.open(io.BytesIO(jpeg_bytes)), "the green triangle"),
           (pixels, "the red circle"), (pixels[..., 0], "a square")]
  batch = predictor.predict_batch(pairs)  # 6 pairs: batches of 4, the second one padded
  assert [r.mask.shape for r in batch] == [(37, 61), (20, 24), (37, 61), (37, 61), (20, 24),
                                          (20, 24)]
  for (image, text), result in zip(pairs[:3], batch[:3]):
    single = predictor.predict(image, text)
    np.testing.assert_array_equal(single.scores, result.scores)
    np.testing.assert_array_equal(single.mask, result.mask)
  from_file = predictor.predict(png, "the red circle")  # the array holds the file's pixels
  np.testing.assert_array_equal(batch[4].scores, from_file.scores)
  assert not np.array_equal(batch[0].scores, batch[1].scores)  # pairs do not mix


def test_tau_per_call(predict_setup, predictor):
  result = predictor.predict(predict_setup["jpeg"], "the red circle", score_threshold=0.999)
  assert result.no_target and not result.mask.any() and len(result.selected) == 0
  assert result.score_threshold == 0.999


def test_preprocessing_equals_the_pipeline_batch(predict_setup, predictor):
  """The synthetic val split through the pipeline vs the predictor on the same PNG bytes."""
  data = predict_setup["config_dict"].data  # 32x32 images -> 128x128 and 64x64
  pipe = pipeline.make_pipeline(data, "val", train=False, batch_size=24, process_index=0,
                                process_count=1)
  batch = next(pipeline.as_numpy(pipe.dataset))
  tiny = next(c for c in synthetic.DerisSynthetic.BUILDER_CONFIGS if c.name == "tiny")
  images = synthetic.generate_split(tiny, "val", dict(tiny.num_images)["val"]).images
  assert tokenizer_lib.for_data(data).vocab_size == predictor.tokenizer.vocab_size
  for i, example_id in enumerate(batch["example_id"]):
    info = pipe.index.describe(example_id)
    prepared = predictor.prepare(images[info.image_id].data, info.expressions[0])
    for key in ("image", "image_mini", "text_ids", "text_padding_mask"):
      np.testing.assert_array_equal(prepared.inputs[key], batch[key][i], err_msg=key)


@pytest.mark.parametrize("image, text, message", [
    ("missing.jpg", "a cat", "image not found: missing.jpg"),
    ("corrupt", "a cat", "cannot read image .*corrupt.jpg"),
    ("jpeg", "?! ...", r"empty expression '\?! \.\.\.'"),
    ("jpeg", 3, "an expression must be a string, got int"),
    (np.zeros((4, 4, 3), np.float32), "a cat", "must be uint8, got float32"),
    (np.zeros((0, 4, 3), np.uint8), "a cat", r"got shape \(0, 4, 3\)"),
    (1.5, "a cat", "an image must be a path, bytes, a PIL image or a uint8 array, got float"),
])
def test_bad_input_names_the_problem(predict_setup, predictor, image, text, message):
  image = predict_setup.get(image, image) if isinstance(image, str) else image
  with pytest.raises(predictor_lib.PredictError, match=message):
    predictor.predict(image, text)


def test_bad_pair_in_a_batch_is_named(predict_setup, predictor):
  with pytest.raises(predictor_lib.PredictError, match="pair 1: empty expression"):
    predictor.predict_batch([(predict_setup["jpeg"], "a cat"), (predict_setup["jpeg"], " ")])


def test_bad_tau(predict_setup, predictor):
  with pytest.raises(predictor_lib.PredictError, match=r"tau\) 1.5 must be in \[0, 1\)"):
    predictor.predict(predict_setup["jpeg"], "a cat", score_threshold=1.5)
