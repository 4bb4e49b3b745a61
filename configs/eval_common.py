"""The `eval` config sections: score threshold tau, resolution, eval batch, splits, tau grid.

Consumed by `deris_jax.evaluation.evaluate`, eval.py and predict.py. Values mirror
docs/design.md; the comment on each names its section. Wire one into a config
with `config.eval = eval_common.eval_config('deris_b_refcoco', config.data)`.

Eval batch and query_SA groups (docs/design.md §4, §8): with `model.reference_compat` the
decoder's query self-attention mixes the samples of each group of `model.compat_group_size`
consecutive samples, so the official numbers depend on the official eval batch: 16 per GPU
on RefCOCO/+/g (groups of 16), 1 on gRefCOCO (samples independent). `evaluate` keeps groups
of `compat_group_size` consecutive samples of the split whatever the device count: the global
eval batch is rounded up to a multiple of the group size and the device count, and the last
incomplete group is run on its own, as the official last (smaller) batch is. `batch_size`
therefore only sets throughput and memory, never the numbers.

Evaluation during training (deris_jax.train.loop; the official tools/train.py and
configs/_base_/misc.py): after every `train.eval_every_epochs` the VAL splits only
(`train_splits`; the test splits are for eval.py) are evaluated at the official config's tau
(`train_score_threshold` = `config_score_threshold`), and the key metric (`best_metric`,
averaged over the splits: `best_aggregate`) picks the best checkpoint,
WORKDIR/checkpoints/best, from epoch `best_start_epoch` on (the official
start_save_checkpoint). Official key metrics: RefCOCO/+/g (MixedSeg) the mean mIoU over
val_refcoco_unc, val_refcocoplus_unc, val_refcocog_umd; gRefCOCO cIoU on val.
"""
import ml_collections as mlc

# §5: `tools/test.py --score-threshold` defaults to 0.7 and overwrites the config value; the
# README RefCOCO commands pass nothing (0.7), the gRefCOCO ones pass 0.7 (B) and 0.9 (L).
TEST_SCORE_THRESHOLD = 0.7
README_SCORE_THRESHOLDS = {  # §5/§12: tau behind each README table
    "deris_b_refcoco": 0.7,
    "deris_l_refcoco": 0.7,
    "deris_b_grefcoco": 0.7,
    "deris_l_grefcoco": 0.9,
}
CONFIG_SCORE_THRESHOLDS = {  # §5: `post_params.score_threshold` in the official configs
    "deris_b_refcoco": 0.9,  # (training-time validation uses it; tools/demo.py defaults to 0.9)
    "deris_l_refcoco": 0.9,
    "deris_b_grefcoco": 0.7,
    "deris_l_grefcoco": 0.9,
}
TASKS = {  # data.name -> metrics (§10): RIS = RefCOCO/+/g accuracy, GRES = gRefCOCO
    "refcoco_mixed": "ris",
    "grefcoco": "gres",
    "deris_synthetic": "gres",  # 0, 1 or several targets per expression, like gRefCOCO
}
TAU_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # --tau_sweep
BEST_METRICS = {  # task -> the official key metric of the best checkpoint (tools/train.py)
    "ris": "mIoU",  # MixedSeg: mean of the val splits' mIoU
    "gres": "cIoU",  # gRefCOCO: cIoU of val (the synthetic default job follows it)
}
BEST_START_EPOCHS = {  # configs/deris_*: start_save_checkpoint (0-based epochs)
    "deris_b_refcoco": 10,
    "deris_l_refcoco": 15,
    "deris_b_grefcoco": 5,
    "deris_l_grefcoco": 3,
}


def val_splits(data: mlc.ConfigDict) -> tuple:
  """The splits of data.eval_splits that training evaluates: the val ones (RefCOCO/+/g:
  val_refcoco_unc, val_refcocoplus_unc, val_refcocog_umd; gRefCOCO and synthetic: val)."""
  return tuple(s for s in data.eval_splits if s == "val" or s.startswith("val_"))


def eval_config(variant: str, data: mlc.ConfigDict, **overrides) -> mlc.ConfigDict:
  """The eval section of a released variant ('deris_b_refcoco', ...) or 'synthetic'.

  Args:
    variant: a key of README_SCORE_THRESHOLDS, or any other name for tau = 0.7 (§5 test.py).
    data: the config's data section (its name picks the task, its eval_splits the splits).
    **overrides: any field below (batch_size and splits are data's references: an override
      moves data.eval_batch_size / data.eval_splits too).
  """
  if data.name not in TASKS:
    raise ValueError(f"data.name '{data.name}' has no evaluation task; known: {sorted(TASKS)}")
  config = mlc.ConfigDict(dict(
      task=TASKS[data.name],  # 'ris' | 'gres' (§10)
      # tau: a query is selected when softmax(refer)[0] > tau (§5); README value of the variant.
      score_threshold=README_SCORE_THRESHOLDS.get(variant, TEST_SCORE_THRESHOLD),
      # The official config's own value (§5): the tau of the evaluations during training.
      config_score_threshold=CONFIG_SCORE_THRESHOLDS.get(variant, TEST_SCORE_THRESHOLD),
      mask_threshold=0.5,  # §5: sigmoid(mask logit) >= 0.5
      # 'reference': the official protocol, model input size against nearest-resized GT (§5,
      # §10); 'original': logits resized (bilinear) to each image's own size.
      resolution="reference",
      # global eval batch (§8; see the module docstring): data.eval_batch_size's reference
      batch_size=data.get_ref("eval_batch_size"),
      splits=data.get_ref("eval_splits"),  # what `eval.py --split all` runs: data.eval_splits
      tau_grid=TAU_GRID,  # `--tau_sweep`: every tau from one pass over the data
      # --- Evaluation during training and the best checkpoint (module docstring) ---
      # Splits evaluated every train.eval_every_epochs and at the end of training (the
      # official: val only); () evaluates nothing during training.
      train_splits=val_splits(data),
      # tau during training: the official config's post_params.score_threshold (§5).
      train_score_threshold=CONFIG_SCORE_THRESHOLDS.get(variant, TEST_SCORE_THRESHOLD),
      # Key metric of WORKDIR/checkpoints/best (a metric name of the task; None: no best).
      best_metric=BEST_METRICS[TASKS[data.name]],
      best_aggregate="mean",  # how the train_splits' values combine (the only choice)
      # First epoch (0-based) whose evaluation may write the best checkpoint; earlier
      # evaluations still set the value to beat (the official start_save_checkpoint).
      best_start_epoch=BEST_START_EPOCHS.get(variant, 0),
  ))
  config.update(overrides)
  return config
