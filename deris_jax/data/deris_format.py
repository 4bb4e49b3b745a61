"""Readers for the annotation files the official DeRIS README points to (SeqTR-style JSON).

- RefCOCO/+/g: `annotations/mixed-seg/instances_nogoogle_withid.json`, top-level keys `train`
  (RefCOCO + RefCOCO+ + RefCOCOg-umd train, mixed) and the nine evaluation splits
  (docs/design.md §8). An entry: `image_id`, `expressions` (list of str), `mask` (polygons or
  RLE), `id` (annotation id, must be > 0: official issue #6), `height`, `width`.
- gRefCOCO: `annotations/grefs/instances.json` (the README spells it `instance.json`; both are
  accepted). An entry: `image_id`, `expressions` {"raw": str}, `annotations` (list of
  {id, segmentation, empty, ...}; a no-target entry has one placeholder with `empty` true or
  id -1), `height`, `width`.
Images: `images/mscoco/train2014/COCO_train2014_%012d.jpg`.
"""
import dataclasses
import json
import os
from typing import Any

from deris_jax.data import entries as E
from deris_jax.data import text as T

MIXED_FILE = os.path.join("annotations", "mixed-seg", "instances_nogoogle_withid.json")
GREFS_FILES = (os.path.join("annotations", "grefs", "instances.json"),
               os.path.join("annotations", "grefs", "instance.json"))
IMAGES_DIR = os.path.join("images", "mscoco", "train2014")

# Split name in the DeRIS file -> source dataset label (docs/design.md §8).
MIXED_SPLITS = {
    "train": "refcoco_mixed",
    "val_refcoco_unc": "refcoco_unc",
    "testA_refcoco_unc": "refcoco_unc",
    "testB_refcoco_unc": "refcoco_unc",
    "val_refcocoplus_unc": "refcocoplus_unc",
    "testA_refcocoplus_unc": "refcocoplus_unc",
    "testB_refcocoplus_unc": "refcocoplus_unc",
    "val_refcocog_umd": "refcocog_umd",
    "test_refcocog_umd": "refcocog_umd",
}
GREFCOCO_SPLITS = ("train", "val", "testA", "testB")


def coco_image_path(images_dir: str, image_id: int) -> str:
  return os.path.join(images_dir, "COCO_train2014_%012d.jpg" % image_id)


def load_json(path: str) -> Any:
  try:
    with open(path, "r") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise E.DataError(f"{path} is not valid JSON: {e}") from e


def _top_level_splits(data: Any, path: str, wanted) -> None:
  if not isinstance(data, dict):
    raise E.DataError(f"{path}: expected a JSON object keyed by split, got {type(data).__name__}")
  missing = [s for s in wanted if s not in data]
  if missing:
    raise E.DataError(f"{path}: missing split(s) {missing}; found keys {sorted(data)}")


def _image_info(record: dict, image_id: int, images_dir: str, where: str) -> E.ImageInfo:
  return E.ImageInfo(image_id=image_id, path=coco_image_path(images_dir, image_id),
                     height=E.as_int(E.field(record, "height", where), "height", where),
                     width=E.as_int(E.field(record, "width", where), "width", where),
                     where=where)


def _add_image(images: dict, info: E.ImageInfo) -> None:
  known = images.setdefault(info.image_id, info)
  if (known.height, known.width) != (info.height, info.width):
    raise E.DataError(f"{info.where}: image {info.image_id} has height/width "
                      f"{info.height}x{info.width} but {known.where} says "
                      f"{known.height}x{known.width}")


def _add_segmentation(segmentations: dict, ann_id: int, segmentation: Any, where: str) -> None:
  known = segmentations.setdefault(ann_id, segmentation)
  if known != segmentation:
    raise E.DataError(f"{where}: annotation id {ann_id} appears with two different masks")


def _clean_expressions(raw: Any, where: str, report: E.SkipReport) -> tuple[str, ...]:
  """The non-empty expressions of a record (each empty one is a reported error)."""
  if isinstance(raw, str):
    raw = [raw]
  if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
    raise E.DataError(f"{where}: 'expressions' must be a string or a list of strings, got {raw!r}")
  kept = []
  for i, text in enumerate(raw):
    if T.is_empty_expression(text):
      report.bad("empty expression", f"{where}: expression {i} ({text!r}) is empty after cleaning")
    else:
      kept.append(text)
  return tuple(kept)


def _split_entries(entry: E.Entry, train: bool) -> list[E.Entry]:
  """Evaluation entries carry one expression each; training entries keep all of theirs."""
  if train or len(entry.expressions) == 1:
    return [entry]
  return [dataclasses.replace(entry, expressions=(text,)) for text in entry.expressions]


def _records(data: dict, path: str, split: str):
  """(index in the file, where, record, image id) of each entry of a split's list."""
  records = data[split]
  if not isinstance(records, list):
    raise E.DataError(f"{path}: split '{split}' must be a list of entries")
  for index, record in enumerate(records):
    where = f"{path}: split '{split}' entry {index}"
    yield index, where, record, E.as_int(E.field(record, "image_id", where), "image_id", where)


def read_refcoco_mixed(manual_dir: str, report: E.SkipReport) -> dict[str, E.SplitData]:
  """`instances_nogoogle_withid.json` -> {split: SplitData} for the nine DeRIS splits."""
  path = E.require_file(os.path.join(manual_dir, MIXED_FILE),
                        "the DeRIS RefCOCO/+/g annotations (HF dataset Dmmm997/DeRIS_Data)")
  images_dir = E.require_dir(os.path.join(manual_dir, IMAGES_DIR), "the COCO train2014 images")
  data = load_json(path)
  _top_level_splits(data, path, MIXED_SPLITS)
  out = {}
  for split, source in MIXED_SPLITS.items():
    split_data = E.SplitData(entries=[], images={}, segmentations={})
    for index, where, record, image_id in _records(data, path, split):
      ann_id = record.get("id") if isinstance(record, dict) else None
      if isinstance(ann_id, bool) or not isinstance(ann_id, int) or ann_id <= 0:
        report.bad("annotation without a positive id",
                   f"{where}: annotation 'id' is {ann_id!r}; it must be a positive integer "
                   "(without it the official code trains with a zero mask loss, DeRIS issue #6; "
                   "use instances_nogoogle_withid.json)")
        continue
      expressions = _clean_expressions(E.field(record, "expressions", where), where, report)
      if not expressions:
        continue
      _add_image(split_data.images, _image_info(record, image_id, images_dir, where))
      _add_segmentation(split_data.segmentations, ann_id, E.field(record, "mask", where), where)
      entry = E.Entry(image_id, expressions, (ann_id,), source, where, file_index=index)
      split_data.entries.extend(_split_entries(entry, train=split == "train"))
    out[split] = split_data
  return out


def _grefcoco_targets(record: dict, where: str, report: E.SkipReport,
                      segmentations: dict) -> tuple[int, ...] | None:
  """Target annotation ids of a gRefCOCO entry; () = no target; None = skipped record."""
  annotations = E.field(record, "annotations", where)
  if not isinstance(annotations, list) or not annotations:
    raise E.DataError(f"{where}: 'annotations' must be a non-empty list (a no-target entry "
                      "holds one placeholder with \"empty\": true)")
  targets = []
  found = {}
  for k, ann in enumerate(annotations):
    ann_where = f"{where} annotation {k}"
    if not isinstance(ann, dict):
      raise E.DataError(f"{ann_where}: expected an object, got {type(ann).__name__}")
    ann_id = ann.get("id")
    placeholder = ann.get("empty") is True or (ann_id == -1 and ann.get("segmentation") is None)
    if placeholder:
      continue
    if isinstance(ann_id, bool) or not isinstance(ann_id, int) or ann_id <= 0:
      report.bad("annotation without a positive id",
                 f"{ann_where}: target annotation 'id' is {ann_id!r}; it must be a positive "
                 "integer (DeRIS issue #6: without it the mask loss is silently zero)")
      return None
    if ann.get("segmentation") is None:
      report.bad("mask does not decode", f"{ann_where}: target annotation {ann_id} has no "
                 "'segmentation'")
      return None
    found[ann_id] = (ann["segmentation"], ann_where)
    targets.append(ann_id)
  if targets and len(targets) != len(set(targets)):
    raise E.DataError(f"{where}: the same annotation id is listed twice: {targets}")
  for ann_id, (segmentation, ann_where) in found.items():
    _add_segmentation(segmentations, ann_id, segmentation, ann_where)
  return tuple(sorted(targets))


def read_grefcoco(manual_dir: str, report: E.SkipReport) -> dict[str, E.SplitData]:
  """`grefs/instances.json` (or `instance.json`) -> {split: SplitData}."""
  candidates = [os.path.join(manual_dir, name) for name in GREFS_FILES]
  path = next((p for p in candidates if os.path.isfile(p)), None)
  if path is None:
    E.require_file(candidates[0], f"the DeRIS gRefCOCO annotations (also accepted: "
                   f"{candidates[1]}; HF dataset Dmmm997/DeRIS_Data)")
  images_dir = E.require_dir(os.path.join(manual_dir, IMAGES_DIR), "the COCO train2014 images")
  data = load_json(path)
  _top_level_splits(data, path, GREFCOCO_SPLITS)
  out = {}
  for split in GREFCOCO_SPLITS:
    split_data = E.SplitData(entries=[], images={}, segmentations={})
    for index, where, record, image_id in _records(data, path, split):
      expressions = E.field(record, "expressions", where)
      if not isinstance(expressions, dict) or "raw" not in expressions:
        raise E.DataError(f"{where}: 'expressions' must be an object with a 'raw' sentence, "
                          f"got {expressions!r}")
      texts = _clean_expressions(expressions["raw"], where, report)
      if not texts:
        continue
      targets = _grefcoco_targets(record, where, report, split_data.segmentations)
      if targets is None:
        continue
      _add_image(split_data.images, _image_info(record, image_id, images_dir, where))
      entry = E.Entry(image_id, texts, targets, "grefcoco", where, file_index=index)
      split_data.entries.extend(_split_entries(entry, train=split == "train"))
    out[split] = split_data
  return out
