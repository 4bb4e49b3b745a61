"""The checkpoints package: the partial merge, params round trips, one error class."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deris_jax import checkpoints, trees
from deris_jax.convert import errors as convert_errors
from deris_jax.convert import readers
from deris_jax.config_loader import load_config

EXPECTED = {"a.kernel": jax.ShapeDtypeStruct((2, 3), np.float32),
            "a.bias": jax.ShapeDtypeStruct((3,), np.float32),
            "b.0.scale": jax.ShapeDtypeStruct((4,), np.float32)}


def _fresh():
  return {name: np.full(s.shape, 7.0, s.dtype) for name, s in EXPECTED.items()}


def test_a_complete_checkpoint_is_cast_and_ordered_and_never_calls_fill():
  loaded = {"b.0.scale": np.arange(4, dtype=np.float64),
            "a.bias": np.ones(3, np.float32), "a.kernel": np.zeros((2, 3), np.float32)}
  merged, filled = checkpoints.merge_params(
      loaded, EXPECTED, fill=lambda: pytest.fail("fill called for a complete checkpoint"))
  assert filled == [] and list(merged) == list(EXPECTED)
  assert merged["b.0.scale"].dtype == np.float32
  np.testing.assert_array_equal(merged["b.0.scale"], [0, 1, 2, 3])


def test_a_partial_checkpoint_takes_the_rest_from_fill():
  calls = []
  loaded = {"a.kernel": np.ones((2, 3), np.float32)}
  merged, filled = checkpoints.merge_params(
      loaded, EXPECTED, fill=lambda: calls.append(1) or _fresh())
  assert calls == [1] and filled == ["a.bias", "b.0.scale"]
  np.testing.assert_array_equal(merged["a.kernel"], np.ones((2, 3)))
  np.testing.assert_array_equal(merged["a.bias"], np.full(3, 7.0))


@pytest.mark.parametrize("loaded,fill,message", [
    ({"a.kernel": np.ones((2, 3)), "c.w": np.ones(1)}, _fresh, r"1 unknown \(e.g. 'c.w'\)"),
    ({"a.kernel": np.ones((3, 2))}, _fresh,
     r"'a.kernel' has shape \(3, 2\) but the model built from the config expects \(2, 3\)"),
    ({"a.kernel": np.ones((2, 3))}, None, r"2 missing \(e.g. 'a.bias'\)"),
])
def test_misfits_name_the_first_parameter(loaded, fill, message):
  with pytest.raises(checkpoints.CheckpointError, match=f"^ckpt: .*{message}"):
    checkpoints.merge_params(loaded, EXPECTED, fill=fill, source="ckpt")


def test_params_round_trip_int_keyed_nnx_dicts(tmp_path):
  """NNX pure dicts (int list keys) are saved as they are: string keys on disk, and a target
  restores straight into the int-keyed structure."""
  params = {"layers": {0: {"w": np.arange(3, dtype=np.float32)},
                       1: {"w": np.ones(3, np.float32)}}, "head": np.zeros(2, np.float32)}
  checkpoints.save_params(tmp_path / "p", params, metadata={"kind": "converted"}, step=5)
  assert checkpoints.latest_step(tmp_path / "p") == 5
  as_saved, meta = checkpoints.restore_params(tmp_path / "p")
  assert meta == {"kind": "converted"} and set(as_saved["layers"]) == {"0", "1"}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  restored, _ = checkpoints.restore_params(tmp_path / "p", abstract)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(params)
  np.testing.assert_array_equal(restored["layers"][0]["w"], [0, 1, 2])
  flat = trees.named_leaves(as_saved)
  assert trees.named_leaves(trees.unflatten_like(flat, params)).keys() == flat.keys()


def test_stored_shapes_read_names_shapes_and_dtypes_without_arrays(tmp_path, monkeypatch):
  params = {"layers": {0: {"w": np.zeros((2, 3), jax.numpy.bfloat16)}},
            "head": np.zeros((4,), np.float32)}
  checkpoints.save_params(tmp_path / "p", params, metadata={"kind": "converted"}, step=3)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", lambda *a, **k: pytest.fail("read"))
  shapes = checkpoints.stored_shapes(tmp_path / "p")
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in shapes.items()} == {
      "layers.0.w": ((2, 3), np.dtype(jax.numpy.bfloat16)), "head": ((4,), np.float32)}
  # The same rule as the merge: shapes from metadata are checked like loaded arrays.
  expected = {"layers.0.w": jax.ShapeDtypeStruct((2, 3), np.float32),
              "head": jax.ShapeDtypeStruct((5,), np.float32)}
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"^p: 'head' has shape \(4,\) but .* expects \(5,\)"):
    checkpoints.check_fit(shapes, expected, partial=False, source="p")
  expected["head"] = jax.ShapeDtypeStruct((4,), np.float32)
  assert checkpoints.check_fit(shapes, dict(expected, tail=expected["head"]), partial=True) == [
      "tail"]


def test_one_error_class_for_directories_and_official_files(tmp_path):
  assert convert_errors.CheckpointError is checkpoints.CheckpointError
  with pytest.raises(checkpoints.CheckpointError, match="no such file"):
    readers.read_checkpoint(tmp_path / "missing.pth")
  with pytest.raises(checkpoints.CheckpointError, match="does not exist"):
    checkpoints.latest_step(tmp_path / "missing")


def test_a_checkpoint_carries_its_config_linked_again(tmp_path):
  config = load_config("configs/synthetic.py")
  checkpoints.save_params(tmp_path / "ck", {"w": np.zeros(2, np.float32)},
                          metadata={"kind": "converted", "config": config.to_dict()})
  stored = checkpoints.stored_config(tmp_path / "ck")
  assert stored.to_dict() == config.to_dict()
  stored.model.image_size = (96, 96)  # the data section follows, as in a config file
  assert stored.data.image_size == (96, 96)


@pytest.mark.parametrize("meta,message", [
    ({"kind": "train"}, "holds no config"),
    ({"kind": "train", "config": {"data": {}}}, "without a 'model' section"),
    ({"kind": "train", "config": {"model": {"image_size": 64}, "data": {"image_size": 32}}},
     "stored config is inconsistent.*data.image_size"),
])
def test_a_checkpoint_without_a_usable_config_says_to_pass_one(tmp_path, meta, message):
  checkpoints.save_params(tmp_path / "ck", {"w": np.zeros(2, np.float32)}, metadata=meta)
  with pytest.raises(checkpoints.CheckpointError, match=message) as info:
    checkpoints.stored_config(tmp_path / "ck")
  assert "pass --config configs/X.py[:arg]" in str(info.value)
