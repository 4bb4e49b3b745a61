"""TFDS builder `deris_synthetic`: coloured shapes with exact masks, no download needed.

Each image shows a few non-overlapping shapes (circle, square, triangle in red, green, blue,
yellow) on a noisy grey background. Expressions come from a small grammar and refer to one
object ("the red circle", "the leftmost square"), several ("all blue shapes", "the green
triangles") or none ("the yellow circle" when there is none). Everything is a function of the
config's seed. Preparation also trains a small sentencepiece model on the expressions and
stores it in the dataset metadata, so the pipeline tokenizes through the same XLM-R mapping as
with BEiT-3's `beit3.spm`, with no file to fetch. It is the project's default dataset
(quickstart, CI, examples).
"""
import dataclasses
import io

import numpy as np
import PIL.Image
from deris_jax.data.tf_modules import tfds

from deris_jax.data import entries as E
from deris_jax.data import masks as M
from deris_jax.data import referring_builder
from deris_jax.data import tokenizer as tok

COLORS = {"red": (220, 50, 47), "green": (60, 170, 60), "blue": (40, 90, 220),
          "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Sizes and counts of a synthetic variant (all deterministic from `seed`)."""
  image_size: int = 64  # square images, pixels
  num_images: tuple[tuple[str, int], ...] = (("train", 2000), ("val", 200), ("test", 200))
  min_objects: int = 1
  max_objects: int = 4
  min_radius: int = 6  # half the side of a shape's box, pixels
  max_radius: int = 11
  expressions_per_image: int = 4
  no_target_fraction: float = 0.2  # of the expressions, when the grammar can make one
  several_fraction: float = 0.3
  noise: int = 24  # background: grey 128 +- noise (uniform)
  vocab_size: int = 64  # upper bound for the stored sentencepiece model (one piece per word)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Shape:
  color: str
  kind: str
  cx: int
  cy: int
  radius: int


def _shape_mask(shape: Shape, size: int) -> np.ndarray:
  """Exact (size, size) uint8 mask of a shape (pixel centres inside the figure)."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  dx, dy = x - shape.cx, y - shape.cy
  r = shape.radius
  if shape.kind == "circle":
    inside = dx * dx + dy * dy <= r * r
  elif shape.kind == "square":
    inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
  else:  # triangle pointing up, apex at the top of the box
    inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
  return inside.astype(np.uint8)


def _place_shapes(rng: np.random.Generator, config: SyntheticConfig) -> list[Shape]:
  count = int(rng.integers(config.min_objects, config.max_objects + 1))
  shapes = []
  for _ in range(100 * count):
    if len(shapes) == count:
      break
    r = int(rng.integers(config.min_radius, config.max_radius + 1))
    cx = int(rng.integers(r + 1, config.image_size - r - 1))
    cy = int(rng.integers(r + 1, config.image_size - r - 1))
    if all(max(abs(cx - s.cx), abs(cy - s.cy)) > r + s.radius + 1 for s in shapes):
      shapes.append(Shape(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), cx, cy, r))
  return shapes


def _plural(kind: str) -> str:
  return kind + "s"


def _candidates(shapes: list[Shape]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
  """Every expression the grammar can say about the image, by kind: one / several / none."""
  out = {"one": [], "several": [], "none": []}

  def add(text, members):
    kind = "none" if not members else "one" if len(members) == 1 else "several"
    out[kind].append((text, tuple(sorted(members))))

  for color in COLORS:
    for kind in SHAPES:
      members = [i for i, s in enumerate(shapes) if s.color == color and s.kind == kind]
      add(f"the {color} {kind}" if len(members) <= 1 else f"the {color} {_plural(kind)}",
          members)
  for color in COLORS:
    members = [i for i, s in enumerate(shapes) if s.color == color]
    if len(members) >= 2:
      add(f"all {color} shapes", members)
  for kind in SHAPES:
    members = [i for i, s in enumerate(shapes) if s.kind == kind]
    if len(members) == 1:
      add(f"the {kind}", members)
    elif len(members) >= 2:
      add(f"all {_plural(kind)}", members)
      by_x = sorted(members, key=lambda i: shapes[i].cx)
      if shapes[by_x[1]].cx - shapes[by_x[0]].cx > 4:
        add(f"the {kind} on the left", [by_x[0]])
      if shapes[by_x[-1]].cx - shapes[by_x[-2]].cx > 4:
        add(f"the {kind} on the right", [by_x[-1]])
  return out


def _choose_expressions(rng, shapes, config) -> list[tuple[str, tuple[int, ...]]]:
  candidates = _candidates(shapes)
  chosen, used = [], set()
  for _ in range(config.expressions_per_image):
    draw = rng.random()
    kind = ("none" if draw < config.no_target_fraction else
            "several" if draw < config.no_target_fraction + config.several_fraction else "one")
    pool = [c for c in candidates[kind] if c[0] not in used] or [
        c for k in ("one", "several", "none") for c in candidates[k] if c[0] not in used]
    if not pool:
      break
    text, members = pool[int(rng.integers(len(pool)))]
    used.add(text)
    chosen.append((text, members))
  return chosen


def _render(rng, shapes, config) -> tuple[np.ndarray, list[np.ndarray]]:
  size = config.image_size
  image = 128 + rng.integers(-config.noise, config.noise + 1, size=(size, size, 1))
  image = np.repeat(image, 3, axis=2).astype(np.int64)
  masks = []
  for shape in shapes:
    mask = _shape_mask(shape, size)
    image[mask > 0] = COLORS[shape.color]
    masks.append(mask)
  return image.astype(np.uint8), masks


def generate_split(config: SyntheticConfig, split: str, num_images: int) -> E.SplitData:
  """The SplitData of one synthetic split (ann id = 1000 * image id + object index + 1)."""
  split_seed = [config.seed, [name for name, _ in config.num_images].index(split)]
  rng = np.random.default_rng(split_seed)
  data = E.SplitData(entries=[], images={}, segmentations={})
  for image_number in range(num_images):
    image_id = image_number + 1
    shapes = _place_shapes(rng, config)
    image, masks = _render(rng, shapes, config)
    png = io.BytesIO()
    PIL.Image.fromarray(image).save(png, format="png")
    where = f"synthetic {split} image {image_id}"
    data.images[image_id] = E.ImageInfo(image_id, f"{split}/{image_id}.png", config.image_size,
                                        config.image_size, where, png.getvalue())
    for k, mask in enumerate(masks):
      runs = M.mask_to_runs(mask)
      data.segmentations[1000 * image_id + k + 1] = {
          "size": [config.image_size, config.image_size], "counts": runs.tolist()}
    for text, members in _choose_expressions(rng, shapes, config):
      targets = tuple(1000 * image_id + m + 1 for m in members)
      data.entries.append(E.Entry(image_id, (text,), targets, "synthetic", where,
                                  file_index=len(data.entries)))
  return data


class DerisSynthetic(referring_builder.ReferringBuilder):
  """Synthetic referring segmentation: coloured shapes, expressions with 0, 1 or n targets."""

  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = None
  BUILDER_CONFIGS = [
      SyntheticConfig(name="shapes64", description="64x64 images, 2000/200/200 images"),
      SyntheticConfig(name="tiny", description="32x32 images, 24/8/8 images (tests)",
                      image_size=32, num_images=(("train", 24), ("val", 8), ("test", 8)),
                      min_radius=3, max_radius=6, max_objects=4, expressions_per_image=3),
  ]

  def read_splits(self, manual_dir, report):
    del manual_dir, report
    config = self.builder_config
    return {split: generate_split(config, split, count) for split, count in config.num_images}

  def extra_metadata(self, prepared):
    texts = [t for p in prepared.values() for e in p.entries for t in e.expressions]
    model = tok.train_sentencepiece(texts, self.builder_config.vocab_size, model_type="word")
    return {"tokenizer_spm": model.hex()}
