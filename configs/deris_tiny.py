"""The tiny random-weight DeRIS of the official fixture (../shared/fixtures/deris_tiny).

Every value equals the fixture's config.json (a test checks this); used by tests and the
parity check. Usage: `--config configs/deris_tiny.py`.
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.mlc.ConfigDict()
  model = common.model_config(swin="small", beit3="base", num_queries=10, max_tokens=12)
  model.hidden_dim = 32
  model.image_size = (128, 128)
  model.cognition_image_size = (64, 64)
  model.compat_group_size = 2  # the fixture's batch: its outputs are batch-of-2 values
  model.swin.update(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)
  model.pixel_decoder.update(num_heads=4, num_points=4, num_layers=2, ffn_dim=1024)
  model.beit3.update(embed_dim=64, num_layers=2, num_heads=2, ffn_dim=256, vocab_size=1000,
                     drop_path_rate=0.1)
  model.decoder.update(num_heads=4, ffn_dim=64, num_layers=3)
  config.model = model
  return config
