"""The TFDS builder shared by RefCOCO, gRefCOCO and the synthetic set: validate, index, write.

One TFDS example per image (an image is shared by many expressions; storing it once keeps
gRefCOCO at the size of its images instead of ~14 copies of each):
  image        the file's bytes, unchanged (JPEG for COCO, PNG for the synthetic set)
  image_id, image_index (position in the split), height, width
  objects      the referred instances: `id` (annotation id) and `rle` (plain column-major run
               lengths, zeros first, at the original resolution)
  entries      the referring entries on this image: `row` (position in the split's index),
               `expressions`, `targets` (indices into `objects`), `source`
Examples are written in image-id order (`disable_shuffling`) in the ArrayRecord format, so the
pipeline reads any image by its position (random access): it visits entries in any order
(a fresh permutation every epoch, the annotation file's order for evaluation), one entry at a
time, as the official loader does.

Rows (the split's entries) keep the order of the annotation file (the readers' order; an
evaluation record with several sentences becomes consecutive rows). `info.metadata` holds the
split index the pipeline needs on the host (per row: image position, image id, expressions,
source, number of targets, index in the file; per image: id and size), which also maps an
`example_id` back to its image and expression. The NSC bank is built from it.

Preparation checks every image (readable by the pipeline's decoder, size as annotated) and
every mask (decodes); see `entries.SkipReport` for what `skip_invalid` does. It also counts
JPEGs that carry an EXIF orientation (decoded as stored, without rotation: the COCO masks and
sizes are in stored pixel order) and warns when an image of the training split is also in an
evaluation split of the same dataset.
"""
import abc
import concurrent.futures
import dataclasses
import io
import os
from typing import Any

import numpy as np
import PIL.Image
from deris_jax.data.tf_modules import tf, tfds

from deris_jax import cli
from deris_jax.data import entries as E
from deris_jax.data import masks as M

# example_id = SPLIT_STRIDE * (position of the split in `metadata['split_names']`) + row.
SPLIT_STRIDE = 10**9
FILE_FORMAT = "array_record"  # random access by image position (the pipeline needs it)
EXIF_ORIENTATION = 0x0112
TRAIN_SPLIT = "train"

FEATURES = tfds.features.FeaturesDict({
    "image": tfds.features.Image(encoding_format=None),
    "image_id": np.int64,
    "image_index": np.int64,
    "height": np.int32,
    "width": np.int32,
    "objects": tfds.features.Sequence({
        "id": np.int64,
        "rle": tfds.features.Sequence(np.int32),
    }),
    "entries": tfds.features.Sequence({
        "row": np.int64,
        "expressions": tfds.features.Sequence(tfds.features.Text()),
        "targets": tfds.features.Sequence(np.int32),
        "source": tfds.features.Text(),
    }),
})


def check_image_bytes(data: bytes) -> tuple[int, int]:
  """(height, width) of an image as the pipeline decodes it; raises ValueError if it cannot."""
  if not data:
    raise ValueError("the file is empty")
  try:
    if tf.io.is_jpeg(data):
      shape = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").shape
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
      shape = tf.io.decode_png(data, channels=3).shape
    else:
      raise ValueError("not a JPEG or PNG file")
  except tf.errors.OpError as e:
    raise ValueError(e.message.split("\n")[0]) from e
  return int(shape[0]), int(shape[1])


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation tag of a JPEG (1 = as stored; 0 when there is none)."""
  if not data.startswith(b"\xff\xd8"):
    return 0
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      return int(image.getexif().get(EXIF_ORIENTATION, 0))
  except (OSError, ValueError, SyntaxError):
    return 0


def _read_and_check(info: E.ImageInfo
                    ) -> tuple[int, str | None, tuple[int, int] | None, int]:
  """(image id, error or None, decoded (height, width), EXIF orientation)."""
  try:
    if info.data is not None:
      data = info.data
    else:
      if not os.path.isfile(info.path):
        return info.image_id, f"missing image file {info.path}", None, 0
      with open(info.path, "rb") as f:
        data = f.read()
    return info.image_id, None, check_image_bytes(data), exif_orientation(data)
  except (OSError, ValueError) as e:
    return info.image_id, f"unreadable image {info.path}: {e}", None, 0


@dataclasses.dataclass
class PreparedSplit:
  """A validated split: rows (entries) in file order, images, decoded instance masks."""
  entries: list[E.Entry]
  images: list[E.ImageInfo]  # sorted by image id; image_index = position
  runs: dict[int, np.ndarray]  # annotation id -> run lengths
  exif_rotated: list[int] = dataclasses.field(default_factory=list)  # image ids


def prepare_split(name: str, data: E.SplitData, report: E.SkipReport,
                  num_threads: int | None = None) -> PreparedSplit:
  """Checks images and masks of one split, drops what `report` allows, orders the rows."""
  needed = sorted({e.image_id for e in data.entries})
  bad_images, exif_rotated = set(), []
  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
    for image_id, error, shape, orientation in pool.map(_read_and_check,
                                                         (data.images[i] for i in needed)):
      if orientation > 1:
        exif_rotated.append(image_id)
      info = data.images[image_id]
      if error is not None:
        reason = "missing image" if error.startswith("missing") else "unreadable image"
        report.bad(reason, f"split '{name}': {error} (annotated at {info.where})")
        bad_images.add(image_id)
      elif shape != (info.height, info.width):
        report.bad("image size differs from the annotation",
                   f"split '{name}': image {info.path} is {shape[0]}x{shape[1]} (HxW) but "
                   f"{info.where} says {info.height}x{info.width}")
        bad_images.add(image_id)
  runs, bad_masks = {}, set()
  heights = {i: (data.images[i].height, data.images[i].width) for i in needed}
  for entry in data.entries:
    if entry.image_id in bad_images:
      continue
    height, width = heights[entry.image_id]
    for ann_id in entry.target_ids:
      if ann_id in runs or ann_id in bad_masks:
        continue
      try:
        mask = M.decode_segmentation(data.segmentations[ann_id], height, width)
      except M.MaskDecodeError as e:
        report.bad("mask does not decode",
                   f"split '{name}': the mask of annotation {ann_id} ({entry.where}) does not "
                   f"decode: {e}")
        bad_masks.add(ann_id)
        continue
      runs[ann_id] = M.mask_to_runs(mask)
  kept = [e for e in data.entries  # the readers' (= the annotation file's) order
          if e.image_id not in bad_images and not bad_masks.intersection(e.target_ids)]
  image_ids = sorted({e.image_id for e in kept})
  return PreparedSplit(entries=kept, images=[data.images[i] for i in image_ids], runs=runs,
                       exif_rotated=sorted(i for i in exif_rotated if i in set(image_ids)))


def split_index(prepared: PreparedSplit) -> dict[str, Any]:
  """The host-side index of a split (stored in `info.metadata`), rows in file order."""
  position = {info.image_id: k for k, info in enumerate(prepared.images)}
  return {
      "rows": {
          "image_index": [position[e.image_id] for e in prepared.entries],
          "image_id": [e.image_id for e in prepared.entries],
          "expressions": [list(e.expressions) for e in prepared.entries],
          "source": [e.source for e in prepared.entries],
          "num_targets": [len(e.target_ids) for e in prepared.entries],
          "file_index": [e.file_index for e in prepared.entries],
      },
      "images": {
          "image_id": [i.image_id for i in prepared.images],
          "height": [i.height for i in prepared.images],
          "width": [i.width for i in prepared.images],
      },
      "max_targets": max((len(e.target_ids) for e in prepared.entries), default=0),
      "exif_rotated": prepared.exif_rotated,
  }


def shared_images(prepared: dict[str, PreparedSplit]) -> dict[str, list[int]]:
  """{evaluation split: ids of its images that the training split also uses}."""
  if TRAIN_SPLIT not in prepared:
    return {}
  train = {info.image_id for info in prepared[TRAIN_SPLIT].images}
  return {name: sorted(train.intersection(info.image_id for info in split.images))
          for name, split in prepared.items() if name != TRAIN_SPLIT}


def preparation_notes(index: dict[str, Any], overlap: dict[str, list[int]]) -> list[str]:
  """Warnings worth printing after preparation (EXIF orientations, train/eval overlap)."""
  notes = []
  for name, split in index.items():
    rotated = split.get("exif_rotated", [])
    if rotated:
      notes.append(f"warning: split '{name}': {len(rotated)} JPEG(s) carry an EXIF orientation "
                   f"(e.g. image ids {rotated[:3]}); they are decoded as stored, without "
                   "rotation, which is the pixel order of their annotations")
  for name, shared in overlap.items():
    if shared:
      notes.append(f"warning: {len(shared)} image(s) of the training split also appear in "
                   f"evaluation split '{name}' (e.g. image ids {shared[:3]}): training sees "
                   "those images (with other expressions)")
  return notes


def generate_examples(prepared: PreparedSplit):
  """(key, example) per image, keys = image_index so the written order is the index order."""
  rows_by_image = {}
  for row, entry in enumerate(prepared.entries):
    rows_by_image.setdefault(entry.image_id, []).append((row, entry))
  for image_index, info in enumerate(prepared.images):
    rows = rows_by_image[info.image_id]
    object_ids = sorted({a for _, entry in rows for a in entry.target_ids})
    slot = {a: k for k, a in enumerate(object_ids)}
    yield image_index, {
        "image": info.data if info.data is not None else info.path,
        "image_id": info.image_id,
        "image_index": image_index,
        "height": info.height,
        "width": info.width,
        "objects": [{"id": a, "rle": prepared.runs[a].astype(np.int32)} for a in object_ids],
        "entries": [{"row": row, "expressions": list(entry.expressions),
                     "targets": [slot[a] for a in entry.target_ids], "source": entry.source}
                    for row, entry in rows],
    }


class ReferringBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Base of the DeRIS TFDS builders: subclasses only read their files into `SplitData`s."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": "ArrayRecord files (random access); rows in annotation-file order.",
  }
  DESCRIPTION = ""
  # Nothing is downloaded, so there are no URL checksums. (TFDS would otherwise look for a
  # checksums file next to this module through `importlib_resources`, which tensorflow-datasets
  # 4.9.10 uses without declaring it as a dependency.)
  url_infos = None

  def __init__(self, *, skip_invalid: bool = False, **kwargs):
    self.skip_invalid = skip_invalid
    self.skip_report = None
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  # TFDS prints these two banners to stdout on every preparation (private hooks of
  # tfds.core.DatasetBuilder); they are the libraries' lines, shown at --verbosity 1.
  def _log_download_bytes(self) -> None:
    if cli.verbose():
      super()._log_download_bytes()

  def _log_download_done(self) -> None:
    if cli.verbose():
      super()._log_download_done()

  @abc.abstractmethod
  def read_splits(self, manual_dir: str | None, report: E.SkipReport) -> dict[str, E.SplitData]:
    """Reads the annotation files of the chosen builder config."""

  def extra_metadata(self, prepared: dict[str, PreparedSplit]) -> dict[str, Any]:
    """Anything else to keep in `info.metadata` (the synthetic set stores its tokenizer)."""
    del prepared
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=FEATURES,
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir if self.MANUAL_DOWNLOAD_INSTRUCTIONS else None
    self.skip_report = E.SkipReport(self.skip_invalid)
    splits = self.read_splits(str(manual_dir) if manual_dir else None, self.skip_report)
    prepared = {name: prepare_split(name, data, self.skip_report)
                for name, data in splits.items()}
    empty = [name for name, p in prepared.items() if not p.entries]
    if empty:
      raise E.DataError(f"split(s) {empty} have no usable entries left")
    print(f"[{self.name}/{self.builder_config.name}] {self.skip_report.summary()}")
    self.info.metadata["split_names"] = list(prepared)
    self.info.metadata["splits"] = {name: split_index(p) for name, p in prepared.items()}
    self.info.metadata["skipped"] = dict(self.skip_report.counts)
    self.info.metadata["train_images_in_eval_splits"] = shared_images(prepared)
    self.info.metadata.update(self.extra_metadata(prepared))
    return {name: self._generate_examples(p) for name, p in prepared.items()}

  def _generate_examples(self, prepared: PreparedSplit):
    return generate_examples(prepared)
