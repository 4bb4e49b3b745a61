"""The batch contract between the input pipeline and the device programs (no TensorFlow here).

`deris_jax/data/pipeline.py` produces these keys with these dtypes; the train step reads
`TRAIN_KEYS`, the forward (`deris_jax.forward.apply`) reads `MODEL_INPUTS` in this order, and
the dry run builds abstract batches from `abstract` without reading any data.
"""
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc

MODEL_INPUTS = ("image", "image_mini", "text_ids", "text_padding_mask")  # the model's arguments
TARGETS = ("gt_masks", "gt_valid", "exists", "weight")  # what the loss reads besides
TRAIN_KEYS = MODEL_INPUTS + TARGETS  # what the train step reads from a pipeline batch

DTYPES = {
    "image": jnp.float32,  # (B, H, W, 3) normalised, data.image_size
    "image_mini": jnp.float32,  # (B, h, w, 3) normalised, data.cognition_image_size
    "text_ids": jnp.int32,  # (B, L), L = data.max_tokens
    "text_padding_mask": jnp.int32,  # (B, L), 1 = padding
    "gt_masks": jnp.uint8,  # (B, K, H, W), K = data.max_instances
    "gt_valid": jnp.bool_,  # (B, K)
    "exists": jnp.int32,  # (B,)
    "weight": jnp.float32,  # (B,) 0 for padding rows
}


def shapes(data_config: mlc.ConfigDict, global_batch: int) -> Dict[str, tuple]:
  """Global shape of every `TRAIN_KEYS` entry at the data config's sizes."""
  b = global_batch
  h, w = (int(x) for x in data_config.image_size)
  hc, wc = (int(x) for x in data_config.cognition_image_size)
  length, k = int(data_config.max_tokens), int(data_config.max_instances)
  return dict(image=(b, h, w, 3), image_mini=(b, hc, wc, 3), text_ids=(b, length),
              text_padding_mask=(b, length), gt_masks=(b, k, h, w), gt_valid=(b, k),
              exists=(b,), weight=(b,))


def abstract(data_config: mlc.ConfigDict, global_batch: int, sharding: jax.sharding.Sharding,
             keys: Sequence[str] = TRAIN_KEYS) -> Dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a pipeline batch (the dtypes tf.data produces), batch-sharded."""
  sizes = shapes(data_config, global_batch)
  return {k: jax.ShapeDtypeStruct(sizes[k], DTYPES[k], sharding=sharding) for k in keys}
