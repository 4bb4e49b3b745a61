"""DeRIS-L on RefCOCO/+/g: Swin-B (384) + BEiT3-large (reference.md §1).

Usage: `--config configs/deris_l_refcoco.py` (optionally `:arg`, see `parse_arg`).
"""
from configs import common


def get_config(arg=None):
  del arg  # no variant arguments yet
  config = common.mlc.ConfigDict()
  config.model = common.model_config(swin="base384", beit3="large", num_queries=10,
                                     max_tokens=20)
  config.model.compat_group_size = 16  # official eval batch per GPU (§4, §8)
  return config
