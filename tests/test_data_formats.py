"""TFDS builders on tiny files in each official format: counts, mask areas, identical examples."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deris_jax.data import masks as M
from deris_jax.data import prepare
from deris_jax.data import registry
from tests import tiny_files

tfds.disable_progress_bar()

EXPECTED_COUNTS = {
    "refcoco_mixed": {"train": 3, "val_refcoco_unc": 1, "testA_refcoco_unc": 2,
                      "testB_refcoco_unc": 1, "val_refcocoplus_unc": 1,
                      "testA_refcocoplus_unc": 1, "testB_refcocoplus_unc": 1,
                      "val_refcocog_umd": 1, "test_refcocog_umd": 1},
    "grefcoco": {"train": 4, "val": 2, "testA": 1, "testB": 1},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """{(dataset, format): (counts, builder)} for both datasets in both formats."""
  root = tmp_path_factory.mktemp("formats")
  tiny_files.write_deris(str(root / "deris"), grefs_name="instance.json")  # README spelling
  tiny_files.write_refer(str(root / "refer"))
  out = {}
  for dataset in EXPECTED_COUNTS:
    for fmt in ("deris", "refer"):
      data_dir = str(root / f"tfds_{fmt}")
      counts = prepare.prepare(dataset, data_dir=data_dir, manual_dir=str(root / fmt), config=fmt)
      out[(dataset, fmt)] = (counts, registry.open_builder(dataset, fmt, data_dir))
  return out


def _examples(builder, split):
  """Records in storage order as plain python values (image replaced by its pixels' sum)."""
  out = []
  for ex in builder.as_data_source(split):
    out.append({
        "image_id": int(ex["image_id"]), "hw": (int(ex["height"]), int(ex["width"])),
        "pixels": int(ex["image"].astype(np.int64).sum()),
        "objects": [(int(i), np.asarray(r).tolist()) for i, r in zip(ex["objects"]["id"],
                                                        ex["objects"]["rle"])],
        "entries": [(int(row), [t.decode() for t in np.asarray(exprs)], np.asarray(t).tolist(),
                     s.decode())
                    for row, exprs, t, s in zip(ex["entries"]["row"],
                                                ex["entries"]["expressions"],
                                                ex["entries"]["targets"], ex["entries"]["source"])],
    })
  return out


@pytest.mark.parametrize("dataset", sorted(EXPECTED_COUNTS))
@pytest.mark.parametrize("fmt", ["deris", "refer"])
def test_example_counts(prepared, dataset, fmt):
  counts, builder = prepared[(dataset, fmt)]
  assert counts == EXPECTED_COUNTS[dataset]
  assert builder.info.metadata["skipped"] == {}


def _without_file_index(splits):
  return {name: {**split, "rows": {k: v for k, v in split["rows"].items() if k != "file_index"}}
          for name, split in splits.items()}


@pytest.mark.parametrize("dataset", sorted(EXPECTED_COUNTS))
def test_both_formats_give_identical_examples(prepared, dataset):
  """The tiny files list the entries in the same order in both formats; only the positions
  in the files differ (the REFER releases keep one refs file per dataset, all splits in it)."""
  deris, refer = prepared[(dataset, "deris")][1], prepared[(dataset, "refer")][1]
  assert (_without_file_index(deris.info.metadata["splits"])
          == _without_file_index(refer.info.metadata["splits"]))
  for split in EXPECTED_COUNTS[dataset]:
    deris_examples = _examples(deris, split)
    assert len(deris_examples) == len(deris.info.metadata["splits"][split]["images"]["image_id"])
    assert deris_examples == _examples(refer, split)


def test_mask_areas_targets_and_sources(prepared):
  builder = prepared[("grefcoco", "deris")][1]
  seen = {}
  for split in EXPECTED_COUNTS["grefcoco"]:
    for ex in _examples(builder, split):
      height, width = ex["hw"]
      for ann_id, runs in ex["objects"]:
        seen[ann_id] = int(M.runs_to_mask(np.asarray(runs), height, width).sum())
      for _, _, targets, source in ex["entries"]:
        assert source == "grefcoco"
  assert seen == {a: tiny_files.ANNOTATION_AREAS[a] for a in (101, 102, 103, 104, 105)}
  rows = builder.info.metadata["splits"]["train"]["rows"]
  # train: image 9 "both shapes"/"everything here" -> 2 targets, image 25 no target, 30 one.
  assert rows["image_id"] == [9, 9, 25, 30]
  assert rows["num_targets"] == [2, 2, 0, 1]
  assert builder.info.metadata["splits"]["train"]["max_targets"] == 2
  mixed = prepared[("refcoco_mixed", "deris")][1].info.metadata["splits"]
  # A DeRIS evaluation record with two sentences: two rows with the record's file index.
  assert mixed["testA_refcoco_unc"]["rows"]["file_index"] == [0, 0]
  assert mixed["train"]["rows"]["file_index"] == [0, 1, 2]
  # Training entries keep all sentences of a ref; evaluation entries one sentence each.
  assert mixed["train"]["rows"]["expressions"][0] == ["The man on the LEFT.", "left guy"]
  assert mixed["testA_refcoco_unc"]["rows"]["expressions"] == [["bottom thing"],
                                                               ["the striped one"]]
  assert mixed["train"]["rows"]["source"] == ["refcoco_mixed"] * 3
  assert mixed["val_refcocog_umd"]["rows"]["source"] == ["refcocog_umd"]


def test_records_are_read_by_image_position(prepared):
  """Record k is the image at position k of the split index (what the pipeline reads)."""
  builder = prepared[("grefcoco", "refer")][1]
  index = builder.info.metadata["splits"]["train"]
  records = builder.as_data_source("train")
  assert [int(records[k]["image_index"]) for k in range(len(records))] == [0, 1, 2]
  assert [int(records[k]["image_id"]) for k in range(len(records))] == index["images"]["image_id"]
  for row, position in enumerate(index["rows"]["image_index"]):
    assert row in [int(r) for r in records[position]["entries"]["row"]]


def test_rows_keep_the_annotation_file_order(tmp_path):
  """Rows follow the file, not (image, ...) order: evaluation groups are the file's."""
  manual = tmp_path / "manual"
  tiny_files.write_deris(str(manual))
  path = manual / "annotations" / "grefs" / "instances.json"
  data = json.loads(path.read_text())
  data["val"] = data["val"][::-1] + data["testA"]  # images 9, 25, 30: not sorted below
  data["val"] = [data["val"][2], data["val"][0], data["val"][1]]
  path.write_text(json.dumps(data))
  prepare.prepare("grefcoco", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  index = registry.open_builder("grefcoco", "deris", str(tmp_path / "tfds")).info.metadata
  rows = index["splits"]["val"]["rows"]
  assert rows["image_id"] == [30, 9, 25]
  assert rows["file_index"] == [0, 1, 2]
  assert rows["expressions"] == [["long thin bar"], ["a dog on the right"], ["the two boxes"]]
