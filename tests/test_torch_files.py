"""Our torch-free readers on files that real torch wrote (tools/make_torch_files.py).

The other `.pth` files of the suite come from our own writer (tests/torch_format.py); these
were written by torch.save (the version in torch_version.txt): a DeRIS-like checkpoint in the
zip and the legacy format, a state dict alone in a zip written without CRC-32s, and one saved
under torch.serialization.skip_data() (no tensor data), which must be refused. They hold a
real module's state dict (DDP `module.` prefix, `_metadata`, a channels-last conv weight, tied
weights, BatchNorm buffers), tensors of eleven dtypes, views that share a storage (offsets,
strides, a transpose, stride 0), an nn.Parameter, a tensor with a Python attribute, an
AdamW state and a `meta` dict of plain and numpy values. `expected.npz` is what torch itself
held, `layouts.json` how torch laid each tensor out in its storage.
"""
import json
import pathlib
import zipfile

import ml_dtypes
import numpy as np
import pytest

from deris_jax.convert import arrays, readers, torch_files
from deris_jax.convert.unpickler import TensorRef

FILES = pathlib.Path(__file__).resolve().parent / "data" / "torch_files"
CHECKPOINTS = ["zip.pth", "legacy.pth"]  # the whole checkpoint
ALL = CHECKPOINTS + ["no_crc32.pth"]  # no_crc32.pth: the state dict alone, at the top level
FORMATS = {"zip.pth": readers.TORCH_ZIP, "legacy.pth": readers.TORCH_LEGACY,
           "no_crc32.pth": readers.TORCH_ZIP, "skip_data.pth": readers.TORCH_ZIP}
# torch's dtype -> what read_checkpoint returns (bfloat16 widened exactly to float32).
OUTPUT_DTYPES = {
    "torch.float64": np.float64, "torch.float32": np.float32, "torch.float16": np.float16,
    "torch.bfloat16": np.float32, "torch.float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "torch.int64": np.int64, "torch.int32": np.int32, "torch.int8": np.int8,
    "torch.uint8": np.uint8, "torch.uint16": np.uint16, "torch.bool": np.bool_,
}
# ... and what the unpickled tensor reference says (the dtype of the stored elements).
STORED_DTYPES = dict(OUTPUT_DTYPES, **{"torch.bfloat16": ml_dtypes.bfloat16})


@pytest.fixture(scope="module")
def layouts():
  return json.loads((FILES / "layouts.json").read_text())


@pytest.fixture(scope="module")
def expected():
  """`<part>/<name>` -> what torch held (bfloat16 and float8 as exact float32 values)."""
  with np.load(FILES / "expected.npz") as data:
    return {name: data[name] for name in data.files}


def _saved_names(name, layouts):
  """The state-dict names that file `name` holds, in the order torch saved them."""
  return [k for k, v in layouts["tensors"].items() if name != "legacy.pth" or v["in_legacy"]]


def _open(name):
  source_type = {readers.TORCH_ZIP: torch_files.TorchZipSource,
                 readers.TORCH_LEGACY: torch_files.TorchLegacySource}[FORMATS[name]]
  return source_type(str(FILES / name), (), True)


def _state_tree(source, name):
  return source.tree if name == "no_crc32.pth" else source.tree["state_dict"]


@pytest.mark.parametrize("name", ALL)
def test_every_tensor_reads_back_as_torch_reads_it(name, expected, layouts):
  assert readers.detect_format(FILES / name) == FORMATS[name]
  got = readers.read_checkpoint(FILES / name)
  saved = _saved_names(name, layouts)
  assert all(k.startswith("module.") for k in saved)
  assert list(got) == [k[len("module."):] for k in saved]  # file order, `module.` stripped
  for key in saved:
    value, want, layout = got[key[len("module."):]], expected[f"state_dict/{key}"], \
        layouts["tensors"][key]
    assert value.shape == want.shape == tuple(layout["shape"]), key
    assert value.dtype == OUTPUT_DTYPES[layout["dtype"]], key
    if layout["dtype"] in ("torch.bfloat16", "torch.float8_e4m3fn"):
      assert want.dtype == np.float32, key  # stored as exact float32 values
    else:
      assert value.dtype == want.dtype, key
    np.testing.assert_array_equal(value.astype(want.dtype), want, err_msg=key)
    assert value.flags.c_contiguous and value.flags.writeable, key
  shapes = readers.read_checkpoint_shapes(FILES / name)
  assert shapes == {k: (v.shape, v.dtype) for k, v in got.items()}


@pytest.mark.parametrize("name", ALL)
def test_bits_of_narrow_floats_are_torch_s(name, expected):
  got = readers.read_checkpoint(FILES / name)
  want_bf16 = expected["state_dict/module.extra.bfloat16"].astype(ml_dtypes.bfloat16)
  got_bf16 = got["extra.bfloat16"].astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(got_bf16.view(np.uint16), want_bf16.view(np.uint16))
  np.testing.assert_array_equal(got["extra.float16"].view(np.uint16),
                                expected["state_dict/module.extra.float16"].view(np.uint16))
  if name != "legacy.pth":
    want_f8 = expected["state_dict/module.extra.float8_e4m3fn"]
    np.testing.assert_array_equal(got["extra.float8_e4m3fn"].view(np.uint8),
                                  want_f8.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


@pytest.mark.parametrize("name", ALL)
def test_layouts_in_storages_are_torch_s(name, layouts):
  """Each tensor reference has torch's shape, strides and storage offset, and tensors share a
  storage exactly where torch's did."""
  source = _open(name)
  try:
    tree = _state_tree(source, name)
    keys = {}  # torch's storage index -> our root storage key
    for key in _saved_names(name, layouts):
      layout, ref = layouts["tensors"][key], tree[key]
      assert isinstance(ref, TensorRef), key
      assert ref.dtype == STORED_DTYPES[layout["dtype"]], key
      assert ref.shape == tuple(layout["shape"]), key
      assert ref.stride == tuple(layout["stride"]), key
      storage_bytes = ref.storage.element_offset * ref.storage.dtype.itemsize
      assert storage_bytes % ref.dtype.itemsize == 0, key
      offset = storage_bytes // ref.dtype.itemsize + ref.offset
      assert offset == layout["storage_offset"], key
      assert source.root(ref.storage.key).nbytes == layout["storage_nbytes"], key
      assert keys.setdefault(layout["storage"], ref.storage.key) == ref.storage.key, key
    assert len(set(keys.values())) == len(keys)  # distinct storages stay distinct
  finally:
    source.close()


def test_the_views_torch_saved_share_one_storage(layouts):
  tensors = layouts["tensors"]
  storage = {k[len("module.extra."):]: v["storage"] for k, v in tensors.items()
             if k.startswith("module.extra.")}
  for a, b in [("float32", "offset_view"), ("float32", "strided"), ("weight", "weight_t"),
               ("tied_a", "tied_b"), ("float16", "float16_t"), ("bfloat16", "bfloat16_view")]:
    assert storage[a] == storage[b], (a, b)
  assert tensors["module.embed.weight"]["storage"] == tensors["module.head.weight"]["storage"]
  assert tensors["module.extra.offset_view"]["storage_offset"] == 6
  assert tensors["module.extra.lonely_slice"]["storage_offset"] == 5
  assert tensors["module.extra.lonely_slice"]["storage_nbytes"] == 20 * 4
  assert tensors["module.extra.expanded"]["stride"] == [0, 1]
  assert tensors["module.backbone.0.weight"]["stride"] == [12, 1, 6, 3]  # channels last


@pytest.mark.parametrize("name", ALL)
def test_views_of_one_storage_come_back_as_separate_arrays(name, expected):
  got = readers.read_checkpoint(FILES / name)
  x = {k[len("extra."):]: v for k, v in got.items() if k.startswith("extra.")}
  np.testing.assert_array_equal(x["offset_view"], x["float32"][1:])
  np.testing.assert_array_equal(x["strided"], x["float32"][:, ::2])
  np.testing.assert_array_equal(x["weight_t"], x["weight"].T)
  np.testing.assert_array_equal(x["float16_t"], x["float16"].T)
  np.testing.assert_array_equal(x["bfloat16_view"], x["bfloat16"][:, 3:])
  np.testing.assert_array_equal(x["tied_a"], x["tied_b"])
  np.testing.assert_array_equal(got["embed.weight"], got["head.weight"])
  assert x["expanded"].shape == (2, 3) and (x["expanded"] == x["expanded"][0]).all()
  assert x["empty"].shape == (0, 3)
  arrays_out = list(got.values())
  for i, a in enumerate(arrays_out):  # no two arrays share memory, as read_checkpoint promises
    assert not any(np.shares_memory(a, b) for b in arrays_out[i + 1:])
  x["tied_a"][0, 0] = 123.0
  assert x["tied_b"][0, 0] == expected["state_dict/module.extra.tied_b"][0, 0]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_rest_of_the_checkpoint_unpickles_as_torch_saved_it(name, layouts, expected):
  source = _open(name)
  try:
    tree = source.tree
    assert list(tree) == ["meta", "state_dict", "optimizer", "epoch", "iter"]
    assert (tree["epoch"], tree["iter"]) == (layouts["epoch"], layouts["iter"])
    meta = dict(tree["meta"])
    mean = meta.pop("mean")
    assert isinstance(mean, np.ndarray) and mean.dtype == np.float32
    np.testing.assert_array_equal(mean, np.array([0.485, 0.456, 0.406], np.float32))
    seed = meta.pop("seed")
    assert isinstance(seed, np.int64) and seed == 7
    assert meta == {"config": "DeRIS-B-refcoco", "sizes": (384, 224), "ok": True, "lr": 1e-4,
                    "note": None, "classes": ["object", "stuff"]}
    assert type(meta["sizes"]) is tuple and type(meta["ok"]) is bool
    assert tree["state_dict"]._metadata == layouts["state_dict_metadata"]
    optimizer = tree["optimizer"]
    assert repr(optimizer["param_groups"]) == layouts["optimizer_param_groups_repr"]
    flat = {f"optimizer/state/{index}/{k}": v
            for index, state in optimizer["state"].items() for k, v in state.items()}
    assert sorted(flat) == sorted(k for k in expected if k.startswith("optimizer/"))
    got = arrays.materialize(flat, source, name)
    for key, want in expected.items():
      if key.startswith("optimizer/"):
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
  finally:
    source.close()


def test_a_file_without_crc32s_is_read_and_one_record_without_is_refused():
  """torch's compute_crc32=False leaves every CRC-32 field 0; torch.load reads such files. A
  single record with a 0 field among records with CRC-32s is damage, or torch's skip_data()
  (storage records without the tensor data, which torch.load reads as zeros)."""
  with zipfile.ZipFile(FILES / "no_crc32.pth") as archive:
    assert not any(info.CRC for info in archive.infolist())
  assert readers.read_checkpoint(FILES / "no_crc32.pth")
  path = FILES / "skip_data.pth"
  assert readers.read_checkpoint_shapes(path) == {"weight": ((2, 3), np.float32)}
  with pytest.raises(readers.CheckpointError, match=r"skip_data\.pth.*CRC-32 field is 0.*"
                     r"skip_data\(\), without the tensor data"):
    readers.read_checkpoint(path)


def test_the_optimizer_is_no_state_dict():
  with pytest.raises(readers.CheckpointError, match="entry 'state' is a dict, not a tensor"):
    readers.read_checkpoint(FILES / "zip.pth", key="optimizer")


def test_the_files_are_the_committed_ones(layouts):
  version = (FILES / "torch_version.txt").read_text().strip()
  assert version.startswith("2.") and version == layouts["torch"]
  assert sum(p.stat().st_size for p in FILES.iterdir()) < 100_000
  assert sorted(p.name for p in FILES.glob("*.pth")) == sorted(FORMATS)
