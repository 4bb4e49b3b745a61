"""predict.py: preprocessing equal to the data pipeline, end to end on a tiny model, bad input."""
import io
import json

import numpy as np
import PIL.Image
import pytest
from flax import nnx

import predict
from deris_jax import checkpoints, inference
from deris_jax.data import pipeline
from deris_jax.data import pipeline_ops as ops
from deris_jax.data import synthetic
from deris_jax.ops import resize
from tests import eval_helpers as H

TAU = 0.46  # the fixture's random weights score ~0.4-0.52


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_state_dict):
  root = tmp_path_factory.mktemp("predict")
  data_dir = H.prepare_synthetic(root)
  config = H.tiny_config(data_dir)
  rng = np.random.default_rng(0)
  jpeg = root / "street.jpg"
  PIL.Image.fromarray(rng.integers(0, 256, (37, 61, 3), np.uint8)).save(jpeg, quality=90)
  png = root / "shapes.png"
  PIL.Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(png)
  corrupt = root / "corrupt.jpg"
  corrupt.write_bytes(jpeg.read_bytes()[:200])
  return {"config": H.write_config_file(root / "tiny_synthetic.py", data_dir),
          "checkpoint": H.write_train_like_checkpoint(root / "ckpt", tiny_state_dict, config),
          "config_dict": config, "root": root, "jpeg": str(jpeg), "png": str(png),
          "corrupt": str(corrupt)}


def _argv(setup, out, *extra):
  return ["--config", setup["config"], "--checkpoint", setup["checkpoint"], "--out", str(out),
          "--score_threshold", str(TAU), *extra]


# ------------------------------------------------------------------------------------------
# Preprocessing: numpy/Pillow = the tf.data pipeline.
# ------------------------------------------------------------------------------------------
def test_preprocessing_equals_the_pipeline_batch(setup):
  """The synthetic val split through the pipeline vs predict's path on the same PNG files."""
  data = setup["config_dict"].data  # 32x32 images -> 128x128 and 64x64
  pipe = pipeline.make_pipeline(data, "val", train=False, batch_size=24, process_index=0,
                                process_count=1)
  batch = next(pipeline.as_numpy(pipe.dataset))
  tiny = next(c for c in synthetic.DerisSynthetic.BUILDER_CONFIGS if c.name == "tiny")
  images = synthetic.generate_split(tiny, "val", dict(tiny.num_images)["val"]).images
  tokenizer = predict.load_tokenizer(data)  # from the dataset's metadata.json, without TF
  for i, example_id in enumerate(batch["example_id"]):
    info = pipe.index.describe(example_id)
    pixels = np.asarray(PIL.Image.open(io.BytesIO(images[info.image_id].data)).convert("RGB"))
    ours = predict.preprocess_image(pixels, data)
    np.testing.assert_array_equal(ours["image"][0], batch["image"][i])
    np.testing.assert_array_equal(ours["image_mini"][0], batch["image_mini"][i])
    text = predict.encode_text(tokenizer, info.expressions[0], data.max_tokens)
    np.testing.assert_array_equal(text["text_ids"][0], batch["text_ids"][i])
    np.testing.assert_array_equal(text["text_padding_mask"][0], batch["text_padding_mask"][i])


@pytest.mark.parametrize("size, out", [((37, 61), (384, 384)), ((480, 640), (224, 224)),
                                       ((333, 500), (384, 384)), ((50, 40), (48, 40))])
def test_jpeg_decode_and_resize_equal_the_tf_ops(tmp_path, size, out):
  rng = np.random.default_rng(size[0])
  ramp = np.add.outer(np.arange(size[0]), 2 * np.arange(size[1]))[..., None] * [1, 2, 3]
  pixels = np.where(rng.random(size)[..., None] < 0.5, ramp % 256,
                    rng.integers(0, 256, size + (3,))).astype(np.uint8)
  path = tmp_path / "x.jpg"
  PIL.Image.fromarray(pixels).save(path, quality=90)
  decoded_tf = ops.decode_image(path.read_bytes()).numpy()  # the pipeline's TF ops
  decoded = predict.load_image(str(path))
  np.testing.assert_array_equal(decoded, decoded_tf)
  resized_tf = ops.resize_bilinear_uint8(decoded_tf, out).numpy()
  np.testing.assert_array_equal(predict.resize_bilinear_uint8(decoded, out), resized_tf)


# ------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(setup, tmp_path_factory):
  out = tmp_path_factory.mktemp("single")
  assert predict.main(_argv(setup, out, "--image", setup["jpeg"], "--text",
                            "The red circle!")) == 0
  with open(out / "street.json") as f:
    return out, json.load(f)


def test_single_pair_outputs(setup, single_run):
  out, summary = single_run
  assert sorted(p.name for p in out.iterdir()) == ["street.json", "street.mask.png",
                                                   "street.overlay.png"]
  mask = np.asarray(PIL.Image.open(out / "street.mask.png"))
  assert mask.shape == (37, 61) and set(np.unique(mask)) <= {0, 255}
  scores = np.asarray(summary["scores"])
  assert summary["image_size"] == [37, 61] and len(scores) == 10
  assert summary["selected_queries"] == [int(q) for q in np.flatnonzero(scores > TAU)]
  assert summary["no_target"] == (not summary["selected_queries"])
  assert summary["mask_area"] == int((mask == 255).sum()) > 0
  assert summary["score_threshold"] == TAU and summary["truncated"] is False
  overlay = PIL.Image.open(out / "street.overlay.png")
  assert overlay.size[0] >= 61 and overlay.size[1] > 37
  tinted = np.asarray(overlay.convert("RGB"))[:37, :61].astype(int)
  original = predict.load_image(setup["jpeg"]).astype(int)
  on = mask == 255
  np.testing.assert_array_equal(tinted[~on], original[~on])  # untouched outside the mask
  assert (tinted[on][:, 0] >= original[on][:, 0]).all()  # tinted red inside


def test_mask_is_the_union_of_selected_queries_at_the_image_size(setup, single_run):
  """Independent check: the model's logits resized with ops.resize (torch's bilinear)."""
  _, summary = single_run
  config = setup["config_dict"]
  model, _ = checkpoints.load_model(setup["checkpoint"], config.model)
  inputs = predict.preprocess_image(predict.load_image(setup["jpeg"]), config.data)
  text = predict.encode_text(predict.load_tokenizer(config.data), "The red circle!",
                             config.data.max_tokens)
  graphdef, state = nnx.split(model)
  logits, refer, _ = inference.forward_fn(graphdef)(
      state, inputs["image"], inputs["image_mini"], text["text_ids"],
      text["text_padding_mask"])
  scores = np.asarray(inference.refer_scores(refer))[0]
  np.testing.assert_allclose(scores, summary["scores"], atol=1e-6)
  resized = np.asarray(resize.resize_bilinear(logits, (37, 61), align_corners=False))[0]
  want = (resized[scores > TAU] >= 0).any(axis=0)  # (37, 61)
  mask = np.asarray(PIL.Image.open(single_run[0] / "street.mask.png")) == 255
  assert (mask == want).mean() > 0.999 and want.sum() > 0


def test_batch_file(setup, tmp_path, capsys):
  lines = [{"image": setup["jpeg"], "text": "the red circle", "name": "first"},
           {"image": "shapes.png", "text": "all blue shapes"},  # relative to the JSONL
           {"image": setup["png"], "text": " ".join(["the green triangle"] * 5)}]
  batch = setup["root"] / "pairs.jsonl"
  batch.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  out = tmp_path / "out"
  assert predict.main(_argv(setup, out, "--batch", str(batch))) == 0
  err = capsys.readouterr().err
  assert "line 3: the expression has 15 tokens; truncated to 10" in err
  names = ["first", "00002_shapes", "00003_shapes"]
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f"{n}{suffix}" for n in names for suffix in (".json", ".mask.png", ".overlay.png"))
  summaries = [json.loads((out / f"{n}.json").read_text()) for n in names]
  assert [s["image_size"] for s in summaries] == [[37, 61], [20, 24], [20, 24]]
  assert [s["truncated"] for s in summaries] == [False, False, True]
  assert summaries[2]["num_tokens"] == 15
  # The first pair is the single run's image and text: the same scores.
  single = predict.main(_argv(setup, tmp_path / "again", "--image", setup["jpeg"], "--text",
                              "the red circle"))
  assert single == 0
  again = json.loads((tmp_path / "again" / "street.json").read_text())
  assert again["scores"] == summaries[0]["scores"]


# ------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1, nothing written.
# ------------------------------------------------------------------------------------------
BAD_BATCH = [{"image": "street.jpg", "text": "fine"}, {"image": "missing.jpg", "text": "x"}]


@pytest.mark.parametrize("case, message", [
    ("missing", "image not found: "),
    ("corrupt", "cannot read image "),
    ("empty_text", "empty expression '?! ...'"),
    ("no_text", "give --image and --text"),
    ("bad_batch_line", "pairs.jsonl line 2: image not found"),
    ("not_json", "pairs.jsonl line 1: not JSON"),
    ("wrong_checkpoint", "the model built from the config"),
    ("no_best", "no best checkpoint in "),
    # tiny_config's data section is built apart from its model (not linked): the load-time
    # check (config_check) names both fields.
    ("data_model", "config data.max_tokens 16 differs from model.max_tokens 12"),
])
def test_bad_input(setup, tmp_path, capsys, case, message):
  root = setup["root"]
  if case.startswith("bad_batch") or case == "not_json":
    batch = tmp_path / "pairs.jsonl"
    batch.write_text("{oops\n" if case == "not_json" else
                     "\n".join(json.dumps(l) for l in BAD_BATCH))
    (tmp_path / "street.jpg").write_bytes(open(setup["jpeg"], "rb").read())
    extra = ["--batch", str(batch)]
  else:
    image = {"missing": str(root / "nope.jpg"), "corrupt": setup["corrupt"]}.get(
        case, setup["jpeg"])
    text = {"empty_text": ["--text", "?! ..."], "no_text": []}.get(case, ["--text", "a cat"])
    extra = ["--image", image] + text
  if case == "wrong_checkpoint":
    extra += ["--override", "model.num_queries=5"]
  if case == "data_model":
    extra += ["--override", "data.max_tokens=16"]
  if case == "no_best":  # a training run's checkpoints without best/ yet
    extra += ["--which", "best"]
  out = tmp_path / "out"
  assert predict.main(_argv(setup, out, *extra)) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not out.exists()
