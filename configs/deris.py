"""The DeRIS family (docs/design.md §1): DeRIS-B or DeRIS-L on RefCOCO/+/g or gRefCOCO.

Usage: `--config configs/deris.py:variant=b,data=refcoco` (`parse_arg` syntax): `variant` b
(Swin-S + BEiT3-base) or l (Swin-B 384 + BEiT3-large), `data` refcoco (RefCOCO/+/g, mixed) or
grefcoco. The four released names, configs/deris_{b,l}_{refcoco,grefcoco}.py, are aliases of
the four combinations.
"""
from configs import common
from configs import data_common
from configs import eval_common
from deris_jax import config_check

VARIANTS = {  # §1: perception backbone (§2) and cognition encoder (§3)
    "b": dict(swin="small", beit3="base"),
    "l": dict(swin="base384", beit3="large"),
}
DATASETS = {  # what the dataset sets: data section, queries, query_SA groups, schedule
    "refcoco": dict(
        data=data_common.refcoco_data,  # §8; global batch 64 = 16 per GPU x 4 GPUs
        num_queries=10,  # §1 table
        compat_group_size=16,  # official eval batch per GPU (§4, §8)
        # §9: 20 epochs, epoch 0 at lr/2 (warmup), x0.1 from epoch 14, x0.01 from epoch 18.
        schedule=dict(epochs=20, warmup_epochs=1, decay_epochs=(15, 19)),
    ),
    "grefcoco": dict(
        data=data_common.grefcoco_data,  # §7/§8; global batch 4 = 1 per GPU x 4 GPUs
        num_queries=20,  # §1 table
        compat_group_size=1,  # official eval batch per GPU (§4, §8)
        # §9: 6 epochs, no warmup, epoch 5 at lr/10.
        schedule=dict(epochs=6, warmup_epochs=0, decay_epochs=(6,)),
    ),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="b", data="refcoco")
  backbones = common.choice("variant", arg.variant, VARIANTS)
  dataset = common.choice("data", arg.data, DATASETS)
  data = dataset["data"]()
  config = common.mlc.ConfigDict()
  config.model = common.model_config(**backbones, num_queries=dataset["num_queries"],
                                     max_tokens=data.max_tokens)
  config.model.compat_group_size = dataset["compat_group_size"]
  config.model.scan_layers = True  # one compiled body per repeated stack (BENCHMARKS.md)
  config.data = data
  common.add_training(config, **dataset["schedule"])
  # The official objective: DDP over data.official_world_size (4) GPUs, so the global batch
  # is 4 per-GPU groups (num_masks all-reduced, class/existence means of per-GPU means).
  config.loss.normalizer = "official"
  config.eval = eval_common.eval_config(f"deris_{arg.variant}_{arg.data}", config.data)
  return config_check.link_shared(config)


def released(variant: str, data: str, arg=None):
  """The config of the alias configs/deris_{variant}_{data}.py, which takes no argument."""
  if arg:
    raise ValueError(f"configs/deris_{variant}_{data}.py takes no argument (got '{arg}'); "
                     f"use configs/deris.py:variant={variant},data={data}")
  return get_config(f"variant={variant},data={data}")
