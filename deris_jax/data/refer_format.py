"""Readers for the original REFER files (lichengunc/refer, gRefCOCO's grefer), as ReLA/LAVT use.

Folder tree under the manual dir:
  refcoco/refs(unc).p   refcoco/instances.json
  refcoco+/refs(unc).p  refcoco+/instances.json
  refcocog/refs(umd).p  refcocog/instances.json
  grefcoco/grefs(unc).json  grefcoco/instances.json
  images/mscoco/train2014/COCO_train2014_%012d.jpg
A ref: `ref_id`, `image_id`, `ann_id` (an int; a list in gRefCOCO, [-1] when there is no
target), `split`, `sentences` [{`raw`, `sent`, ...}], gRefCOCO adds `no_target`.
`instances.json` is COCO: `images` [{id, height, width}], `annotations` [{id, image_id,
segmentation}].

They produce the entries of `deris_format` (same splits, sources and grouping): the mixed
training split is the union of the three train splits with one entry per ref (all its
sentences), evaluation splits have one entry per sentence, gRefCOCO one entry per sentence.
Expressions are the `raw` sentences (as the DeRIS gRefCOCO file and NSC use).
"""
import dataclasses
import os
import pickle
from typing import Any

from deris_jax.data import deris_format
from deris_jax.data import entries as E
from deris_jax.data import text as T

# (folder, refs file, REFER split) for every DeRIS RefCOCO split (docs/design.md §8).
_REFCOCO_SOURCES = {
    "refcoco_unc": ("refcoco", "refs(unc).p"),
    "refcocoplus_unc": ("refcoco+", "refs(unc).p"),
    "refcocog_umd": ("refcocog", "refs(umd).p"),
}
GREFCOCO_DIR = "grefcoco"
GREFCOCO_REFS = "grefs(unc).json"


def _load_pickle(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return pickle.load(f)
  except (pickle.UnpicklingError, EOFError) as e:
    raise E.DataError(f"{path} is not a readable pickle: {e}") from e


class _Coco:
  """The parts of a COCO instances.json the builders need, indexed by id."""

  def __init__(self, path: str, images_dir: str):
    data = deris_format.load_json(path)
    for key in ("images", "annotations"):
      if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise E.DataError(f"{path}: expected a COCO file with a '{key}' list")
    self.path = path
    self.images = {}
    for index, image in enumerate(data["images"]):
      where = f"{path}: images[{index}]"
      image_id = E.as_int(E.field(image, "id", where), "id", where)
      self.images[image_id] = E.ImageInfo(
          image_id=image_id, path=deris_format.coco_image_path(images_dir, image_id),
          height=E.as_int(E.field(image, "height", where), "height", where),
          width=E.as_int(E.field(image, "width", where), "width", where), where=where)
    self.annotations = {}
    for index, ann in enumerate(data["annotations"]):
      where = f"{path}: annotations[{index}]"
      self.annotations[E.as_int(E.field(ann, "id", where), "id", where)] = ann

  def image(self, image_id: int, where: str) -> E.ImageInfo:
    if image_id not in self.images:
      raise E.DataError(f"{where}: image_id {image_id} is not in {self.path}")
    return self.images[image_id]

  def segmentation(self, ann_id: int, image_id: int, where: str, report: E.SkipReport):
    """The segmentation of annotation `ann_id`, or None (reported) when it is unusable."""
    ann = self.annotations.get(ann_id)
    if ann is None:
      report.bad("annotation id not in instances.json",
                 f"{where}: annotation id {ann_id} is not in {self.path}")
      return None
    if ann.get("image_id") != image_id:
      raise E.DataError(f"{where}: annotation {ann_id} belongs to image {ann.get('image_id')} in "
                        f"{self.path}, not to image {image_id}")
    if ann.get("segmentation") is None:
      report.bad("mask does not decode", f"{where}: annotation {ann_id} has no segmentation")
      return None
    return ann["segmentation"]


def _sentences(ref: dict, where: str, report: E.SkipReport) -> tuple[str, ...]:
  sentences = E.field(ref, "sentences", where)
  if not isinstance(sentences, list):
    raise E.DataError(f"{where}: 'sentences' must be a list")
  kept = []
  for i, sentence in enumerate(sentences):
    text = sentence.get("raw", sentence.get("sent")) if isinstance(sentence, dict) else None
    if not isinstance(text, str):
      raise E.DataError(f"{where}: sentence {i} has no 'raw' (or 'sent') string")
    if T.is_empty_expression(text):
      report.bad("empty expression", f"{where}: sentence {i} ({text!r}) is empty after cleaning")
    else:
      kept.append(text)
  return tuple(kept)


def _add(split_data: E.SplitData, info: E.ImageInfo, entry: E.Entry, train: bool,
         segmentations: dict) -> None:
  split_data.images[info.image_id] = info
  for ann_id, segmentation in segmentations.items():
    split_data.segmentations[ann_id] = segmentation
  if train:
    split_data.entries.append(entry)
  else:
    split_data.entries.extend(dataclasses.replace(entry, expressions=(text,))
                              for text in entry.expressions)


def read_refcoco_mixed(manual_dir: str, report: E.SkipReport) -> dict[str, E.SplitData]:
  """refs(unc|umd).p + instances.json of RefCOCO/+/g -> the nine DeRIS splits."""
  images_dir = E.require_dir(os.path.join(manual_dir, deris_format.IMAGES_DIR),
                             "the COCO train2014 images")
  out = {split: E.SplitData([], {}, {}) for split in deris_format.MIXED_SPLITS}
  for source, (folder, refs_name) in _REFCOCO_SOURCES.items():
    refs_path = E.require_file(os.path.join(manual_dir, folder, refs_name),
                               f"the REFER refs of {folder} (lichengunc/refer data)")
    coco = _Coco(E.require_file(os.path.join(manual_dir, folder, "instances.json"),
                                f"the COCO instances of {folder} (lichengunc/refer data)"),
                 images_dir)
    refs = _load_pickle(refs_path)
    if not isinstance(refs, list):
      raise E.DataError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    for index, ref in enumerate(refs):
      where = f"{refs_path}: ref {index}"
      ref_split = E.field(ref, "split", where)
      split = "train" if ref_split == "train" else f"{ref_split}_{source}"
      if split not in out:
        continue  # e.g. RefCOCOg-umd has no testA
      image_id = E.as_int(E.field(ref, "image_id", where), "image_id", where)
      ann_id = E.as_int(E.field(ref, "ann_id", where), "ann_id", where)
      if ann_id <= 0:
        report.bad("annotation without a positive id",
                   f"{where}: 'ann_id' is {ann_id}; it must be a positive integer")
        continue
      texts = _sentences(ref, where, report)
      if not texts:
        continue
      segmentation = coco.segmentation(ann_id, image_id, where, report)
      if segmentation is None:
        continue
      entry_source = deris_format.MIXED_SPLITS[split]
      _add(out[split], coco.image(image_id, where),
           E.Entry(image_id, texts, (ann_id,), entry_source, where, file_index=index),
           train=split == "train", segmentations={ann_id: segmentation})
  return out


def read_grefcoco(manual_dir: str, report: E.SkipReport) -> dict[str, E.SplitData]:
  """grefs(unc).json + instances.json -> {train, val, testA, testB}."""
  images_dir = E.require_dir(os.path.join(manual_dir, deris_format.IMAGES_DIR),
                             "the COCO train2014 images")
  refs_path = E.require_file(os.path.join(manual_dir, GREFCOCO_DIR, GREFCOCO_REFS),
                             "the gRefCOCO refs (henghuiding/gRefCOCO)")
  coco = _Coco(E.require_file(os.path.join(manual_dir, GREFCOCO_DIR, "instances.json"),
                              "the COCO instances shipped with gRefCOCO"), images_dir)
  refs = deris_format.load_json(refs_path)
  if not isinstance(refs, list):
    raise E.DataError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
  out = {split: E.SplitData([], {}, {}) for split in deris_format.GREFCOCO_SPLITS}
  for index, ref in enumerate(refs):
    where = f"{refs_path}: ref {index}"
    split = E.field(ref, "split", where)
    if split not in out:
      raise E.DataError(f"{where}: unknown split {split!r}; expected one of {sorted(out)}")
    image_id = E.as_int(E.field(ref, "image_id", where), "image_id", where)
    ann_ids = E.field(ref, "ann_id", where)
    ann_ids = ann_ids if isinstance(ann_ids, list) else [ann_ids]
    ann_ids = [E.as_int(a, "ann_id", where) for a in ann_ids]
    no_target = bool(ref.get("no_target", False))
    targets = [a for a in ann_ids if a != -1]
    if no_target:
      if targets:
        raise E.DataError(f"{where}: 'no_target' is true but 'ann_id' lists {targets}")
    elif not targets or any(a <= 0 for a in targets):
      report.bad("annotation without a positive id",
                 f"{where}: 'ann_id' is {ann_ids}; a ref with a target needs positive ids")
      continue
    texts = _sentences(ref, where, report)
    if not texts:
      continue
    segmentations = {}
    for ann_id in targets:
      segmentations[ann_id] = coco.segmentation(ann_id, image_id, where, report)
    if any(s is None for s in segmentations.values()):
      continue
    _add(out[split], coco.image(image_id, where),
         E.Entry(image_id, texts, tuple(sorted(targets)), "grefcoco", where,
                 file_index=index), train=False,
         segmentations=segmentations)
  return out
