"""A very small DeRIS on the tiny synthetic set: the test config of the training code.

Every part of DeRIS is present (Swin, pixel decoder, BEiT-3, loopback decoder with one
auxiliary round, existence head) at the smallest sizes that keep the architecture valid, so
the train step compiles in well under a minute on a 2-core CPU.
Usage: `--config configs/deris_micro.py`.
"""
from configs import common
from configs import data_common
from configs import eval_common
from deris_jax import config_check


def get_config(arg=None):
  del arg
  config = common.mlc.ConfigDict()
  model = common.model_config(swin="small", beit3="base", num_queries=4, max_tokens=12)
  model.hidden_dim = 32  # the pixel decoder's GroupNorm has 32 groups
  model.image_size = (32, 32)
  model.cognition_image_size = (32, 32)
  model.compat_group_size = 2
  model.swin.update(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)
  model.pixel_decoder.update(num_heads=2, num_points=2, num_layers=1, ffn_dim=32)
  model.beit3.update(embed_dim=32, num_layers=1, num_heads=2, ffn_dim=64, vocab_size=1000,
                     drop_path_rate=0.1)
  model.decoder.update(num_heads=2, ffn_dim=32, num_layers=1, text_num_heads=2)  # 1 aux round
  model.existence.update(num_layers=1, num_heads=2, ffn_dim=32)
  config.model = model
  config.data = data_common.synthetic_data("tiny")
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.eval_splits = ("val",)
  common.add_training(config, epochs=2, warmup_epochs=1, decay_epochs=(2,))
  config.loss.num_points = 64
  # Adam's eps 1e-4 instead of 1e-9: some parameters have an analytically zero gradient
  # (biases of convolutions followed by GroupNorm, attention key biases) and receive rounding
  # noise instead (measured <= 1.4e-8, against >= 4e-4 for every other parameter), which
  # depends on the reduction order of the mesh. With eps 1e-9 Adam scales that noise up to
  # updates of size lr, so sharded and single-device runs would differ by ~lr there; with 1e-4
  # noise moves them by < 1e-3 lr while real gradients keep Adam's normalised updates.
  config.optimizer.eps = 1e-4
  config.train.update(seed=0, log_every_steps=2, eval_every_epochs=0, checkpoint_every_steps=2,
                      async_checkpoint=False, tensorboard=False)
  config.sharding.fsdp_min_size = 0  # shard even tiny leaves, so tests exercise fsdp
  config.eval = eval_common.eval_config("micro", config.data)  # tau 0.7 (docs/design.md §5)
  return config_check.link_shared(config)
