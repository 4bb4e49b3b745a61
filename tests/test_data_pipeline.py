"""The tf.data pipeline: batch contract, determinism, host sharding, eval padding, NSC, errors."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import data_common
from deris_jax.data import order
from deris_jax.data import pipeline
from deris_jax.data import pipeline_ops as ops
from deris_jax.data import prepare
from tests import tiny_files
from deris_jax.data import tokenizer as tok

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  """A small gRefCOCO config over the tiny DeRIS files, with a tokenizer trained on them."""
  root = tmp_path_factory.mktemp("pipeline")
  tiny_files.write_deris(str(root / "manual"))
  prepare.prepare("grefcoco", data_dir=str(root / "tfds"), manual_dir=str(root / "manual"))
  spm = root / "tiny.spm"
  spm.write_bytes(tok.train_sentencepiece(tiny_files.all_expressions(), 80))
  c = data_common.grefcoco_data()
  c.data_dir = str(root / "tfds")
  c.tokenizer_path = str(spm)
  c.image_size = (48, 40)
  c.cognition_image_size = (32, 32)
  c.max_tokens = 8
  c.max_instances = 3
  c.canvas_size = (64, 64)
  c.official_world_size = 1
  return c


def _batches(c, split, **kwargs):
  if "local_rows" not in kwargs:
    kwargs = {"process_index": 0, "process_count": 1, **kwargs}
  p = pipeline.make_pipeline(c, split, **kwargs)
  return p, list(pipeline.as_numpy(p.dataset))


def test_eval_batch_contract_values_and_padding(config):
  p, batches = _batches(config, "val", train=False, batch_size=4)
  assert p.num_batches == 1 and len(batches) == 1 and p.num_examples == 2
  b = batches[0]
  shapes = {k: (v.shape, v.dtype.name) for k, v in b.items()}
  assert shapes == {
      "image": ((4, 48, 40, 3), "float32"), "image_mini": ((4, 32, 32, 3), "float32"),
      "text_ids": ((4, 8), "int32"), "text_padding_mask": ((4, 8), "int32"),
      "gt_masks": ((4, 3, 48, 40), "uint8"), "gt_valid": ((4, 3), "bool"),
      "exists": ((4,), "int32"), "weight": ((4,), "float32"), "example_id": ((4,), "int64"),
      "orig_hw": ((4, 2), "int32"), "gt_mask_orig": ((4, 64, 64), "uint8")}
  lo = (0 - np.asarray(config.mean)) / np.asarray(config.std)
  hi = (255 - np.asarray(config.mean)) / np.asarray(config.std)
  assert (b["image"][:2] >= lo - 1e-5).all() and (b["image"][:2] <= hi + 1e-5).all()
  np.testing.assert_array_equal(b["weight"], [1, 1, 0, 0])
  split_code = p.index.split_code
  np.testing.assert_array_equal(b["example_id"], [split_code * 10**9, split_code * 10**9 + 1,
                                                  -1, -1])
  # The file's order (not sorted by image): row 0 is image 25 with targets 103 + 105, row 1
  # image 9, "a dog on the right", no target.
  assert [p.index.describe(i).expressions for i in b["example_id"][:2]] == [
      ("the two boxes",), ("a dog on the right",)]
  assert [p.index.describe(i).file_index for i in b["example_id"][:2]] == [0, 1]
  np.testing.assert_array_equal(b["exists"], [1, 0, 0, 0])
  np.testing.assert_array_equal(b["gt_valid"][:2], [[1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(b["orig_hw"][:2], [[36, 30], [40, 50]])
  assert b["gt_mask_orig"][1].sum() == 0
  assert b["gt_mask_orig"][0].sum() == 160 + 130  # areas of annotations 103 and 105
  assert b["gt_mask_orig"][0][36:].sum() == 0 and b["gt_mask_orig"][0][:, 30:].sum() == 0
  assert b["gt_masks"][0, 2].sum() == 0 and b["gt_masks"][0, :2].sum() > 0
  np.testing.assert_allclose(b["image"][2:], np.broadcast_to(lo, (2, 48, 40, 3)), rtol=1e-6)
  assert (b["gt_masks"][2:] == 0).all() and (b["text_ids"][2:] == 0).all()
  for ids, pad in zip(b["text_ids"][:2], b["text_padding_mask"][:2]):
    length = int((pad == 0).sum())
    assert ids[0] == tok.BOS_ID and ids[length - 1] == tok.EOS_ID
    assert (ids[length:] == tok.PAD_ID).all() and (pad[:length] == 0).all()


def test_gt_masks_are_nearest_resized_union_of_instances(config):
  _, (b,) = _batches(config, "val", train=False, batch_size=2)
  union_orig = b["gt_mask_orig"][0][:36, :30]
  rows = np.floor(np.arange(48) * (1.0 / (48 / 36))).astype(int)
  cols = np.floor(np.arange(40) * (1.0 / (40 / 30))).astype(int)
  expected = union_orig[rows][:, cols]
  np.testing.assert_array_equal(b["gt_masks"][0].max(0), expected)


def _epoch_ids(c, **kwargs):
  p, batches = _batches(c, "train", train=True, **kwargs)
  return p, np.stack([b["example_id"] for b in batches])  # (steps, B)


def test_train_epoch_is_the_official_sampler_order(config):
  """One pass = one epoch of `order.train_order`: full batches, every entry, seed x epoch."""
  p, ids = _epoch_ids(config, batch_size=2, seed=0, epoch=0)
  rows = ids % 10**9
  flags = p.index.aspect_flags()  # images 9 (50 wide) landscape, 25 and 30 portrait
  np.testing.assert_array_equal(flags, [1, 1, 0, 0])
  expected = order.train_order(flags, global_batch=2, seed=0, epoch=0)
  np.testing.assert_array_equal(rows, expected)
  np.testing.assert_array_equal(p.rows, expected)
  assert sorted(rows.reshape(-1).tolist()) == [0, 1, 2, 3]  # each entry once, batches full
  for batch in rows:  # the official groups: both samples of a GPU batch have one aspect
    assert flags[batch[0]] == flags[batch[1]]
  _, again = _epoch_ids(config, batch_size=2, seed=0, epoch=0)
  np.testing.assert_array_equal(ids, again)
  orders = {tuple(_epoch_ids(config, batch_size=2, seed=0, epoch=e)[1].reshape(-1))
            for e in range(6)}
  assert len(orders) > 2  # a new permutation every epoch


def test_train_batches_are_deterministic_and_start_anywhere(config):
  _, first = _batches(config, "train", train=True, batch_size=2, epoch=3)
  _, resumed = _batches(config, "train", train=True, batch_size=2, epoch=3, start_batch=1)
  _, other = _batches(config, "train", train=True, batch_size=2, epoch=3, seed=1)
  assert len(first) == 2 and len(resumed) == 1
  for key in first[1]:
    np.testing.assert_array_equal(first[1][key], resumed[0][key])
  assert not all(np.array_equal(a["example_id"], b["example_id"])
                 for a, b in zip(first, other))
  assert all(b["weight"].tolist() == [1, 1] for b in first)


@pytest.mark.parametrize("data_config", [data_common.refcoco_data, data_common.grefcoco_data,
                                         data_common.synthetic_data])
def test_tf_data_autotuning_is_off_by_default(data_config):
  # Its model thread held a live iterator's deletion for up to ~30 s (BENCHMARKS.md).
  assert data_config().autotune is False


def test_the_autotune_setting_reaches_the_pipeline(config):
  for autotune in (False, True):
    c = config.copy_and_resolve_references()
    c.autotune = autotune
    p = pipeline.make_pipeline(c, "train", train=True, batch_size=2, process_index=0,
                               process_count=1)
    assert p.dataset.options().autotune.enabled is autotune


def test_hosts_read_their_rows_of_the_same_global_batches(config):
  c = config.copy_and_resolve_references()
  c.nsc.rate = 0.5  # random draws must not depend on the host count either
  _, together = _batches(c, "train", train=True, batch_size=4, epoch=1)
  for count in (2, 4):
    hosts = [_batches(c, "train", train=True, batch_size=4, epoch=1, process_index=h,
                      process_count=count)[1] for h in range(count)]
    for step, batch in enumerate(together):
      for key in batch:
        np.testing.assert_array_equal(
            np.concatenate([h[step][key] for h in hosts]), batch[key])
  # Evaluation: the same batches on every host, padding at the end of the last one.
  for count in (1, 2):
    hosts = [_batches(config, "train", train=False, batch_size=2 * count, process_index=h,
                      process_count=count) for h in range(count)]
    assert len({len(batches) for _, batches in hosts}) == 1
    ids = np.stack([np.concatenate([batches[k]["example_id"] for _, batches in hosts])
                    for k in range(len(hosts[0][1]))]).reshape(-1)
    real = ids[ids >= 0] % 10**9
    np.testing.assert_array_equal(real, np.arange(4))  # the file's order, each once
    assert sum(p.num_examples for p, _ in hosts) == 4


def test_local_rows_pick_any_rows_of_the_global_batch(config):
  _, together = _batches(config, "val", train=False, batch_size=2)
  _, second = _batches(config, "val", train=False, batch_size=2, local_rows=np.asarray([1]))
  np.testing.assert_array_equal(second[0]["example_id"], together[0]["example_id"][1:])
  with pytest.raises(ValueError, match="must be rows of the global batch 2"):
    _batches(config, "val", train=False, batch_size=2, local_rows=np.asarray([2]))


def test_nsc_in_the_pipeline_turns_samples_into_no_target(config):
  c = config.copy_and_resolve_references()
  c.nsc.rate = 1.0
  c.nsc.threshold = 1.01  # accept the first candidate
  p, bs = _batches(c, "train", train=True, batch_size=2)
  assert all((b["exists"] == 0).all() and not b["gt_valid"].any() for b in bs)
  tokens = tok.XlmrTokenizer(c.tokenizer_path).encode(p.index.texts, c.max_tokens)["ids"]
  for b in bs:
    for ids, example_id in zip(b["text_ids"], b["example_id"]):
      row = p.index.describe(example_id).row
      if not p.index.num_targets[row]:
        continue  # no-target samples keep their expression
      own_image = p.index.image_index[row]
      matches = [t for t in range(len(p.index.texts)) if (tokens[t] == ids).all()]
      assert matches and all(p.index.image_of_text[t] != own_image for t in matches)
  c.nsc.enabled = False
  _, plain = _batches(c, "train", train=True, batch_size=2)
  assert any(b["exists"].any() for b in plain)


def test_resize_and_normalisation_reproduce_the_official_fixture(tiny_inputs):
  raw_rgb = tiny_inputs["raw_image_bgr"][..., ::-1]  # (2, 150, 170, 3) BGR -> RGB
  mean, std = tiny_inputs["img_norm_mean_rgb"], tiny_inputs["img_norm_std_rgb"]
  np.testing.assert_allclose(mean, data_common.IMAGENET_MEAN)
  np.testing.assert_allclose(std, data_common.IMAGENET_STD)
  for key, size in (("perception_image", (128, 128)), ("cognition_image", (64, 64))):
    ours = ops.normalize(ops.resize_bilinear_uint8(raw_rgb, size), mean, std).numpy()
    official = tiny_inputs[key].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    assert np.abs(ours - official).max() < 2e-2  # measured 0.0175 (one grey level)
    assert np.abs(ours - official).mean() < 3e-3


def test_configuration_errors_are_clear(config, tmp_path):
  c = config.copy_and_resolve_references()
  c.tokenizer_path = str(tmp_path / "beit3.spm")
  with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*beit3.spm"):
    pipeline.make_pipeline(c, "train", train=True, batch_size=2, process_index=0,
                           process_count=1)
  c = config.copy_and_resolve_references()
  c.max_instances = 1
  with pytest.raises(ValueError, match="2 referred instances but data.max_instances is 1"):
    pipeline.make_pipeline(c, "train", train=True, batch_size=2, process_index=0,
                           process_count=1)
  c = config.copy_and_resolve_references()
  c.canvas_size = (32, 32)
  with pytest.raises(ValueError, match=r"larger than data.canvas_size \(32, 32\)"):
    pipeline.make_pipeline(c, "val", train=False, batch_size=2, process_index=0,
                           process_count=1)
  c = config.copy_and_resolve_references()
  c.official_world_size = 4
  with pytest.raises(ValueError, match="multiple of data.official_world_size 4"):
    pipeline.make_pipeline(c, "train", train=True, batch_size=2, process_index=0,
                           process_count=1)
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    pipeline.make_pipeline(config, "val", train=False, batch_size=3, process_index=0,
                           process_count=2)
  c = config.copy_and_resolve_references()
  c.data_dir = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="python -m deris_jax.data.prepare --dataset"):
    pipeline.make_pipeline(c, "val", train=False, batch_size=2, process_index=0,
                           process_count=1)
