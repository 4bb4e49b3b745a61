"""The DeRIS forward as a function: (model structure, parameters, batch) -> model outputs.

The one place where a model structure (`nnx.GraphDef`) meets its parameters and a batch:
the train step, the evaluation and prediction forward (`inference.forward_fn`), the training
loop's evaluation, the dry run, bench.py and the parity check all run the model through
`apply`, so they run one and the same forward.

  parameters: an `nnx.State` (`nnx.split(model)`) or the pure dict tree the train state holds
    (`train.params.model_params`); `frozen`, if given, holds the leaves `params` lacks (the
    train step differentiates the trainable part only).
  batch: any mapping holding the `batch.MODEL_INPUTS` keys (a pipeline batch, with targets or
    not); the other keys are not read.

Layering: this module sits on the model (deris_jax.models) and the batch contract
(deris_jax.batch); inference, training, evaluation and the scripts build on it.
"""
from typing import Any, Mapping, Optional

import jax
from flax import nnx

from deris_jax import batch as batch_lib
from deris_jax.models.deris import DerisOutput


def bind(graphdef: nnx.GraphDef, params: Mapping, frozen: Optional[Mapping] = None
         ) -> nnx.Module:
  """The module of `graphdef` holding `params` (and `frozen`, disjoint from `params`)."""
  parts = (params,) if frozen is None else (params, frozen)
  return nnx.merge(graphdef, *(nnx.State(part) for part in parts))


def apply(graphdef: nnx.GraphDef, params: Mapping, batch: Mapping[str, Any], *,
          frozen: Optional[Mapping] = None, train: bool = False,
          dropout_key: Optional[jax.Array] = None,
          taps: Optional[dict] = None) -> DerisOutput:
  """Runs the model of `graphdef` with `params` on the `batch.MODEL_INPUTS` of `batch`.

  Args:
    graphdef: the model structure (`nnx.split(model)[0]`, `Trainer.graphdef`).
    params: its parameters, an `nnx.State` or a pure dict tree (module docstring).
    batch: image (B, H, W, 3), image_mini (B, h, w, 3), text_ids (B, L),
      text_padding_mask (B, L); other keys are ignored.
    frozen: parameters kept apart from `params` (e.g. not differentiated), merged in.
    train: stochastic depth and dropout on; then `dropout_key` draws them.
    dropout_key: the key of the model's 'dropout' stream (train only).
    taps: a dict to fill with intermediates under the fixture's names (parity checks).
  Returns:
    the model's `DerisOutput`.
  """
  model = bind(graphdef, params, frozen)
  rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
  return model(*(batch[k] for k in batch_lib.MODEL_INPUTS), train=train, rngs=rngs, taps=taps)
