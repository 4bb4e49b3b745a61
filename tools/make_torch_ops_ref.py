"""Writes tests/data/torch_ops_ref.npz: PyTorch interpolate / grid_sample / avg_pool outputs.

Developer tool (needs torch, which the project does not): `python tools/make_torch_ops_ref.py`.
"""
import numpy as np
import torch
import torch.nn.functional as F

rng = np.random.default_rng(0)
x = (20 * rng.standard_normal((2, 3, 7, 9))).astype(np.float32)
res = {}
for (h, w) in [(14, 18), (3, 4), (7, 9), (28, 5), (1, 1), (37, 50), (61, 13)]:
  for ac in [False, True]:
    res[f"{h}_{w}_{ac}"] = F.interpolate(torch.from_numpy(x), size=(h, w), mode='bilinear', align_corners=ac).numpy()
# grid sample
pts = rng.uniform(-0.3, 1.3, (2, 11, 2)).astype(np.float32)
maps = rng.standard_normal((2, 5, 6)).astype(np.float32)
gs = F.grid_sample(torch.from_numpy(maps)[:, None], torch.from_numpy(2*pts-1)[:, None], mode='bilinear', padding_mode='zeros', align_corners=False)[:, 0, 0].numpy()
pool = F.avg_pool2d(torch.from_numpy(x), 2, 2).numpy()
big = (20 * rng.standard_normal((1, 2, 24, 24))).astype(np.float32)
res['big_96'] = F.interpolate(torch.from_numpy(big), size=(96, 96), mode='bilinear', align_corners=True).numpy()
res['big_37_50'] = F.interpolate(torch.from_numpy(big), size=(37, 50), mode='bilinear', align_corners=False).numpy()
np.savez('tests/data/torch_ops_ref.npz', x=x, big=big, pts=pts, maps=maps, gs=gs, pool=pool, **res)
