"""The official DeRIS state-dict keys -> deris-jax parameter paths: one rename table, one drop
table (each entry with its reason), and the checks that go with them.

Inside each branch deris-jax modules carry the official names, so the renames are prefixes
(plus the aligner, whose mmcv-style nesting `attentions.0.attn` / `ffns.0.layers.0.0` /
`norms.0` is flattened to readable names). Leaf names and layouts are handled generically by
`torch_to_nnx` (Linear/Conv transposes, LayerNorm `scale`, Embedding `embedding`, packed
`in_proj`).
"""
import re
from typing import Dict, Mapping

import numpy as np

from deris_jax.convert.torch_to_nnx import ConversionError, Drop, Rule
from deris_jax.models.swin import relative_position_index

_ALIGNER = r"understanding_branch\.roialigner\.TextCorrelation\."

RULES = (
    Rule(r"perception_branch\.hier_vision_encoder\.", "swin."),
    Rule(r"perception_branch\.pixel_decoder\.", "pixel_decoder."),
    Rule(r"perception_branch\.predictor\.", "decoder."),
    Rule(r"understanding_branch\.vis_enc\.beit3\.", "beit3."),
    Rule(r"understanding_branch\.(vis_embed|text_embed|perception_embed|init_query)\.",
         r"cognition.\1."),
    Rule(r"understanding_branch\.(nt_embed|logit_embed)\.", r"existence.\1."),
    Rule(_ALIGNER + r"layers\.(\d+)\.attentions\.0\.attn\.", r"existence.aligner.layers.\1.self_attn."),
    Rule(_ALIGNER + r"layers\.(\d+)\.attentions\.1\.attn\.", r"existence.aligner.layers.\1.cross_attn."),
    Rule(_ALIGNER + r"layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"existence.aligner.layers.\1.fc1."),
    Rule(_ALIGNER + r"layers\.(\d+)\.ffns\.0\.layers\.1\.", r"existence.aligner.layers.\1.fc2."),
    Rule(_ALIGNER + r"layers\.(\d+)\.norms\.0\.", r"existence.aligner.layers.\1.norm1."),
    Rule(_ALIGNER + r"layers\.(\d+)\.norms\.1\.", r"existence.aligner.layers.\1.norm2."),
    Rule(_ALIGNER + r"layers\.(\d+)\.norms\.2\.", r"existence.aligner.layers.\1.norm3."),
    Rule(_ALIGNER + r"post_norm_layer\.", "existence.aligner.post_norm."),
)

DROPS = (
    Drop(r"^head\.criterion\.empty_weight$",
         "loss buffer ([1, 0.1] class weights); deris-jax keeps it in the loss config"),
    Drop(r"\.relative_position_index$",
         "Swin buffer; recomputed from the window size (checked equal on conversion)"),
    Drop(r"^perception_branch\.predictor\.SEG_proj\.", "never called in the official forward"),
    Drop(r"^perception_branch\.predictor\.Q2TCA\.\d+\.cross_attn\.mapmlp\.",
         "never called (the official cross_attn_mask is None)"),
    Drop(r"^perception_branch\.nt_embed\.", "never called in the official forward"),
    Drop(r"^perception_branch\.perception_query_embed\.",
         "never called (the queries come from understanding_branch.init_query)"),
    Drop(r"^understanding_branch\.vis_enc\.beit3\.vision_embed\.mask_token$",
         "BEiT-3 masked-image-modelling token; unused without masked positions"),
)


def strip_module_prefix(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Removes a DDP `module.` prefix (the official loader strips it too)."""
  if state_dict and all(k.startswith("module.") for k in state_dict):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def check_relative_position_index(state_dict: Mapping[str, np.ndarray], window_size: int,
                                  source: str = "checkpoint") -> int:
  """Checks every Swin `relative_position_index` buffer equals the recomputed one.

  Returns how many buffers were checked.
  """
  want = relative_position_index(window_size)
  n = 0
  for key, value in state_dict.items():
    if not re.search(r"\.relative_position_index$", key):
      continue
    got = np.asarray(value)
    if got.shape != want.shape or not np.array_equal(got, want):
      raise ConversionError(
          f"{source}: '{key}' {got.shape} differs from the index of a window of "
          f"{window_size} {want.shape}: the checkpoint's Swin window size does not match "
          f"the config")
    n += 1
  return n
