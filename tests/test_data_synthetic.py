"""The synthetic dataset: grammar, exact masks, determinism, and the pipeline with no files."""
import io

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from configs import data_common
from deris_jax.data import masks as M
from deris_jax.data import pipeline
from deris_jax.data import prepare
from deris_jax.data import synthetic

tfds.disable_progress_bar()
TINY = synthetic.DerisSynthetic.BUILDER_CONFIGS[1]


def test_grammar_refers_to_the_right_objects():
  shapes = [synthetic.Shape("red", "circle", 10, 30, 5), synthetic.Shape("red", "circle", 50, 30, 5),
            synthetic.Shape("blue", "square", 30, 10, 5)]
  said = {text: members for kind in synthetic._candidates(shapes).values()
          for text, members in kind}
  assert said["the red circles"] == (0, 1)
  assert said["all red shapes"] == (0, 1)
  assert said["all circles"] == (0, 1)
  assert said["the circle on the left"] == (0,)
  assert said["the circle on the right"] == (1,)
  assert said["the blue square"] == (2,)
  assert said["the square"] == (2,)
  assert said["the green triangle"] == ()
  assert said["the red square"] == ()
  assert "the triangle" not in said and "all blue shapes" not in said


def test_split_is_deterministic_with_exact_masks():
  first = synthetic.generate_split(TINY, "train", 6)
  again = synthetic.generate_split(TINY, "train", 6)
  assert first.entries == again.entries and first.segmentations == again.segmentations
  assert [i.data for i in first.images.values()] == [i.data for i in again.images.values()]
  other = synthetic.generate_split(TINY.replace(seed=1) if hasattr(TINY, "replace") else
                                   synthetic.SyntheticConfig(**{**TINY.__dict__, "seed": 1}),
                                   "train", 6)
  assert other.entries != first.entries
  for entry in first.entries:
    info = first.images[entry.image_id]
    pixels = np.asarray(PIL.Image.open(io.BytesIO(info.data)))
    color = next((c for c in synthetic.COLORS if c in entry.expressions[0]), None)
    for ann_id in entry.target_ids:
      mask = M.decode_segmentation(first.segmentations[ann_id], info.height, info.width) > 0
      assert mask.sum() > 0
      inside = pixels[mask]
      assert (inside == inside[0]).all()  # one flat colour under the exact mask
      if color:
        assert tuple(inside[0]) == synthetic.COLORS[color]


@pytest.fixture(scope="module")
def synthetic_config(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("synthetic"))
  counts = prepare.prepare("synthetic", data_dir=data_dir, config="tiny")
  c = data_common.synthetic_data("tiny")
  c.data_dir = data_dir
  return counts, c


def test_prepared_counts_and_target_mix(synthetic_config):
  counts, c = synthetic_config
  assert counts == {"train": 72, "val": 24, "test": 24}  # 24/8/8 images x 3 expressions
  p = pipeline.make_pipeline(c, "train", train=True, batch_size=8, process_index=0,
                             process_count=1)
  targets = p.index.num_targets
  assert (targets == 0).any() and (targets == 1).any() and (targets >= 2).any()
  assert targets.max() <= c.max_instances


def test_pipeline_runs_with_the_embedded_tokenizer(synthetic_config):
  _, c = synthetic_config
  assert c.tokenizer_path is None
  p = pipeline.make_pipeline(c, "val", train=False, batch_size=16, process_index=0,
                             process_count=1)
  batches = list(pipeline.as_numpy(p.dataset))
  assert len(batches) == p.num_batches == 2
  b = batches[0]
  assert b["image"].shape == (16, 32, 32, 3) and b["gt_masks"].shape == (16, 4, 32, 32)
  assert b["gt_mask_orig"].shape == (16, 32, 32)
  # Same size in and out: the resized masks equal the original-resolution union.
  np.testing.assert_array_equal(b["gt_masks"].max(1), b["gt_mask_orig"])
  np.testing.assert_array_equal(b["exists"], b["gt_valid"].any(1))
  assert sum(float(x["weight"].sum()) for x in batches) == 24
  assert p.num_truncated == 0
  unk = 3
  assert not (b["text_ids"] == unk).any()  # the stored model covers its own corpus
