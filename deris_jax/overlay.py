"""Pictures of a prediction that people can read: the mask tinted and outlined over the image.

  render(pixels, mask, caption_lines) -> PIL image
The tint is whichever colour of PALETTE stands furthest from the masked pixels' mean colour
(so a red object is not tinted red), the mask's contour is drawn on top in the same colour at
full strength, and images smaller than MIN_DISPLAY_SIDE are upscaled by a whole factor for
display (image bilinear, mask nearest: every mask pixel becomes a square block). The caption
is wrapped to the picture's width in a white strip below it. The mask written as a file
(predict.py) stays at the image's own size; only this picture is scaled.
"""
import math
from typing import List, Sequence, Tuple

import numpy as np
import scipy.ndimage
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (0, 230, 255),  # cyan
    (255, 0, 200),  # magenta
    (255, 230, 0),  # yellow
    (40, 255, 40),  # green
    (40, 80, 255),  # blue
    (255, 40, 40),  # red
)
TINT_ALPHA = 0.45
MIN_DISPLAY_SIDE = 384  # smaller images are upscaled (whole factor) to at least this
FONT_SIZE = 15
MARGIN = 6


def contrasting_colour(pixels: np.ndarray, mask: np.ndarray) -> Tuple[int, int, int]:
  """The PALETTE colour furthest (RGB distance) from the mean colour under the mask (of the
  whole image when the mask is empty)."""
  region = pixels[mask] if mask.any() else pixels.reshape(-1, 3)  # (P, 3)
  mean = region.astype(np.float64).mean(axis=0)  # (3,)
  distances = [np.linalg.norm(np.asarray(c, np.float64) - mean) for c in PALETTE]
  return PALETTE[int(np.argmax(distances))]


def display_scale(height: int, width: int) -> int:
  """The whole factor that brings the longer side to at least MIN_DISPLAY_SIDE (1 if it is)."""
  return max(1, math.ceil(MIN_DISPLAY_SIDE / max(height, width)))


def contour(mask: np.ndarray, thickness: int) -> np.ndarray:
  """(H, W) bool: the mask's pixels within `thickness` of a pixel outside it (4-neighbours,
  the image border counting as outside)."""
  mask = np.asarray(mask, bool)
  if thickness < 1:
    return np.zeros_like(mask)
  inside = scipy.ndimage.binary_erosion(mask, iterations=thickness, border_value=0)  # cross
  return mask & ~inside


def wrap(text: str, font, width: int) -> List[str]:
  """Greedy word wrap to `width` pixels; a word wider than the width is cut where it must.

  Not `textwrap`: it counts characters, and a proportional font needs pixels."""
  lines: List[str] = []
  for paragraph in text.split("\n"):
    line = ""
    for word in paragraph.split():
      candidate = f"{line} {word}" if line else word
      if font.getlength(candidate) <= width:
        line = candidate
        continue
      if line:
        lines.append(line)
      line = word
      while font.getlength(line) > width and len(line) > 1:  # an over-long word
        cut = 1
        while cut < len(line) - 1 and font.getlength(line[:cut + 1]) <= width:
          cut += 1
        lines.append(line[:cut])
        line = line[cut:]
    lines.append(line)
  return lines


def render(pixels: np.ndarray, mask: np.ndarray, caption_lines: Sequence[str]) -> PIL.Image.Image:
  """(H, W, 3) uint8 image and (H, W) bool mask -> the overlay picture with its caption."""
  if pixels.shape[:2] != mask.shape:
    raise ValueError(f"mask {mask.shape} does not match the image {pixels.shape[:2]}")
  height, width = mask.shape
  scale = display_scale(height, width)
  size = (width * scale, height * scale)
  shown = np.asarray(PIL.Image.fromarray(pixels).resize(size, PIL.Image.BILINEAR), np.float32)
  big_mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)  # (H*s, W*s)
  colour = np.asarray(contrasting_colour(pixels, mask), np.float32)
  shown[big_mask] = (1 - TINT_ALPHA) * shown[big_mask] + TINT_ALPHA * colour
  thickness = max(2, round(max(size) / 250))
  shown[contour(big_mask, thickness)] = colour
  font = PIL.ImageFont.load_default(size=FONT_SIZE)
  lines = [line for text in caption_lines for line in wrap(text, font, size[0] - 2 * MARGIN)]
  line_height = FONT_SIZE + 5
  canvas = PIL.Image.new("RGB", (size[0], size[1] + 2 * MARGIN + line_height * len(lines)),
                         "white")
  canvas.paste(PIL.Image.fromarray(np.round(shown).astype(np.uint8)), (0, 0))
  draw = PIL.ImageDraw.Draw(canvas)
  for k, line in enumerate(lines):
    draw.text((MARGIN, size[1] + MARGIN + k * line_height), line, fill="black", font=font)
  return canvas


def prediction_caption(text: str, prediction) -> List[str]:
  """The expression, then the decision (`decision_lines`)."""
  return [f'"{text}"'] + decision_lines(prediction)


def decision_lines(prediction) -> List[str]:
  """The selected queries with their scores, and why there is no target when there is none.
  `prediction` is a `predictor.Prediction`."""
  scores, tau = prediction.scores, prediction.score_threshold
  lines = []
  if len(prediction.selected):
    chosen = ", ".join(f"{int(q)} ({scores[q]:.2f})" for q in prediction.selected)
    lines.append(f"tau {tau:g}: {len(prediction.selected)} of {len(scores)} queries selected: "
                 f"{chosen}")
  if prediction.no_target:
    if len(prediction.selected):  # only with existence_veto
      lines.append(f"no target: the existence head vetoes (p = {prediction.existence_prob:.2f})")
    else:
      best = int(np.argmax(scores))
      lines.append(f"no target: no query scores above tau {tau:g} (best: query {best}, "
                   f"{scores[best]:.2f})")
  return lines


def query_caption(text: str, prediction, query: int) -> List[str]:
  """Caption of one selected query's panel."""
  return [f'"{text}"', f"query {query}: score {prediction.scores[query]:.2f} "
                       f"(tau {prediction.score_threshold:g})"]
