"""The `eval` config sections: score threshold tau, resolution, eval batch, splits, tau grid.

Consumed by `deris_jax.evaluation.evaluate`, eval.py and predict.py. Values mirror
../shared/design/reference.md; the comment on each names its section. Wire one into a config
with `config.eval = eval_common.eval_config('deris_b_refcoco', config.data)`.

Eval batch and query_SA groups (reference.md §4, §8): with `model.reference_compat` the
decoder's query self-attention mixes the samples of each group of `model.compat_group_size`
consecutive samples, so the official numbers depend on the official eval batch: 16 per GPU
on RefCOCO/+/g (groups of 16), 1 on gRefCOCO (samples independent). `evaluate` keeps groups
of `compat_group_size` consecutive samples of the split whatever the device count: the global
eval batch is rounded up to a multiple of the group size and the device count, and the last
incomplete group is run on its own, as the official last (smaller) batch is. `batch_size`
therefore only sets throughput and memory, never the numbers.
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


def eval_config(variant: str, data: mlc.ConfigDict, **overrides) -> mlc.ConfigDict:
  """The eval section of a released variant ('deris_b_refcoco', ...) or 'synthetic'.

  Args:
    variant: a key of README_SCORE_THRESHOLDS, or any other name for tau = 0.7 (§5 test.py).
    data: the config's data section (its name picks the task, its eval_splits the splits).
    **overrides: any field below.
  """
  if data.name not in TASKS:
    raise ValueError(f"data.name '{data.name}' has no evaluation task; known: {sorted(TASKS)}")
  config = mlc.ConfigDict(dict(
      task=TASKS[data.name],  # 'ris' | 'gres' (§10)
      # tau: a query is selected when softmax(refer)[0] > tau (§5); README value of the variant.
      score_threshold=README_SCORE_THRESHOLDS.get(variant, TEST_SCORE_THRESHOLD),
      # The official config's own value (§5), recorded, not used unless copied above.
      config_score_threshold=CONFIG_SCORE_THRESHOLDS.get(variant, TEST_SCORE_THRESHOLD),
      mask_threshold=0.5,  # §5: sigmoid(mask logit) >= 0.5
      # 'reference': the official protocol, model input size against nearest-resized GT (§5,
      # §10); 'original': logits resized (bilinear) to each image's own size.
      resolution="reference",
      batch_size=data.eval_batch_size,  # global eval batch (§8); see the module docstring
      splits=tuple(data.eval_splits),  # what `eval.py --split all` runs
      tau_grid=TAU_GRID,  # `--tau_sweep`: every tau from one pass over the data
  ))
  config.update(overrides)
  return config
