"""deris_jax.overlay: a colour that stands out, the contour on top, upscaling, wrapped captions."""
import numpy as np
import PIL.Image
import PIL.ImageFont
import pytest

from deris_jax import overlay
from deris_jax.predictor import Prediction


def _red_circles(size: int = 64) -> tuple:
  """(pixels, mask): red discs on grey, the mask covering the first disc."""
  yy, xx = np.mgrid[:size, :size]
  first = (yy - 20) ** 2 + (xx - 20) ** 2 < 100
  second = (yy - 44) ** 2 + (xx - 44) ** 2 < 100
  pixels = np.full((size, size, 3), 128, np.uint8)
  pixels[first | second] = (220, 30, 30)
  return pixels, first


def test_the_tint_contrasts_with_the_object():
  pixels, mask = _red_circles()
  colour = overlay.contrasting_colour(pixels, mask)
  assert colour != (255, 40, 40) and colour[0] < 100  # not red: a cyan-like colour
  blue = np.zeros_like(pixels)
  blue[...] = (20, 40, 230)
  assert overlay.contrasting_colour(blue, mask)[2] < 100  # not blue on a blue object


def test_small_images_are_upscaled_and_the_mask_drawn_with_its_contour():
  pixels, mask = _red_circles(64)
  picture = overlay.render(pixels, mask, ["the red circle on the left"])
  scale = overlay.display_scale(64, 64)
  assert scale == 6 and picture.size[0] == 384 and picture.size[1] > 384
  shown = np.asarray(picture.convert("RGB"))[:384, :384].astype(int)
  plain = np.asarray(PIL.Image.fromarray(pixels).resize((384, 384), PIL.Image.BILINEAR),
                     np.float32)
  big_mask = np.repeat(np.repeat(mask, 6, axis=0), 6, axis=1)
  colour = np.asarray(overlay.contrasting_colour(pixels, mask))
  np.testing.assert_array_equal(shown[~big_mask], np.round(plain[~big_mask]))  # outside: as is
  edge = overlay.contour(big_mask, 2)
  assert edge.sum() > 0 and (shown[edge] == colour).all()  # the contour in full colour
  interior = big_mask & ~edge
  tinted = np.round((1 - overlay.TINT_ALPHA) * plain[interior] + overlay.TINT_ALPHA * colour)
  np.testing.assert_array_equal(shown[interior], tinted)


def test_large_images_are_not_scaled():
  pixels = np.zeros((500, 700, 3), np.uint8)
  assert overlay.display_scale(500, 700) == 1
  assert overlay.render(pixels, np.zeros((500, 700), bool), ["x"]).size[0] == 700


def test_contour_of_a_square():
  mask = np.zeros((8, 8), bool)
  mask[2:6, 2:6] = True
  edge = overlay.contour(mask, 1)
  assert edge.sum() == 12 and not edge[3:5, 3:5].any()  # the ring, not the 2x2 inside
  full = np.ones((3, 3), bool)
  assert overlay.contour(full, 1).sum() == 8  # the image border counts as outside


def test_captions_wrap_to_the_picture_width():
  font = PIL.ImageFont.load_default(size=overlay.FONT_SIZE)
  text = "the small red circle right next to the big blue square " * 3 + "z" * 120
  lines = overlay.wrap(text, font, 200)
  assert len(lines) > 4 and all(font.getlength(line) <= 200 for line in lines)
  assert " ".join(lines).replace("z", "").split() == text.replace("z", "").split()
  assert "".join(lines).count("z") == 120  # the over-long word is cut, not lost


def _prediction(scores, selected, no_target, existence=0.9):
  scores = np.asarray(scores, np.float32)
  return Prediction(mask=np.zeros((2, 2), bool), scores=scores, selected=np.asarray(selected),
                    query_masks=np.zeros((len(selected), 2, 2), bool), no_target=no_target,
                    existence_prob=existence, score_threshold=0.5, num_tokens=3,
                    truncated=False)


@pytest.mark.parametrize("prediction, expected", [
    (_prediction([0.2, 0.9, 0.7], [1, 2], False),
     ['"a cat"', "tau 0.5: 2 of 3 queries selected: 1 (0.90), 2 (0.70)"]),
    (_prediction([0.2, 0.4, 0.1], [], True),
     ['"a cat"', "no target: no query scores above tau 0.5 (best: query 1, 0.40)"]),
    (_prediction([0.2, 0.9, 0.1], [1], True, existence=0.2),
     ['"a cat"', "tau 0.5: 1 of 3 queries selected: 1 (0.90)",
      "no target: the existence head vetoes (p = 0.20)"]),
])
def test_the_caption_says_what_was_selected(prediction, expected):
  assert overlay.prediction_caption("a cat", prediction) == expected
  assert overlay.query_caption("a cat", prediction, 0)[1] == "query 0: score 0.20 (tau 0.5)"
