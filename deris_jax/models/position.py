"""2-D sine position code of DETR / Mask2Former (`PositionEmbeddingSine`), as a static table.

The code depends only on the map size, so it is built in numpy at trace time (a constant in
the jitted graph), with the same float32 arithmetic as the official module:
  y = row index + 1, x = column index + 1 (a cumulative sum of an all-valid mask),
  normalised: y / (H + eps) * scale (likewise x with W),
  dim_t[i] = temperature ** (2 * floor(i / 2) / num_pos_feats),
  channel 2k = sin(p / dim_t[2k]), channel 2k+1 = cos(p / dim_t[2k+1]),
  output = concat(code(y), code(x)) along channels.
"""
import math

import numpy as np


def sine_position_2d(height: int, width: int, num_pos_feats: int, *,
                     temperature: float = 10000.0, normalize: bool = True,
                     scale: float = 2 * math.pi, eps: float = 1e-6) -> np.ndarray:
  """The (height, width, 2 * num_pos_feats) float32 sine code of a map without padding.

  Args:
    height, width: the map size.
    num_pos_feats: channels per axis (the official `N_steps = conv_dim // 2`).
    temperature, normalize, scale, eps: as `PositionEmbeddingSine` (normalize=True, scale 2*pi
      and eps 1e-6 in DeRIS's pixel decoder and transformer decoder).
  Returns:
    float32 array; channels [0, num_pos_feats) code the row, the rest the column.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"sine_position_2d: map size must be positive, got {height}x{width}")
  if num_pos_feats <= 0 or num_pos_feats % 2:
    raise ValueError(f"sine_position_2d: num_pos_feats must be positive and even, got "
                     f"{num_pos_feats}")
  f32 = np.float32
  y_embed = np.broadcast_to(np.arange(1, height + 1, dtype=f32)[:, None], (height, width))  # (H, W)
  x_embed = np.broadcast_to(np.arange(1, width + 1, dtype=f32)[None, :], (height, width))  # (H, W)
  if normalize:
    y_embed = y_embed / (y_embed[-1:, :] + f32(eps)) * f32(scale)
    x_embed = x_embed / (x_embed[:, -1:] + f32(eps)) * f32(scale)
  dim_t = np.arange(num_pos_feats, dtype=f32)
  dim_t = np.power(f32(temperature), f32(2) * np.floor(dim_t / f32(2)) / f32(num_pos_feats))
  pos_x = x_embed[:, :, None] / dim_t  # (H, W, F)
  pos_y = y_embed[:, :, None] / dim_t  # (H, W, F)

  def interleave(pos):
    # [sin(p/d0), cos(p/d1), sin(p/d2), cos(p/d3), ...]
    return np.stack((np.sin(pos[..., 0::2]), np.cos(pos[..., 1::2])), axis=-1).reshape(
        pos.shape)

  return np.concatenate((interleave(pos_y), interleave(pos_x)), axis=-1).astype(f32)  # (H, W, 2F)
