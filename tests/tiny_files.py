"""Writes a tiny manual dir in both official formats (DeRIS JSON and REFER) from one definition.

Used by the tests and handy for smoke-testing a pipeline without COCO: three small JPEG
images, five annotations (polygons, a two-part polygon, a compressed RLE, an uncompressed
RLE), RefCOCO/+/g refs covering every DeRIS split, and gRefCOCO refs with multi-target and
no-target expressions. Every mask is a union of axis-aligned integer rectangles, whose area
pycocotools rasterises to exactly width x height, so `ANNOTATION_AREAS` is known in closed form.
"""
import io
import json
import os
import pickle

import numpy as np
import PIL.Image
from pycocotools import mask as mask_util

from deris_jax.data import deris_format
from deris_jax.data import masks as M
from deris_jax.data import refer_format

IMAGES = {9: (40, 50), 25: (36, 30), 30: (48, 40)}  # image_id -> (height, width)


def _rect(x0, y0, x1, y1):
  return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def _rect_mask(height, width, *rects):
  mask = np.zeros((height, width), np.uint8)
  for x0, y0, x1, y1 in rects:
    mask[y0:y1, x0:x1] = 1
  return mask


_RLE_103 = _rect_mask(36, 30, (3, 4, 13, 20))  # 160 pixels
_RLE_104 = _rect_mask(48, 40, (10, 10, 30, 12), (5, 30, 8, 40))  # 40 + 30 pixels
ANNOTATIONS = {  # ann_id -> (image_id, segmentation)
    101: (9, [_rect(2, 3, 12, 9)]),  # 60
    102: (9, [_rect(20, 5, 30, 25), _rect(40, 30, 45, 38)]),  # 200 + 40
    103: (25, {"size": [36, 30],
               "counts": mask_util.encode(np.asfortranarray(_RLE_103))["counts"].decode()}),
    104: (30, {"size": [48, 40], "counts": M.mask_to_runs(_RLE_104).tolist()}),
    105: (25, [_rect(15, 20, 25, 33)]),  # 130
}
ANNOTATION_AREAS = {101: 60, 102: 240, 103: 160, 104: 70, 105: 130}

# (folder, refs file, [(ref_id, split, image_id, ann_id, sentences)])
REFCOCO_REFS = {
    "refcoco_unc": ("refcoco", "refs(unc).p", [
        (1, "train", 9, 101, ["The man on the LEFT.", "left guy"]),
        (2, "val", 25, 103, ["red-ish box"]),
        (3, "testA", 30, 104, ["bottom thing", "the striped one"]),
        (4, "testB", 25, 105, ["lower square"]),
    ]),
    "refcocoplus_unc": ("refcoco+", "refs(unc).p", [
        (11, "train", 9, 102, ["two parts"]),
        (12, "val", 30, 104, ["thin bar"]),
        (13, "testA", 9, 101, ["small one"]),
        (14, "testB", 25, 103, ["tall box"]),
    ]),
    "refcocog_umd": ("refcocog", "refs(umd).p", [
        (21, "train", 25, 105, ["a square below the box", "square"]),
        (22, "val", 9, 101, ["the small rectangle near the top left corner"]),
        (23, "test", 30, 104, ["the bar and its little friend"]),
    ]),
}
# (ref_id, split, image_id, ann_ids ([-1] = no target), sentences)
GREFCOCO_REFS = [
    (31, "train", 9, [101, 102], ["both shapes", "everything here"]),
    (32, "train", 25, [-1], ["the purple elephant"]),
    (33, "train", 30, [104], ["the bar"]),
    (34, "val", 25, [103, 105], ["the two boxes"]),
    (35, "val", 9, [-1], ["a dog on the right"]),
    (36, "testA", 30, [104], ["long thin bar"]),
    (37, "testB", 9, [101], ["top left rectangle"]),
]


def write_images(images_dir: str, seed: int = 0) -> None:
  os.makedirs(images_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  for image_id, (height, width) in IMAGES.items():
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="jpeg", quality=95)
    with open(deris_format.coco_image_path(images_dir, image_id), "wb") as f:
      f.write(buffer.getvalue())


def _coco_ann(ann_id):
  image_id, segmentation = ANNOTATIONS[ann_id]
  return {"id": ann_id, "image_id": image_id, "segmentation": segmentation, "bbox": [0, 0, 1, 1],
          "area": ANNOTATION_AREAS[ann_id], "iscrowd": int(isinstance(segmentation, dict)),
          "category_id": 1}


def _coco_instances(ann_ids) -> dict:
  return {"images": [{"id": i, "height": h, "width": w,
                      "file_name": "COCO_train2014_%012d.jpg" % i} for i, (h, w) in IMAGES.items()],
          "annotations": [_coco_ann(a) for a in sorted(ann_ids)],
          "categories": [{"id": 1, "name": "thing"}]}


def _sentence(text, sent_id):
  return {"raw": text, "sent": text.lower(), "tokens": text.lower().split(), "sent_id": sent_id}


def write_refer(manual_dir: str) -> None:
  """refs(unc|umd).p + instances.json per folder, grefs(unc).json, and the images."""
  write_images(os.path.join(manual_dir, deris_format.IMAGES_DIR))
  sent_id = 0
  for folder, refs_name, refs in REFCOCO_REFS.values():
    os.makedirs(os.path.join(manual_dir, folder), exist_ok=True)
    out = []
    for ref_id, split, image_id, ann_id, sentences in refs:
      out.append({"ref_id": ref_id, "split": split, "image_id": image_id, "ann_id": ann_id,
                  "category_id": 1, "file_name": "COCO_train2014_%012d_%d.jpg" % (image_id, ref_id),
                  "sentences": [_sentence(s, sent_id + k) for k, s in enumerate(sentences)]})
      sent_id += len(sentences)
    with open(os.path.join(manual_dir, folder, refs_name), "wb") as f:
      pickle.dump(out, f)
    with open(os.path.join(manual_dir, folder, "instances.json"), "w") as f:
      json.dump(_coco_instances(ANNOTATIONS), f)
  grefs = []
  for ref_id, split, image_id, ann_ids, sentences in GREFCOCO_REFS:
    grefs.append({"ref_id": ref_id, "split": split, "image_id": image_id, "ann_id": ann_ids,
                  "no_target": ann_ids == [-1], "category_id": [1],
                  "sentences": [_sentence(s, sent_id + k) for k, s in enumerate(sentences)]})
    sent_id += len(sentences)
  os.makedirs(os.path.join(manual_dir, refer_format.GREFCOCO_DIR), exist_ok=True)
  with open(os.path.join(manual_dir, refer_format.GREFCOCO_DIR, refer_format.GREFCOCO_REFS),
            "w") as f:
    json.dump(grefs, f)
  with open(os.path.join(manual_dir, refer_format.GREFCOCO_DIR, "instances.json"), "w") as f:
    json.dump(_coco_instances(ANNOTATIONS), f)


def deris_mixed_json() -> dict:
  """The DeRIS `instances_nogoogle_withid.json` content (train per ref, eval per sentence)."""
  out = {split: [] for split in deris_format.MIXED_SPLITS}
  for source, (_, _, refs) in REFCOCO_REFS.items():
    for _, split, image_id, ann_id, sentences in refs:
      name = "train" if split == "train" else f"{split}_{source}"
      height, width = IMAGES[image_id]
      record = {"image_id": image_id, "bbox": [0, 0, 1, 1], "mask": ANNOTATIONS[ann_id][1],
                "id": ann_id, "category_id": 1, "height": height, "width": width}
      if name == "train" or name == "testA_refcoco_unc":  # one eval entry keeps 2 sentences
        out[name].append({**record, "expressions": list(sentences)})
      else:
        out[name].extend({**record, "expressions": [s]} for s in sentences)
  return out


def deris_grefs_json() -> dict:
  """The DeRIS gRefCOCO `instances.json` content (one entry per sentence)."""
  out = {split: [] for split in deris_format.GREFCOCO_SPLITS}
  for _, split, image_id, ann_ids, sentences in GREFCOCO_REFS:
    height, width = IMAGES[image_id]
    if ann_ids == [-1]:
      annotations = [{"iscrowd": None, "bbox": None, "category_id": None, "id": -1,
                      "bbox_mode": 1, "empty": True}]
    else:
      annotations = [{**_coco_ann(a), "empty": False} for a in ann_ids]
    for text in sentences:
      out[split].append({"image_id": image_id, "height": height, "width": width,
                         "expressions": {"raw": text, "sent": text.lower()},
                         "annotations": annotations})
  return out


def write_deris(manual_dir: str, *, grefs_name: str = "instances.json") -> None:
  """The DeRIS annotation JSONs and the images."""
  write_images(os.path.join(manual_dir, deris_format.IMAGES_DIR))
  mixed = os.path.join(manual_dir, deris_format.MIXED_FILE)
  os.makedirs(os.path.dirname(mixed), exist_ok=True)
  with open(mixed, "w") as f:
    json.dump(deris_mixed_json(), f)
  grefs = os.path.join(manual_dir, "annotations", "grefs", grefs_name)
  os.makedirs(os.path.dirname(grefs), exist_ok=True)
  with open(grefs, "w") as f:
    json.dump(deris_grefs_json(), f)


def all_expressions() -> list[str]:
  refcoco = [s for _, _, refs in REFCOCO_REFS.values() for *_, sentences in refs
             for s in sentences]
  return refcoco + [s for *_, sentences in GREFCOCO_REFS for s in sentences]
