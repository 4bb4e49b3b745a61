"""The best-on-val rule and its config: `best_lib.BestTracker`, `BestSettings`,
`configs/eval_common.py`'s training-eval fields, and `checkpoints.resolve` (`--which best`).

Pure functions and small Orbax directories: nothing is compiled. The training loop's use of
them (a real run, resume, eval.py / predict.py on its best) is in test_train_loop.py.
"""
import json
import math
import re

import numpy as np
import pytest

from configs import deris_b_grefcoco, deris_b_refcoco, deris_l_grefcoco, deris_l_refcoco
from configs import deris_micro, synthetic
from deris_jax import checkpoints
from deris_jax.train import best as best_lib

NAN = float("nan")


def _settings(start_epoch=0, splits=("val",), metric="cIoU", tau=0.7):
  return best_lib.BestSettings(splits=tuple(splits), score_threshold=tau, metric=metric,
                                    aggregate="mean", start_epoch=start_epoch)


def _results(value, **others):
  return {"val": {"cIoU": value, "gIoU": 50.0, **others}}


# (step, epoch, value, new best?, best checkpoint written?) with best_start_epoch 2.
SEQUENCE = [
    (3, 0, NAN, False, False),  # undefined: never the best
    (6, 0, 5.0, True, False),  # best so far, before the start epoch: not written
    (9, 1, 7.0, True, False),
    (12, 2, 6.0, False, False),  # from the start epoch on, but 7.0 (epoch 1) is higher
    (15, 2, 7.0, False, False),  # a tie is not better
    (18, 3, 7.5, True, True),  # beats every earlier epoch: written
    (21, 3, NAN, False, False),
    (24, 4, 7.5, False, False),  # tie again
    (27, 4, 9.0, True, True),
    (30, 5, 8.0, False, False),
]


def test_tracker_follows_the_official_rule_with_ties_nan_and_a_start_epoch():
  tracker = best_lib.BestTracker(_settings(start_epoch=2))
  for step, epoch, value, new_best, save in SEQUENCE:
    obs = tracker.observe(step, epoch, _results(value))
    assert (obs.new_best, obs.save) == (new_best, save), step
    assert obs.value == value or (math.isnan(value) and math.isnan(obs.value))
  record = tracker.record
  assert record["best"]["step"] == 27 and record["best"]["value"] == 9.0
  assert record["best"]["epoch"] == 4 and record["saved_step"] == 27
  assert record["best"]["per_split"] == {"val": 9.0}
  assert record["best"]["metrics"] == {"val": {"cIoU": 9.0, "gIoU": 50.0}}
  assert [h["step"] for h in record["history"]] == [s for s, *_ in SEQUENCE]
  assert [h["value"] for h in record["history"]] == [None if math.isnan(v) else v
                                                     for _, _, v, _, _ in SEQUENCE]
  json.dumps(record, allow_nan=False)  # strict JSON (Orbax meta)


def test_tracker_before_the_start_epoch_only_sets_the_value_to_beat():
  tracker = best_lib.BestTracker(_settings(start_epoch=3))
  for step, epoch, value in [(1, 0, 40.0), (2, 1, 10.0), (3, 2, 20.0), (4, 3, 30.0)]:
    assert not tracker.observe(step, epoch, _results(value)).save
  assert tracker.saved_step is None and tracker.best["step"] == 1
  assert tracker.observe(5, 4, _results(40.5)).save and tracker.saved_step == 5


def test_tracker_averages_the_splits():
  tracker = best_lib.BestTracker(_settings(splits=("val_a", "val_b"), metric="mIoU"))
  obs = tracker.observe(10, 0, {"val_a": {"mIoU": 60.0}, "val_b": {"mIoU": 70.0},
                                "test": {"mIoU": 99.0}})
  assert obs.value == 65.0 and obs.per_split == {"val_a": 60.0, "val_b": 70.0}
  obs = tracker.observe(20, 1, {"val_a": {"mIoU": 80.0}, "val_b": {"mIoU": 49.0}})
  assert obs.value == 64.5 and not obs.new_best  # a higher val_a alone does not win
  with pytest.raises(ValueError, match=r"no evaluation results for \['val_b'\]"):
    tracker.observe(30, 2, {"val_a": {"mIoU": 1.0}})


def test_resumed_tracker_continues_the_comparison():
  """A record through JSON (the train checkpoint's meta) gives the same later decisions."""
  full = best_lib.BestTracker(_settings(start_epoch=2))
  decisions = [(o.new_best, o.save) for o in
               (full.observe(s, e, _results(v)) for s, e, v, *_ in SEQUENCE)]
  first = best_lib.BestTracker(_settings(start_epoch=2))
  for step, epoch, value, *_ in SEQUENCE[:4]:
    first.observe(step, epoch, _results(value))
  record = json.loads(json.dumps(first.record))
  resumed = best_lib.BestTracker(_settings(start_epoch=2), record)
  assert resumed.reset_reason is None
  # The resumed run re-evaluates the step of its checkpoint (a finished run run again): ignored.
  again = resumed.observe(12, 2, _results(100.0))
  assert again.repeated and not again.new_best and resumed.best["value"] == 7.0
  later = [(o.new_best, o.save) for o in
           (resumed.observe(s, e, _results(v)) for s, e, v, *_ in SEQUENCE[4:])]
  assert later == decisions[4:]
  assert resumed.record == full.record
  fresh = best_lib.BestTracker(_settings(start_epoch=2))  # what forgetting would do
  assert fresh.observe(15, 2, _results(7.0)).save


def test_resumed_tracker_restarts_when_the_comparison_changed():
  first = best_lib.BestTracker(_settings())
  first.observe(5, 0, _results(30.0))
  resumed = best_lib.BestTracker(_settings(metric="gIoU"), first.record)
  assert "'metric': 'cIoU'" in resumed.reset_reason and resumed.best is None
  tau = best_lib.BestTracker(_settings(tau=0.9), first.record)
  assert "'score_threshold': 0.7" in tau.reset_reason
  start = best_lib.BestTracker(_settings(start_epoch=4), first.record)
  assert start.reset_reason is None and start.record["start_epoch"] == 4


def test_repair_after_a_kill_between_the_train_checkpoint_and_the_best():
  tracker = best_lib.BestTracker(_settings())
  tracker.observe(9, 0, _results(10.0))
  assert tracker.to_repair(resumed_step=9, best_step=9) is None
  assert tracker.to_repair(resumed_step=9, best_step=None) == "write"
  assert tracker.to_repair(resumed_step=9, best_step=4) == "write"
  assert "holds none" in tracker.to_repair(resumed_step=18, best_step=None)
  assert best_lib.BestTracker(_settings()).to_repair(9, None) is None


@pytest.mark.parametrize("field, value, message", [
    ("best_metric", "mAP", "config eval.best_metric 'mAP' is not a metric of the 'gres' task"),
    ("best_aggregate", "max", "config eval.best_aggregate 'max': expected one of mean"),
    ("best_start_epoch", -1, "config eval.best_start_epoch -1 must be >= 0"),
    ("train_score_threshold", 1.0, "config eval.train_score_threshold 1.0 must be in [0, 1)"),
])
def test_settings_name_the_bad_field(field, value, message):
  config = synthetic.get_config()
  config.eval[field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    best_lib.BestSettings.from_config(config)


def test_eval_config_fills_the_official_choices_per_variant():
  want = {  # train_splits, tau, metric, start epoch (official tools/train.py + configs)
      deris_b_refcoco: (("val_refcoco_unc", "val_refcocoplus_unc", "val_refcocog_umd"), 0.9,
                        "mIoU", 10),
      deris_l_refcoco: (("val_refcoco_unc", "val_refcocoplus_unc", "val_refcocog_umd"), 0.9,
                        "mIoU", 15),
      deris_b_grefcoco: (("val",), 0.7, "cIoU", 5),
      deris_l_grefcoco: (("val",), 0.9, "cIoU", 3),
      synthetic: (("val",), 0.7, "cIoU", 0),
      deris_micro: (("val",), 0.7, "cIoU", 0),
  }
  for module, (splits, tau, metric, start) in want.items():
    config = module.get_config()
    settings = best_lib.BestSettings.from_config(config)
    assert settings == best_lib.BestSettings(splits, tau, metric, "mean", start), module
    assert config.eval.train_score_threshold == config.eval.config_score_threshold
  assert synthetic.get_config().train.eval_every_epochs == 1


def test_settings_of_a_config_without_the_fields():
  config = synthetic.get_config()
  for field in ("train_splits", "train_score_threshold", "best_metric", "best_aggregate",
                "best_start_epoch"):
    del config.eval[field]
  assert best_lib.BestSettings.from_config(config) == best_lib.BestSettings(
      ("val", "test"), 0.7, None, "mean", 0)


# ------------------------------------------------------------------------------------------
# checkpoints.resolve: --which latest | best.
# ------------------------------------------------------------------------------------------
def _write(directory, step, meta, value=0.0):
  checkpoints.save_params(directory, {"w": np.full((2,), value, np.float32)}, metadata=meta,
                       step=step)


def _train_meta(best_record, epoch=1):
  return {"kind": "train", "step": 12, "data": {"epoch": epoch, "batch": 2},
          "config": {"eval": {"best_start_epoch": 3}}, "best": best_record}


def test_resolve_latest_and_best(tmp_path):
  run = tmp_path / "checkpoints"
  _write(run, 12, _train_meta(None), value=1.0)
  _write(run / "best", 9, {"kind": "best", "step": 9}, value=2.0)
  assert checkpoints.resolve(run) == run
  assert checkpoints.resolve(run, "best") == run / "best"
  assert checkpoints.resolve(run / "best", "best") == run / "best"  # given directly
  assert checkpoints.latest_step(run) == 12  # the best/ folder is not a step of the run
  tree, meta = checkpoints.restore_params(checkpoints.resolve(run, "best"))
  assert meta["kind"] == "best" and tree["w"].tolist() == [2.0, 2.0]
  with pytest.raises(checkpoints.CheckpointError, match="--which 'first'"):
    checkpoints.resolve(run, "first")


@pytest.mark.parametrize("record, message", [
    (None, "it records no evaluation yet"),
    ({"metric": "cIoU", "aggregate": "mean", "splits": ["val"], "start_epoch": 3,
      "best": {"value": 12.5, "epoch": 1, "step": 9}, "saved_step": None,
      "history": [{"step": 9}]},
     "whose mean cIoU over val beats every earlier evaluation. The latest train checkpoint is "
     "step 12 (in epoch 1); the best so far, 12.50 at epoch 1, came before that epoch"),
])
def test_missing_best_says_when_it_is_written(tmp_path, record, message):
  run = tmp_path / "checkpoints"
  _write(run, 12, _train_meta(record))
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.resolve(run, "best")
  text = str(info.value)
  assert text.startswith(f"no best checkpoint in {run / 'best'}: training writes it after an "
                         "evaluation of epoch 3 or later (eval.best_start_epoch 3, epochs "
                         "0-based)")
  assert message in text and text.endswith("Use --which latest for the latest checkpoint.")


def test_missing_best_of_converted_weights(tmp_path):
  _write(tmp_path / "converted", 0, {"kind": "converted"})
  with pytest.raises(checkpoints.CheckpointError, match="converted or pretrained weights have no "
                     "best"):
    checkpoints.resolve(tmp_path / "converted", "best")
  with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
    checkpoints.resolve(tmp_path / "nowhere", "best")
