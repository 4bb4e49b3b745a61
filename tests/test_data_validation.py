"""Bad input stops preparation with a message naming the file and record, or is skipped+counted."""
import json
import os

import pytest
import tensorflow_datasets as tfds

from deris_jax.data import deris_format
from deris_jax.data import entries as E
from deris_jax.data import prepare
from deris_jax.data import referring_builder
from tests import tiny_files

tfds.disable_progress_bar()

MIXED = deris_format.MIXED_FILE
GREFS = os.path.join("annotations", "grefs", "instances.json")


def _edit_json(path, edit):
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _manual(tmp_path, edit=None):
  manual = tmp_path / "manual"
  tiny_files.write_deris(str(manual))
  if edit:
    edit(manual)
  return str(manual)


def _prepare(tmp_path, manual, dataset="refcoco_mixed", **kwargs):
  return prepare.prepare(dataset, data_dir=str(tmp_path / "tfds"), manual_dir=manual,
                         config="deris", **kwargs)


def _drop_id(manual):
  _edit_json(manual / MIXED, lambda d: d["train"][0].pop("id"))


def _odd_polygon(manual):
  _edit_json(manual / MIXED, lambda d: d["train"][0].update(mask=[[1.0, 2.0, 3.0, 4.0, 5.0]]))


def _bad_rle(manual):
  def edit(d):
    d["val"][0]["annotations"][0]["segmentation"] = {"size": [36, 30], "counts": [5, 5]}
  _edit_json(manual / GREFS, edit)


def _empty_expression(manual):
  _edit_json(manual / MIXED, lambda d: d["val_refcoco_unc"][0].update(expressions=["?!"]))


def _image_path(manual, image_id=25):
  return deris_format.coco_image_path(str(manual / deris_format.IMAGES_DIR), image_id)


def _garbage_image(manual):
  with open(_image_path(manual), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")


@pytest.mark.parametrize("edit,dataset,expected", [
    (lambda m: os.remove(m / MIXED), "refcoco_mixed",
     r"missing file .*instances_nogoogle_withid\.json"),
    (lambda m: os.rename(m / deris_format.IMAGES_DIR, m / "elsewhere"), "refcoco_mixed",
     r"missing folder .*train2014: the COCO train2014 images"),
    (_drop_id, "refcoco_mixed",
     r"instances_nogoogle_withid\.json: split 'train' entry 0: annotation 'id' is None; it must "
     r"be a positive integer .*issue #6"),
    (_odd_polygon, "refcoco_mixed",
     r"the mask of annotation 101 .*split 'train' entry 0.* does not decode: polygon 0 has 5 "
     r"coordinates"),
    (_bad_rle, "grefcoco", r"the mask of annotation 103 \(.*grefs/instances\.json: split 'val' "
     r"entry 0\) does not decode: RLE run lengths sum to 10, expected height\*width = 1080"),
    (_empty_expression, "refcoco_mixed",
     r"split 'val_refcoco_unc' entry 0: expression 0 \('\?!'\) is empty after cleaning"),
    (lambda m: os.remove(_image_path(m)), "refcoco_mixed",
     r"split 'train': missing image file .*COCO_train2014_000000000025\.jpg \(annotated at "
     r".*instances_nogoogle_withid\.json: split 'train' entry 2\)"),
    (_garbage_image, "grefcoco", r"unreadable image .*COCO_train2014_000000000025\.jpg"),
])
def test_bad_input_stops_with_a_clear_message(tmp_path, edit, dataset, expected):
  manual = _manual(tmp_path, lambda m: edit(m))
  with pytest.raises(E.DataError, match=expected):
    _prepare(tmp_path, manual, dataset)


def test_skip_invalid_drops_and_counts(tmp_path, capsys):
  def negative_id(manual):  # both sentences of the multi-target train ref (image 9)
    def edit(d):
      for entry in d["train"][:2]:
        entry["annotations"][0]["id"] = -5
    _edit_json(manual / GREFS, edit)

  def edit(manual):
    _garbage_image(manual)  # image 25: one train and one val entry
    negative_id(manual)
  manual = _manual(tmp_path, edit)
  counts = _prepare(tmp_path, manual, "grefcoco", skip_invalid=True)
  printed = capsys.readouterr().out
  assert "skipped 4 record(s)" in printed
  assert "2 x unreadable image" in printed
  assert "2 x annotation without a positive id" in printed
  assert counts == {"train": 1, "val": 1, "testA": 1, "testB": 1}
  builder_dir = (tmp_path / "tfds" / "grefcoco" / "deris"
                 / str(referring_builder.ReferringBuilder.VERSION))
  metadata = json.loads((builder_dir / "metadata.json").read_text())
  assert metadata["skipped"] == {"unreadable image": 2, "annotation without a positive id": 2}


def test_empty_split_after_skipping_is_an_error(tmp_path):
  manual = _manual(tmp_path, _garbage_image)
  with pytest.raises(E.DataError, match=r"have no usable entries left"):
    _prepare(tmp_path, manual, "refcoco_mixed", skip_invalid=True)
