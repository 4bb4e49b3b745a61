"""DeRIS-B on RefCOCO/+/g: Swin-S + BEiT3-base (reference.md §1).

Usage: `--config configs/deris_b_refcoco.py` (optionally `:arg`, see `parse_arg`).
"""
from configs import common


def get_config(arg=None):
  del arg  # no variant arguments yet
  config = common.mlc.ConfigDict()
  config.model = common.model_config(swin="small", beit3="base", num_queries=10,
                                     max_tokens=20)
  config.model.compat_group_size = 16  # official eval batch per GPU (§4, §8)
  return config
