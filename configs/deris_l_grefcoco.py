"""DeRIS-L on gRefCOCO: Swin-B (384) + BEiT3-large (reference.md §1).

Usage: `--config configs/deris_l_grefcoco.py` (optionally `:arg`, see `parse_arg`).
"""
from configs import common
from configs import data_common
from configs import eval_common


def get_config(arg=None):
  del arg  # no variant arguments yet
  config = common.mlc.ConfigDict()
  config.model = common.model_config(swin="base384", beit3="large", num_queries=20,
                                     max_tokens=50)
  config.model.compat_group_size = 1  # official eval batch per GPU (§4, §8)
  config.model.scan_layers = True  # one compiled BEiT-3 layer body (BENCHMARKS.md)
  config.data = data_common.grefcoco_data()  # §7/§8; global batch 4 = 1 per GPU x 4 GPUs
  # §9: 6 epochs, no warmup, epoch 5 at lr/10.
  common.add_training(config, epochs=6, warmup_epochs=0, decay_epochs=(6,))
  # The official objective: DDP over data.official_world_size (4) GPUs, so the global batch
  # is 4 per-GPU groups (num_masks all-reduced, class/existence means of per-GPU means).
  config.loss.normalizer = "official"
  config.eval = eval_common.eval_config("deris_l_grefcoco", config.data)
  return common.link_shared(config)
