"""Writes tests/data/pretrained_interp_ref.npz: the official BEiT-3 position-table interpolation.

Developer tool (needs torch, which the project does not): run from the repository root with a
torch environment, `python tools/make_pretrained_ref.py`. Each case resizes the patch rows of a
random `beit3.encoder.embed_positions.A.weight` the way `deris/models/vis_encs/beit/beit3.py::
load_model_and_may_interpolate` does (3 leading rows kept: cls + the 2 fairseq offset rows;
patch rows reshaped to a square grid, `F.interpolate(mode='bicubic', align_corners=False)`,
flattened back), plus one plain `F.interpolate` of a non-square image.
"""
import numpy as np
import torch
import torch.nn.functional as F

NUM_EXTRA_TOKENS = 3  # cls + 2 (torchscale/fairseq positions start at 2)
# name -> (old grid side, new grid side, embedding dim)
CASES = {
    "tiny_6_to_4": (6, 4, 64),  # the table used by tests/test_pretrained.py's BEiT-3 file
    "ckpt224_to_tiny": (14, 4, 16),  # a 224 checkpoint into the tiny 64x64 config
    "ckpt224_to_384": (14, 24, 8),  # a 224 checkpoint at 384 (upsampling)
    "grid_3_to_7": (3, 7, 5),
}


def official_interpolation(table: torch.Tensor, new_size: int) -> torch.Tensor:
  """The official code path for the torchscale key (`torchscale_model = True`)."""
  dim = table.shape[-1]
  orig_size = int((table.shape[-2] - NUM_EXTRA_TOKENS) ** 0.5)
  extra_tokens = table[:NUM_EXTRA_TOKENS].unsqueeze(0)
  pos_tokens = table[NUM_EXTRA_TOKENS:]
  pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, dim).permute(0, 3, 1, 2).float()
  pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode="bicubic",
                             align_corners=False)
  pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
  return torch.cat((extra_tokens, pos_tokens), dim=1).squeeze(0)


def main():
  rng = np.random.default_rng(5)
  out = {}
  for name, (old, new, dim) in CASES.items():
    table = (0.02 * rng.standard_normal((NUM_EXTRA_TOKENS + old * old, dim))).astype(np.float32)
    out[f"{name}.input"] = table
    out[f"{name}.output"] = official_interpolation(torch.from_numpy(table), new).numpy()
  image = rng.standard_normal((2, 3, 5, 9)).astype(np.float32)
  out["image.input"] = image
  out["image.output_11x4"] = F.interpolate(torch.from_numpy(image), size=(11, 4), mode="bicubic",
                                           align_corners=False).numpy()
  out["torch_version"] = np.array(torch.__version__)
  np.savez("tests/data/pretrained_interp_ref.npz", **out)


if __name__ == "__main__":
  main()
