"""The training loop: exact resume, atomic checkpoints, --init_from, NaN stop, train.py, logs.

All runs train the micro DeRIS (configs/deris_micro.py) on the tiny synthetic set (72
training examples, 9 steps of 8 per epoch) over the 8 fake CPU devices, starting from host
parameters saved as a 'pretrained' checkpoint (`--init_from`), so no test compiles the
random initialisers. The loop's train step is the same program in every run (the persistent
compilation cache of conftest.py serves the repeats).

Best on validation: the runs evaluate val every few steps; `uninterrupted` (cIoU at tau 0.7:
0 at steps 4 and 8, a tie, then higher at 11) and its stop-and-resume twin check that a resume
keeps the comparison; `best_run` (gIoU at tau 0.5 every step: highest at step 1) checks that
WORKDIR/checkpoints/best holds the params of the best evaluation and that eval.py and
predict.py read it with `--which best`.
"""
import importlib
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from deris_jax import checkpoints
from deris_jax import executable_cache
from deris_jax import sharding as S
from deris_jax import trees
from deris_jax.config_loader import load_config
from deris_jax.data import prepare
from deris_jax.train import checkpointing
from deris_jax.train import loop
from deris_jax.train import reporting
from deris_jax.train import schedule
from deris_jax.train import state as state_lib
from deris_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 11  # crosses the epoch boundary (9 steps per epoch)
STOP_AT = 5  # the interrupted run stops here; its resume starts at batch 5 of epoch 0


def _micro_config(data_dir, *overrides):
  return load_config(str(ROOT / "configs" / "deris_micro.py"),
                     [f"data.data_dir={data_dir}", f"train.max_steps={TOTAL_STEPS}",
                      "train.tensorboard=True", "train.checkpoint_every_steps=4", *overrides])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Prepared tiny synthetic data and a params-only 'pretrained' checkpoint of the micro model."""
  root = tmp_path_factory.mktemp("train_loop")
  data_dir = root / "tfds"
  prepare.prepare("synthetic", data_dir=str(data_dir), config="tiny")
  config = _micro_config(data_dir)
  abstract = jax.eval_shape(state_lib.init_params_fn(config.model), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = trees.map_with_names(
      lambda name, leaf: ((1.0 if name.endswith("scale") else 0.0)
                          + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), abstract)
  init_dir = root / "init"
  checkpoints.save_params(init_dir, params,
                       metadata=dict(kind="pretrained", config=config.model.to_dict()))
  return dict(root=root, data_dir=data_dir, init_dir=init_dir, params=params)


EVAL_EVERY = 4  # the uninterrupted run also evaluates the val split at steps 4, 8 (and 11)


class _JaxLogs(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def uninterrupted(setup):
  workdir = setup["root"] / "uninterrupted"
  config = _micro_config(setup["data_dir"], f"train.eval_every_steps={EVAL_EVERY}")
  first_step_logs = _JaxLogs()
  run_step = loop._Run.step  # pylint: disable=protected-access

  def step(self, train_step, batch, *, first, **kwargs):  # JAX's logs of the first step's call
    if not first:
      return run_step(self, train_step, batch, first=first, **kwargs)
    logging.getLogger("jax").addHandler(first_step_logs)
    try:
      with jax.log_compiles():
        return run_step(self, train_step, batch, first=first, **kwargs)
    finally:
      logging.getLogger("jax").removeHandler(first_step_logs)

  step_lib._jitted_steps.clear()  # pylint: disable=protected-access  (a step no test traced)
  executable_cache._in_memory.clear()  # pylint: disable=protected-access
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop._Run, "step", step)  # pylint: disable=protected-access
    result = loop.train(config, workdir, init_from=str(setup["init_dir"]))
  return dict(workdir=workdir, result=result, config=config,
              first_step_logs=first_step_logs.messages)


def test_uninterrupted_run(uninterrupted):
  result = uninterrupted["result"]
  assert result.steps_per_epoch == 9 and result.total_steps == TOTAL_STEPS
  assert result.stopped == "finished" and result.steps_done == TOTAL_STEPS
  assert sorted(result.losses) == list(range(TOTAL_STEPS))
  assert all(np.isfinite(v) for v in result.losses.values())
  # checkpoint_every_steps=4, plus the final step
  assert checkpointing.Checkpointer(uninterrupted["workdir"] / "checkpoints", keep=3,
                                    async_save=False).all_steps() == [4, 8, 11]


def test_the_first_step_runs_the_program_compiled_beside_the_state(uninterrupted):
  # step.Precompile traced, lowered and compiled it from the abstract state and batch: the
  # loop's first call neither traces nor compiles again (same shapes, dtypes and shardings).
  assert not [m for m in uninterrupted["first_step_logs"] if "step" in m], (
      uninterrupted["first_step_logs"])


def _new_best_steps(text):
  return [int(line.split(" at step ")[1].split()[0]) for line in text.splitlines()
          if line.startswith("new best ")]


def test_stop_and_resume_equals_the_uninterrupted_run(setup, uninterrupted, capsys):
  workdir = setup["root"] / "resumed"
  config = _micro_config(setup["data_dir"], f"train.eval_every_steps={EVAL_EVERY}")
  first = loop.train(config, workdir, init_from=str(setup["init_dir"]), stop_at_step=STOP_AT)
  assert first.stopped == "stop_at_step" and first.steps_done == STOP_AT
  assert first.last_checkpoint == STOP_AT
  assert _new_best_steps(capsys.readouterr().out) == [4]
  second = loop.train(config, workdir, init_from="/nonexistent/ignored/when/resuming")
  assert second.resumed_from == STOP_AT and second.steps_done == TOTAL_STEPS
  # Best on val: cIoU 0 at step 4 (written), 0 again at 8 (a tie: a run that forgot step 4
  # would write step 8), higher at 11. The resumed record equals the uninterrupted one.
  want_best = uninterrupted["result"].best
  assert [h["value"] for h in want_best["history"]][:2] == [0.0, 0.0]
  assert want_best["history"][2]["value"] > 0 and want_best["saved_step"] == TOTAL_STEPS
  assert _new_best_steps(capsys.readouterr().out) == [TOTAL_STEPS]
  assert second.best == want_best
  best_ours, meta = checkpoints.restore_params(workdir / "checkpoints" / "best")
  best_theirs, _ = checkpoints.restore_params(uninterrupted["workdir"] / "checkpoints" / "best")
  assert meta["kind"] == "best" and meta["step"] == TOTAL_STEPS
  for name, value in trees.named_leaves(best_theirs).items():
    np.testing.assert_array_equal(trees.named_leaves(best_ours)[name], value, err_msg=name)
  losses = {**first.losses, **second.losses}
  want = uninterrupted["result"].losses
  assert sorted(losses) == sorted(want)
  np.testing.assert_array_equal([losses[s] for s in sorted(want)],
                                [want[s] for s in sorted(want)])
  ours, _ = checkpoints.restore_params(workdir / "checkpoints")
  theirs, _ = checkpoints.restore_params(uninterrupted["workdir"] / "checkpoints")
  for name, value in trees.named_leaves(theirs).items():
    np.testing.assert_array_equal(trees.named_leaves(ours)[name], value, err_msg=name)


def test_checkpoint_is_readable_by_eval_and_records_the_input_position(uninterrupted):
  directory = uninterrupted["workdir"] / "checkpoints"
  model, meta = checkpoints.load_model(directory, uninterrupted["config"].model)
  assert meta["kind"] == "train" and meta["step"] == TOTAL_STEPS
  assert meta["data"] == dict(epoch=1, batch=2, steps_per_epoch=9, global_batch=8, seed=0)
  assert meta["config"]["optimizer"]["lr"] == uninterrupted["config"].optimizer.lr
  tree, _ = checkpoints.restore_params(directory)
  kernel = trees.named_leaves(tree)["decoder.SEG_cls.kernel"]
  np.testing.assert_array_equal(np.asarray(model.decoder.SEG_cls.kernel[...]), kernel)


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the loop starts compiling its step: the checkpoint checks must refuse
  a run before that (a process cannot abandon a compile in progress)."""
  def refuse(*args, **kwargs):
    raise AssertionError("the train step began to compile before the checkpoints were checked")
  monkeypatch.setattr(step_lib, "Precompile", refuse)
  monkeypatch.setattr(step_lib, "jit_train_step", refuse)


def test_resume_with_another_input_stream_is_refused(setup, uninterrupted, tmp_path, no_compile):
  workdir = tmp_path / "copy"
  shutil.copytree(uninterrupted["workdir"], workdir)
  config = _micro_config(setup["data_dir"], "data.batch_size=16", "train.max_steps=20")
  with pytest.raises(checkpoints.CheckpointError, match="steps_per_epoch=9 but the config gives 5"):
    loop.train(config, workdir)


def test_resume_with_another_model_is_refused(setup, uninterrupted, tmp_path, no_compile):
  workdir = tmp_path / "copy"
  shutil.copytree(uninterrupted["workdir"], workdir)
  config = _micro_config(setup["data_dir"], "model.num_queries=5", "train.max_steps=20")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"step 11: 'cognition.init_query.embedding' has shape \(4, 32\) but "
                           r"the model built from the config expects \(5, 32\)"):
    loop.train(config, workdir)


def test_init_from_checks_shapes(setup, tmp_path, no_compile):
  config = _micro_config(setup["data_dir"], "model.num_queries=5")
  with pytest.raises(checkpoints.CheckpointError, match="init_query.embedding' has shape"):
    loop.train(config, tmp_path / "w", init_from=str(setup["init_dir"]))


def test_init_from_checks_names_and_the_directory(setup, tmp_path, no_compile):
  config = _micro_config(setup["data_dir"])
  params = dict(setup["params"], extra={"kernel": np.zeros((2,), np.float32)})
  checkpoints.save_params(tmp_path / "init", params, metadata=dict(kind="pretrained"))
  with pytest.raises(checkpoints.CheckpointError, match=r"1 unknown \(e.g. 'extra.kernel'\)"):
    loop.train(config, tmp_path / "w", init_from=str(tmp_path / "init"))
  with pytest.raises(checkpoints.CheckpointError, match="missing does not exist"):
    loop.train(config, tmp_path / "w2", init_from=str(tmp_path / "missing"))


def _events(directory: pathlib.Path):
  """(tag, step, value) of every scalar in the TensorBoard event files of `directory`."""
  out = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        out.append((value.tag, event.step, value.simple_value))
  return out


def test_tensorboard_has_the_loss_terms_lr_and_grad_norm(uninterrupted):
  events = _events(uninterrupted["workdir"] / "tensorboard")
  tags = {tag for tag, _, _ in events}
  for tag in ("train/loss", "train/total/loss_class", "train/total/loss_mask",
              "train/total/loss_label_nt", "train/raw/loss_dice", "train/lr",
              "train/grad_norm", "train/images_per_s"):
    assert tag in tags, f"{tag} missing from {sorted(tags)}"
  logged = {step: value for tag, step, value in events if tag == "train/loss"}
  losses = uninterrupted["result"].losses
  np.testing.assert_allclose(logged[2], np.mean([losses[0], losses[1]]), rtol=1e-6)
  # The learning rate follows the state's 9 steps per epoch: epoch 0's factor for steps 0-8,
  # epoch 1's from step 9 (each logged value is the mean over the steps since the last log).
  config = uninterrupted["config"]
  base = [config.optimizer.lr * schedule.epoch_factor(config.schedule, e, config.train.epochs)
          for e in (0, 1)]
  assert base[0] != base[1]
  lrs = {step: value for tag, step, value in events if tag == "train/lr"}
  want = {2: base[0], 4: base[0], 6: base[0], 8: base[0], 10: (base[0] + base[1]) / 2,
          11: base[1]}
  assert set(lrs) == set(want)
  for step, value in want.items():
    np.testing.assert_allclose(lrs[step], value, rtol=1e-6, err_msg=f"lr logged at step {step}")


def test_evaluates_every_k_steps_and_at_the_end(uninterrupted):
  result = uninterrupted["result"]
  final = result.eval_results["val"]
  assert final["num_samples"] == 24 and final["score_threshold"] == 0.7  # 8 images x 3
  assert set(final["metrics"]) == {"gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8",
                                   "Pr@0.9"}
  logged = {(tag, step): value for tag, step, value in
            _events(uninterrupted["workdir"] / "tensorboard") if tag.startswith("eval/val/")}
  assert sorted({step for _, step in logged}) == [4, 8, TOTAL_STEPS]
  assert logged[("eval/val/gIoU", TOTAL_STEPS)] == pytest.approx(final["metrics"]["gIoU"],
                                                                 rel=1e-6)
  assert ("eval/val/mIoU", EVAL_EVERY) in logged  # the extra (non-official) GRES metric
  history = result.best["history"]  # the best record: one entry per evaluation
  assert [(h["step"], h["epoch"]) for h in history] == [(4, 0), (8, 0), (TOTAL_STEPS, 1)]
  for h in history:
    assert h["value"] == pytest.approx(logged[("eval/val/cIoU", h["step"])], rel=1e-6, abs=1e-6)


def test_predict_runs_on_the_train_checkpoint(setup, uninterrupted, tmp_path):
  """predict.py reads what train.py writes (params item, its stored config, the tokenizer
  from the dataset) with `--checkpoint` alone."""
  import predict  # pylint: disable=g-import-not-at-top
  from deris_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  tiny = next(c for c in synthetic.DerisSynthetic.BUILDER_CONFIGS if c.name == "tiny")
  image = synthetic.generate_split(tiny, "val", 1).images[1]
  png = tmp_path / "shapes.png"
  png.write_bytes(image.data)
  rc = predict.main(["--checkpoint", str(uninterrupted["workdir"] / "checkpoints"),
                     "--image", str(png), "--text", "all circles", "--out", str(tmp_path)])
  assert rc == 0
  out = json.loads((tmp_path / "shapes.json").read_text())
  assert len(out["scores"]) == uninterrupted["config"].model.num_queries
  assert (tmp_path / "shapes.mask.png").exists() and (tmp_path / "shapes.overlay.png").exists()


# ----------------------------------------------------------------------------------------------
# The best checkpoint: params of the best evaluation; eval.py / predict.py --which best; repair.

BEST_STEPS = 4  # evaluations at steps 1..4 (all in epoch 0); gIoU at tau 0.5 peaks at step 1


@pytest.fixture(scope="module")
def best_run(setup):
  workdir = setup["root"] / "best_run"
  config = _micro_config(setup["data_dir"], f"train.max_steps={BEST_STEPS}",
                         "train.eval_every_steps=1", "train.keep_checkpoints=0",
                         "eval.train_score_threshold=0.5", "eval.best_metric=gIoU")
  result = loop.train(config, workdir, init_from=str(setup["init_dir"]))
  return dict(workdir=workdir, result=result, config=config)


def test_best_checkpoint_holds_the_params_of_the_best_evaluation(best_run):
  directory = best_run["workdir"] / "checkpoints"
  events = _events(best_run["workdir"] / "tensorboard")
  giou = {step: value for tag, step, value in events if tag == "eval/val/gIoU"}
  assert sorted(giou) == list(range(1, BEST_STEPS + 1))
  assert {s: v for t, s, v in events if t == "eval/mean_gIoU"} == giou
  best_step = max(giou, key=lambda s: (giou[s], -s))  # the first of the highest
  assert best_step != BEST_STEPS, "the test needs a best before the last step"
  tree, meta = checkpoints.restore_params(directory / "best")
  assert meta["kind"] == "best" and (meta["step"], meta["epoch"]) == (best_step, 0)
  assert (meta["metric"], meta["aggregate"], meta["splits"]) == ("gIoU", "mean", ["val"])
  assert meta["score_threshold"] == 0.5 and meta["data"]["batch"] == best_step
  assert meta["value"] == pytest.approx(giou[best_step], rel=1e-6)
  assert meta["per_split"] == {"val": meta["value"]}
  assert meta["metrics"]["val"]["gIoU"] == meta["value"] and "cIoU" in meta["metrics"]["val"]
  assert checkpoints.latest_step(directory / "best") == best_step  # only the best is kept
  record = best_run["result"].best
  assert record["best"]["step"] == record["saved_step"] == best_step
  # The params are those of the train checkpoint of that step (written with the best), not
  # the final ones.
  train = checkpointing.Checkpointer(directory, keep=None, async_save=False)
  assert best_step in train.all_steps() and train.latest_step() == BEST_STEPS
  at_best, _ = checkpoints.restore_params(directory, step=best_step)
  final, _ = checkpoints.restore_params(directory)
  flat, flat_best, flat_final = (trees.named_leaves(t) for t in (tree, at_best, final))
  assert sorted(flat) == sorted(flat_best)
  for name, value in flat_best.items():
    np.testing.assert_array_equal(flat[name], value, err_msg=name)
  assert any(not np.array_equal(flat[n], flat_final[n]) for n in flat)


def _micro_cli(setup):
  return ["--config", str(ROOT / "configs" / "deris_micro.py"),
          f"--config.data.data_dir={setup['data_dir']}"]


def test_eval_py_reads_the_best_and_reproduces_its_training_evaluation(setup, best_run,
                                                                       tmp_path):
  eval_cli = importlib.import_module("eval")
  directory = best_run["workdir"] / "checkpoints"
  _, meta = checkpoints.restore_params(directory / "best")
  summaries = {}
  for name, checkpoint in (("which", ["--checkpoint", str(directory), "--which", "best"]),
                           ("direct", ["--checkpoint", str(directory / "best")]),
                           ("latest", ["--checkpoint", str(directory)])):
    out = tmp_path / name
    assert eval_cli.main(_micro_cli(setup) + checkpoint + [
        "--split", "val", "--score_threshold", "0.5", "--out", str(out)]) == 0
    summaries[name] = json.loads((out / "results.json").read_text())
  which = summaries["which"]
  assert which["checkpoint_kind"] == "best" and which["checkpoint_step"] == meta["step"]
  assert which["checkpoint_path"] == str(directory / "best")
  (result,) = which["results"]
  # The numbers of the evaluation during training that selected it.
  assert result["metrics"]["gIoU"] == pytest.approx(meta["value"], rel=1e-9)
  assert dict(result["metrics"], **result["extra_metrics"]) == pytest.approx(
      meta["metrics"]["val"], rel=1e-9)
  assert summaries["direct"]["results"][0]["metrics"] == result["metrics"]
  latest = summaries["latest"]
  assert latest["checkpoint_step"] == BEST_STEPS and latest["checkpoint_kind"] == "train"
  assert latest["results"][0]["metrics"]["gIoU"] != result["metrics"]["gIoU"]


def test_predict_py_reads_the_best(setup, best_run, tmp_path):
  import predict  # pylint: disable=g-import-not-at-top
  from deris_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  tiny = next(c for c in synthetic.DerisSynthetic.BUILDER_CONFIGS if c.name == "tiny")
  png = tmp_path / "shapes.png"
  png.write_bytes(synthetic.generate_split(tiny, "val", 1).images[1].data)
  directory = best_run["workdir"] / "checkpoints"
  best_step = best_run["result"].best["saved_step"]
  scores = {}
  for name, checkpoint in (("which", ["--checkpoint", str(directory), "--which", "best"]),
                           ("direct", ["--checkpoint", str(directory / "best")]),
                           ("step", ["--checkpoint", str(directory), "--step", str(best_step)]),
                           ("latest", ["--checkpoint", str(directory)])):
    assert predict.main(_micro_cli(setup) + checkpoint + [
        "--image", str(png), "--text", "all circles", "--out", str(tmp_path / name)]) == 0
    out = json.loads((tmp_path / name / "shapes.json").read_text())
    scores[name] = out["scores"]
    if name == "which":
      assert out["checkpoint"] == str(directory / "best")
  # The best = the train checkpoint of its step (the params of that evaluation), not the latest.
  assert scores["which"] == scores["direct"] == scores["step"] != scores["latest"]


def test_a_best_left_unwritten_by_a_kill_is_written_on_resume(setup, uninterrupted, tmp_path,
                                                               capsys):
  """The train checkpoint of step 11 names the best; the best directory lost it (the run was
  killed between the two writes, leaving a temporary directory)."""
  workdir = tmp_path / "killed"
  shutil.copytree(uninterrupted["workdir"], workdir)
  best = workdir / "checkpoints" / "best"
  shutil.rmtree(best / str(TOTAL_STEPS))
  partial = best / f"{TOTAL_STEPS}.orbax-checkpoint-tmp-1234567"
  (partial / "params").mkdir(parents=True)
  with pytest.raises(checkpoints.CheckpointError, match="no best checkpoint in"):
    checkpoints.resolve(workdir / "checkpoints", "best")
  capsys.readouterr()
  config = _micro_config(setup["data_dir"], f"train.eval_every_steps={EVAL_EVERY}")
  result = loop.train(config, workdir)
  out = capsys.readouterr().out
  assert result.resumed_from == TOTAL_STEPS and not partial.exists()
  assert f"wrote the best checkpoint of step {TOTAL_STEPS}, which the previous run" in out
  assert _new_best_steps(out) == []  # the final evaluation was recorded already
  assert f"eval step {TOTAL_STEPS} (epoch 1): mean cIoU over val" in out
  assert result.best == uninterrupted["result"].best
  tree, meta = checkpoints.restore_params(checkpoints.resolve(workdir / "checkpoints", "best"))
  assert meta["step"] == TOTAL_STEPS and meta["value"] == result.best["best"]["value"]
  train, _ = checkpoints.restore_params(workdir / "checkpoints")
  for name, value in trees.named_leaves(train).items():
    np.testing.assert_array_equal(trees.named_leaves(tree)[name], value, err_msg=name)


def _subprocess_env():
  """conftest's XLA_FLAGS (8 devices) and compilation cache: the programs of these tests."""
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  return env


# Every line train.py prints (train.py, train/loop.py, train/reporting.py, train/input.py,
# data/prepare.py): a line from a library, a progress bar or an escape code matches none.
OUR_LINE = re.compile("|".join([
    r"config \S+, workdir \S+",
    r"preparing [\w/]+ in \S+ \(once\)",
    r"\[[\w/]+\] no records skipped",
    r"prepared \{[^}]*\} in [\d.]+s",
    r"mesh \{.*\} over \d+ devices \(\w+\), \d+ process\(es\); .*",
    r"resumed from step \d+ .*",
    r"state ready in [\d.]+s",
    r"first step \(compile \+ run\) [\dms.]+(, [\dms.]+ of it after the state and the input "
    r"were ready)?( \(the program read back from the executable cache\))?",
    r"step \d+/\d+  loss [\d.]+  .*",
    r"eval step \d+ \[\w+\] tau [\d.]+  .*",
    r"new best .*: wrote \S+",
    r"error: [^\x1b]*", r"note: [^\x1b]*", r"warning: [^\x1b]*",
    r"  [^\x1b]*",  # continuation lines of our messages
]))


def _run_train_py(args, timeout=600):
  env = _subprocess_env()
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it (conftest sets it)
  return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a subprocess or several processes
def test_train_py_stops_on_nan_and_keeps_the_last_good_checkpoint(setup, uninterrupted,
                                                                   tmp_path):
  """train.py resumes at step 11; zero std makes the images inf/NaN, so step 11 is not finite.

  The data folder is new, so the run prepares the tiny synthetic set first (the same
  examples): its whole console output, preparation included, must be our own lines."""
  workdir = tmp_path / "nan"
  shutil.copytree(uninterrupted["workdir"], workdir)
  proc = _run_train_py([
      "--config", str(ROOT / "configs" / "deris_micro.py"), "--workdir", str(workdir),
      f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.max_steps=14",
      "--config.train.checkpoint_every_steps=4",
      "--config.data.std=(0.0, 0.0, 0.0)", "--config.train.tensorboard=False"])
  assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "resumed from step 11" in proc.stdout
  assert "non-finite loss or gradient at step 11 (0-based)" in proc.stderr
  assert "the last good checkpoint is step 11" in proc.stderr
  foreign = [line for line in (proc.stdout + proc.stderr).splitlines()
             if not OUR_LINE.fullmatch(line)]
  assert not foreign, "lines that are not ours:\n" + "\n".join(foreign[:20])
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
  assert ckpt.latest_step() == 11
  tree, _ = checkpoints.restore_params(workdir / "checkpoints")
  assert all(np.all(np.isfinite(v)) for v in trees.named_leaves(tree).values())


# ----------------------------------------------------------------------------------------------
# A save killed half-way leaves the previous checkpoint usable.

_KILL_CHILD = r"""
import os, signal, sys, pathlib
import jax, numpy as np
sys.path.insert(0, {root!r})
from deris_jax.config_loader import load_config
from deris_jax import sharding as S, trees
from deris_jax.train import checkpointing, state as state_lib
config = load_config({config!r})
trainer = state_lib.make_trainer(config, S.make_mesh(config.mesh), steps_per_epoch=9)
abstract = trainer.abstract_state.params
params = trees.map_with_names(lambda n, a: np.full(a.shape, float(len(n)), a.dtype), abstract)
state = state_lib.init_state(trainer, 0, params=params)
ckpt = checkpointing.Checkpointer({directory!r}, keep=3, async_save=True)
ckpt.save(state, config=config, data_position=dict(epoch=0, batch=1))
ckpt.wait()
plus_one = jax.tree.map(lambda x: x + 1, params)
state = state.replace(step=state.step + 1,
                      params=jax.device_put(plus_one, trainer.state_shardings.params))
ckpt.save(state, config=config, data_position=dict(epoch=0, batch=2))
pending = [p.name for p in pathlib.Path({directory!r}).iterdir() if "tmp" in p.name]
pathlib.Path({marker!r}).write_text(" ".join(pending))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow  # a subprocess or several processes
def test_a_killed_save_leaves_the_previous_checkpoint_usable(tmp_path):
  directory, marker = tmp_path / "ckpt", tmp_path / "pending.txt"
  code = _KILL_CHILD.format(root=str(ROOT), config=str(ROOT / "configs" / "deris_micro.py"),
                            directory=str(directory), marker=str(marker))
  proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert marker.read_text().strip(), "the second save had finished before the kill"
  config = load_config(str(ROOT / "configs" / "deris_micro.py"))
  trainer = state_lib.make_trainer(config, S.make_mesh(config.mesh), steps_per_epoch=9)
  ckpt = checkpointing.Checkpointer(directory, keep=3, async_save=False)
  assert ckpt.all_steps() == [0]
  state, meta = ckpt.restore(trainer)
  assert int(state.step) == 0 and meta["data"]["batch"] == 1
  for name, value in trees.named_leaves(state.params).items():
    np.testing.assert_array_equal(np.asarray(value), float(len(name)), err_msg=name)
  assert not [p for p in directory.iterdir() if "tmp" in p.name]  # cleaned up on open
  ckpt.save(state.replace(step=state.step + 1), config=config, data_position={})
  assert ckpt.all_steps() == [0, 1]
  ckpt.close()


@pytest.mark.parametrize("origin", ["disk", "compiled", None])
def test_the_first_step_line_says_when_the_program_was_read_back(origin, tmp_path, capsys):
  run = loop._Run(config=None, trainer=None, ckpt=None,  # pylint: disable=protected-access
                  report=reporting.Reporter(tmp_path, total_steps=2, start_step=0,
                                            tensorboard=False),
                  state=jax.numpy.zeros(()), steps_per_epoch=2, last_checkpoint=None)
  add_one = jax.jit(lambda state, batch: (state + 1, {"loss": state}))
  add_one(run.state, None)  # compiled outside the transfer guard (its constant)
  run.step(add_one, None, first=True,
           compile_started=time.perf_counter(), program_origin=origin)
  (line,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("first step")]
  assert OUR_LINE.fullmatch(line), line
  assert line.endswith(" (the program read back from the executable cache)") == (
      origin == "disk")


class _Lines:
  """A Reporter stand-in that keeps the train lines."""

  def __init__(self):
    self.lines = []

  def train_line(self, step, metrics):
    self.lines.append((step, dict(metrics)))

  def scalars(self, *args, **kwargs):
    pass

  def advance(self, steps=1):
    pass


def test_images_per_second_is_the_steps_over_their_time_evaluation_left_out(monkeypatch):
  """A clock the test moves: dispatching a step is free, and each step takes 1 s of device
  time, which passes when something waits for it (the bound on steps in flight, the log's
  fetch of the metrics, evaluation reading the state). An evaluation takes 10 s, which is not
  training time."""
  now, done = [100.0], set()
  monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])

  def wait(tree):  # every step up to the latest one in `tree` ends, 1 s each
    last = max(leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, int))
    for k in range(last + 1):
      if k not in done:
        done.add(k)
        now[0] += 1.0
    return tree

  def evaluate(*args):
    wait(steps_dispatched)  # evaluation reads the parameters the steps write
    now[0] += 10.0
    return {}

  class State:
    first_nonfinite_step = np.int32(-1)

  batch, report, steps_dispatched = 4, _Lines(), []
  run = loop._Run(config=ml_collections.ConfigDict({"data": {"batch_size": batch}}),
                  trainer=None, ckpt=None, report=report, state=State(), steps_per_epoch=100,
                  last_checkpoint=None, interval_start=now[0])
  fetch = run.collect
  monkeypatch.setattr(run, "collect", lambda step: fetch(step) if wait(run.pending) else None)
  monkeypatch.setattr(loop, "_evaluate", evaluate)
  monkeypatch.setattr(loop.jax, "block_until_ready", wait)
  monkeypatch.setattr(loop.jax, "device_get", lambda tree: tree)

  def train_step(state, k):
    steps_dispatched.append(k)
    return state, {"loss": 1.0, "step": k}

  for k in range(5):
    run.step(train_step, k, first=False)
  run.log(5)
  assert report.lines[-1][1]["images_per_s"] == 5 * batch / 5.0
  for k in range(5, 7):
    run.step(train_step, k, first=False)
  run.evaluate(7)
  run.step(train_step, 7, first=False)
  run.log(8)
  assert report.lines[-1][1]["images_per_s"] == 3 * batch / 3.0
