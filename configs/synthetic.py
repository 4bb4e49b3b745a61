"""The embedded default job: a small DeRIS that learns the synthetic shapes set on a CPU.

`python train.py` (no arguments) runs it: the dataset (64x64 coloured shapes, expressions
with 0, 1 or several referents) is prepared on first use, training takes three to four
minutes on a 2-core CPU including compilation (with tcmalloc; BENCHMARKS.md). As the official
training, it evaluates the val split after every epoch (the last one is the final evaluation:
gIoU, cIoU, N-acc, ...) and keeps the epoch of the highest val cIoU (the official gRefCOCO key
metric) in workdir/synthetic/checkpoints/best; the test split is for eval.py.

What differs from the released recipes, and why:
  - sizes: hidden 64, small Swin and BEiT-3, 64x64 inputs (the architecture is unchanged)
  - nothing is pretrained, so the Swin backbone trains too (`freeze_swin=False`) and
    stochastic depth is off
  - the corrected model (`reference_compat=False`: per-sample query self-attention)
  - a larger learning rate, looser clipping and fewer loss points for a run of minutes
"""
from configs import common
from configs import data_common
from configs import eval_common
from deris_jax import config_check


def get_config(arg=None):
  arg = common.parse_arg(arg, epochs=3)
  config = common.mlc.ConfigDict()
  model = common.model_config(swin="small", beit3="base", num_queries=8, max_tokens=12)
  model.update(hidden_dim=64, image_size=(64, 64), cognition_image_size=(64, 64),
               reference_compat=False, compat_group_size=1)
  model.freeze_swin = False  # random init: the backbone must learn too
  model.swin.update(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4,
                    drop_path_rate=0.0)
  model.pixel_decoder.update(num_heads=4, num_points=4, num_layers=1, ffn_dim=128)
  model.beit3.update(embed_dim=64, num_layers=2, num_heads=2, ffn_dim=256, vocab_size=128,
                     drop_path_rate=0.0)
  model.decoder.update(num_heads=4, ffn_dim=128, num_layers=3, text_num_heads=4)
  model.existence.update(num_layers=1, num_heads=4, ffn_dim=128)
  config.model = model

  config.data = data_common.synthetic_data("shapes64")
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.eval_splits = ("val", "test")

  # The official step schedule (§9) shortened: lr x0.1 in the last epoch.
  common.add_training(config, epochs=arg.epochs, warmup_epochs=0, decay_epochs=(arg.epochs,))
  config.loss.num_points = 256  # of the 64x64 = 4096 mask pixels (the loss dominates on CPU)
  config.optimizer.update(lr=2e-3, clip_norm=1.0, frozen=(), lr_multipliers=())
  config.train.update(seed=0, log_every_steps=25, eval_every_epochs=1, checkpoint_every_steps=0,
                      checkpoint_every_epochs=2, keep_checkpoints=2)
  # eval_config("synthetic"): training evaluates val (train_splits) at tau 0.7, the best
  # checkpoint is the highest val cIoU (best_metric; gIoU is the other GRES choice) from
  # epoch 0 on (best_start_epoch).
  config.eval = eval_common.eval_config("synthetic", config.data)
  return config_check.link_shared(config)
