"""predict.py: the command over deris_jax.predictor, end to end on a tiny model, bad input."""
import json

import numpy as np
import PIL.Image
import pytest

import predict
from deris_jax import checkpoints, overlay, predictor as predictor_lib
from tests import fixture_values

TAU = fixture_values.TAU  # the median of the fixture's scores: some queries pass, some not


@pytest.fixture(scope="module")
def setup(predict_setup):
  return predict_setup


def _argv(setup, out, *extra):
  return ["--checkpoint", setup["checkpoint"], "--out", str(out),
          "--score_threshold", str(TAU), *extra]


# ------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(setup, tmp_path_factory):
  out = tmp_path_factory.mktemp("single")
  assert predict.main(_argv(setup, out, "--image", setup["jpeg"], "--text",
                            "The red circle!", "--per_query")) == 0
  with open(out / "street.json") as f:
    return out, json.load(f)


def test_the_checkpoint_alone_is_enough_and_outputs_match_the_predictor(setup, single_run):
  out, summary = single_run
  result = predictor_lib.Predictor.from_checkpoint(setup["checkpoint"]).predict(
      setup["jpeg"], "The red circle!", score_threshold=TAU)
  panels = [f"street.query{q}.png" for q in result.selected]
  assert len(panels) >= 1 and summary["query_pngs"] == panels
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["street.json", "street.mask.png", "street.overlay.png"] + panels)
  mask = np.asarray(PIL.Image.open(out / "street.mask.png"))
  assert mask.shape == (37, 61) and set(np.unique(mask)) <= {0, 255}
  np.testing.assert_array_equal(mask == 255, result.mask)
  assert summary["scores"] == [round(float(s), 6) for s in result.scores]
  assert summary["selected_queries"] == result.selected.tolist()
  assert summary["no_target"] is False and summary["mask_area"] == int(result.mask.sum()) > 0
  assert summary["image_size"] == [37, 61] and summary["score_threshold"] == TAU
  assert summary["truncated"] is False and summary["checkpoint"].endswith("ckpt")


def test_overlays_are_upscaled_pictures_of_the_masks(setup, single_run):
  out, summary = single_run
  scale = overlay.display_scale(37, 61)
  assert scale * 61 >= overlay.MIN_DISPLAY_SIDE
  for name in ["street.overlay.png"] + summary["query_pngs"]:
    width, height = PIL.Image.open(out / name).size
    assert width == 61 * scale and height > 37 * scale, name


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
    ("older_layout", "its metadata holds no config (a checkpoint from an older layout); pass "
                     "--config configs/X.py[:arg]"),
    ("bad_tau", "score threshold (tau) 1.5 must be in [0, 1)"),
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
    extra += [f"--config.model.num_queries={fixture_values.NUM_QUERIES + 1}"]
  if case == "data_model":  # the config file, not the (linked) stored config
    extra += ["--config", setup["config"], "--config.data.max_tokens=16"]
  if case == "older_layout":
    old = tmp_path / "old"
    checkpoints.save_params(old, {"w": np.zeros(2, np.float32)}, metadata={"kind": "train"})
    extra += ["--checkpoint", str(old)]
  if case == "bad_tau":
    extra += ["--score_threshold", "1.5"]
  if case == "no_best":  # a training run's checkpoints without best/ yet
    extra += ["--which", "best"]
  out = tmp_path / "out"
  assert predict.main(_argv(setup, out, *extra)) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
  assert not out.exists()
