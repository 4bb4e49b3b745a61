"""eval.py end to end: the fixture's DeRIS on the tiny synthetic set, from a train-like checkpoint.

The checkpoint has the layout train.py leaves (params + meta + optimizer-like item, kind
'train', step 7); the model is the official fixture's (configs/deris_tiny.py, query_SA groups
of 2) with the synthetic 32x32 images resized to its 128x128 input. One forward program is
compiled (batch 8 over the 8 test devices) and shared by every run here. `--which best` reads
the best/ folder a training run writes beside its steps (here: the fixture's params with a
shifted referring head, so that its numbers differ from the latest step's).
"""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deris_jax import checkpoints, evaluation, metrics, trees
from deris_jax.convert import deris_checkpoint
from deris_jax.models.deris import abstract_model
from tests import eval_helpers as H
from tests import fixture_values

eval_cli = importlib.import_module("eval")  # eval.py ('eval' is also a builtin's name)

TAU = fixture_values.TAU  # the median of the fixture's scores: some queries pass, some not


@pytest.fixture(scope="module")
def setup(predict_setup):
  """The fixture model as a training run leaves it, on the tiny synthetic set (conftest)."""
  return predict_setup


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory):
  out = tmp_path_factory.mktemp("reference")
  rc = eval_cli.main(["--checkpoint", setup["checkpoint"],  # its stored config
                      "--split", "all", "--tau_sweep", "--score_threshold", str(TAU),
                      "--out", str(out)])
  assert rc == 0
  with open(out / "results.json") as f:
    return out, json.load(f)


def test_all_splits_with_sweep(reference_run, capsys):
  out, summary = reference_run
  assert summary["checkpoint_kind"] == "train" and summary["checkpoint_step"] == H.TRAIN_STEP
  results = summary["results"]
  assert [r["split"] for r in results] == ["val", "test"]  # eval.splits of the synthetic set
  for r in results:
    assert (r["resolution"], r["score_threshold"], r["num_samples"]) == ("reference", TAU, 24)
    assert r["protocol"]["compat_group_size"] == 2 and r["protocol"]["eval_batch_size"] == 8
    assert r["protocol"]["grouping"] == "official: consecutive entries of the annotation file"
    assert list(r["tau_sweep"]) == [str(t) for t in H.eval_common.TAU_GRID]
    lines = _read_jsonl(out / f"per_sample.{r['split']}.reference.jsonl")
    assert len({l["example_id"] for l in lines}) == 24
    recount = metrics.GRESMetrics()
    recount.update_counts(*(np.asarray([l[k] for l in lines])
                            for k in ("intersection", "pred_area", "gt_area")),
                          np.asarray([l["no_target_predicted"] for l in lines]),
                          np.asarray([l["no_target_true"] for l in lines]))
    assert recount.result() == pytest.approx(r["metrics"], rel=1e-12, nan_ok=True)
    assert any(l["pred_area"] > 0 for l in lines) and any(l["intersection"] > 0 for l in lines)
    assert all(len(l["scores"]) == fixture_values.NUM_QUERIES for l in lines)


def test_results_are_printed_with_resolution_and_tau(setup, tmp_path, capsys):
  rc = eval_cli.main(["--config", setup["config"], "--checkpoint", setup["checkpoint"],
                      "--split", "val", "--score_threshold", str(TAU), "--out",
                      str(tmp_path)])
  assert rc == 0
  table = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  assert table[0].split() == ["split", "resolution", "tau", "samples", "gIoU", "cIoU", "N-acc",
                              "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9"]
  row = table[1].split()
  assert row[:4] == ["val", "reference", f"{TAU:g}", "24"]
  with open(tmp_path / "results.json") as f:
    (result,) = json.load(f)["results"]
  assert row[4:] == [f"{v:.2f}" for v in result["metrics"].values()]


def test_original_resolution_counts_at_the_image_size(setup, reference_run, tmp_path):
  rc = eval_cli.main(["--config", setup["config"], "--checkpoint", setup["checkpoint"],
                      "--split", "val", "--resolution", "original", "--score_threshold",
                      str(TAU), "--out", str(tmp_path)])
  assert rc == 0
  original = _read_jsonl(tmp_path / "per_sample.val.original.jsonl")
  reference = _read_jsonl(reference_run[0] / "per_sample.val.reference.jsonl")
  assert [l["example_id"] for l in original] == [l["example_id"] for l in reference]
  for o, r in zip(original, reference):
    assert o["resolution"] == "original" and r["resolution"] == "reference"
    # 32x32 images, 128x128 model input: the nearest-resized GT has exactly 16x the pixels.
    assert r["gt_area"] == 16 * o["gt_area"]
    assert o["pred_area"] <= 32 * 32 and o["scores"] == r["scores"]
  # The bilinear-resized prediction covers about 1/16 of the reference pixel count.
  pred_o = sum(l["pred_area"] for l in original)
  pred_r = sum(l["pred_area"] for l in reference)
  assert pred_o > 0 and abs(16 * pred_o / pred_r - 1) < 0.05


@pytest.mark.parametrize("args, message", [
    (["--split", "nope"], "split 'nope' not in the dataset"),
    ([f"--config.model.num_queries={fixture_values.NUM_QUERIES + 1}"],
     "the model built from the config"),
    (["--config.model.nope=5"], "override 'model.nope=5': unknown config field 'model.nope'"),
    (["--score_threshold", "1.5"], "score threshold 1.5 must be in [0, 1)"),
    (["--which", "best"], "no best checkpoint in "),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, args, message):
  base = {"--config": setup["config"], "--checkpoint": setup["checkpoint"], "--split": "val"}
  argv = [x for k, v in base.items() if k not in args for x in (k, v)]
  out = tmp_path / "out"
  assert eval_cli.main(argv + args + ["--out", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
  assert not out.exists()


def test_an_old_checkpoint_says_to_pass_a_config(tmp_path, capsys):
  old = tmp_path / "old"
  checkpoints.save_params(old, {"w": np.zeros(2, np.float32)}, metadata={"kind": "train"})
  assert eval_cli.main(["--checkpoint", str(old), "--split", "val", "--out",
                        str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "(a checkpoint from an older layout); pass --config" in err[0], err


def test_override_is_gone(setup, capsys):
  with pytest.raises(SystemExit):
    eval_cli.main(["--checkpoint", setup["checkpoint"], "--split", "val", "--override",
                   "eval.batch_size=4"])
  assert "--override is gone: override a config field with --config.a.b=VALUE" in (
      capsys.readouterr().err)


def test_missing_checkpoint(setup, tmp_path, capsys):
  missing = tmp_path / "no_ckpt"
  assert eval_cli.main(["--config", setup["config"], "--checkpoint", str(missing), "--split",
                        "val", "--out", str(tmp_path / "out")]) == 1
  assert f"checkpoint directory {missing} does not exist" in capsys.readouterr().err


BEST_STEP = 5


@pytest.fixture(scope="module")
def run_with_best(setup, tiny_state_dict):
  """A train-like checkpoint directory with best/ = the fixture params, SEG_cls bias shifted."""
  config = setup["config_dict"]
  directory = setup["root"] / "run" / "checkpoints"
  H.write_train_like_checkpoint(directory, tiny_state_dict, config)
  params, _ = deris_checkpoint.convert_state_dict(tiny_state_dict, config.model,
                                                  source="fixture")
  flat = trees.named_leaves(params)
  flat["decoder.SEG_cls.bias"] = flat["decoder.SEG_cls.bias"] + np.asarray([0.3, -0.3],
                                                                           np.float32)
  best = trees.unflatten(flat)
  checkpoints.save_params(directory / checkpoints.BEST_DIRECTORY, best, step=BEST_STEP, metadata={
      "kind": "best", "step": BEST_STEP, "epoch": 0, "metric": "gIoU", "aggregate": "mean",
      "splits": ["val"], "score_threshold": TAU, "value": 12.5})
  return directory, best


def test_which_best_gives_the_numbers_of_the_best_params(setup, run_with_best, reference_run,
                                                         tmp_path, capsys):
  directory, best_params = run_with_best
  config = setup["config_dict"]
  graphdef, abstract = nnx.split(abstract_model(config.model))
  nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, best_params))
  model = nnx.merge(graphdef, abstract)
  direct = evaluation.evaluate(model, config, "val", score_threshold=TAU)  # no checkpoint read
  summaries = {}
  for name, args in (("which", [str(directory), "--which", "best"]),
                     ("path", [str(directory / "best")])):
    rc = eval_cli.main(["--config", setup["config"], "--checkpoint", *args, "--split", "val",
                        "--score_threshold", str(TAU), "--out", str(tmp_path / name)])
    assert rc == 0
    with open(tmp_path / name / "results.json") as f:
      summaries[name] = json.load(f)
  assert f"(best: mean gIoU over val 12.50 at tau {TAU}, epoch 0)" in capsys.readouterr().err
  for summary in summaries.values():
    assert summary["checkpoint_kind"] == "best" and summary["checkpoint_step"] == BEST_STEP
    assert summary["checkpoint_path"] == str(directory / "best")
    (result,) = summary["results"]
    assert result["metrics"] == pytest.approx(direct["metrics"], rel=1e-12, nan_ok=True)
  assert summaries["which"]["checkpoint_which"] == "best"
  latest = reference_run[1]["results"][0]  # the fixture params, val at TAU
  assert latest["metrics"]["gIoU"] != direct["metrics"]["gIoU"]
