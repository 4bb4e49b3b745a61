"""Checkpoint readers: torch.save zip/legacy, detectron2 pickles, safetensors, and bad files.

torch files are written by tests/torch_format.py (no torch needed), with the official key names
of the tiny fixture, nested as the DeRIS trainer saves them.
"""
import argparse
import collections
import hashlib
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import torch_format as tf
from deris_jax.convert import readers
from deris_jax.convert.readers import CheckpointError

WRITERS = {
    "zip": tf.save_zip,
    "zip_big_endian": lambda obj, path: tf.save_zip(obj, path, byteorder="big"),
    "legacy": tf.save_legacy,
}


def _odd_tensors():
  """name -> tf.Tensor: views, offsets, shared storages and every dtype a checkpoint may hold."""
  rng = np.random.default_rng(0)
  base = tf.tensor(np.arange(40, dtype=np.float32).reshape(5, 8))
  bf16 = tf.tensor((rng.standard_normal((7, 3)) * 100).astype(ml_dtypes.bfloat16))
  return {
      "shared.base": base,
      "shared.transposed": tf.transpose(base),
      "shared.row": tf.view(base, 16, (8,), (1,)),
      "shared.block": tf.view(base, 10, (3, 3), (8, 2)),
      "shared.tied": tf.view(base, 0, (5, 8), (8, 1)),
      "expanded": tf.view(tf.tensor(np.arange(3, dtype=np.float32)), 0, (4, 3), (0, 1)),
      "bf16": bf16,
      "bf16.transposed": tf.transpose(bf16),
      "fp16": tf.tensor(rng.standard_normal((3, 5)).astype(np.float16)),
      "fp64": tf.tensor(rng.standard_normal((2, 2))),
      "int64": tf.tensor(np.arange(-5, 7).reshape(3, 4)),
      "int32": tf.tensor(np.arange(6, dtype=np.int32)),
      "int8": tf.tensor(np.arange(-3, 3, dtype=np.int8)),
      "uint8": tf.tensor(np.arange(250, 256, dtype=np.uint8)),
      "bool": tf.tensor(np.array([True, False, True])),
      "complex64": tf.tensor((rng.standard_normal(3) + 1j).astype(np.complex64)),
      "scalar": tf.tensor(np.array(3.5, np.float32)),
      "empty": tf.tensor(np.zeros((0, 4), np.float32)),
      "param": tf.tensor(rng.standard_normal((2, 3)).astype(np.float32), parameter=True),
  }


def _expected(tensors):
  """What the reader must return for each tf.Tensor: its value, bfloat16 widened to float32."""
  out = {}
  for name, t in tensors.items():
    value = t.value
    out[name] = value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value
  return out


def _deris_checkpoint(state):
  """A checkpoint laid out as deris/utils/checkpoint.py::save_checkpoint writes it (DDP)."""
  ddp = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
  optimizer = {
      "state": {0: {"step": tf.tensor(np.array(7.0, np.float32)),
                    "exp_avg": tf.tensor(np.ones((3, 4), np.float32)),
                    "exp_avg_sq": tf.tensor(np.full((3, 4), 2.0, np.float32))}},
      "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.05,
                        "params": [0]}],
  }
  scheduler = {"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [None], "verbose": False}
  return {"epoch": 4, "mIoU": 71.5, "best_mIoU": 72.25, "state_dict": ddp,
          "optimizer": optimizer, "scheduler": scheduler, "lr": 1e-4}


def _assert_same(got, want, ordered=True):
  assert list(got) == list(want) if ordered else sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    assert got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def _record_data_offset(path, member):
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(member)
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
  return info.header_offset + 30 + name_len + extra_len


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def _rewrite_zip(src, dst, edit, compression=zipfile.ZIP_STORED):
  """Copies a zip, replacing each member's bytes by edit(name, data) (None drops it)."""
  with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
    for info in old.infolist():
      data = edit(info.filename, old.read(info))
      if data is not None:
        new.writestr(info.filename, data)


@pytest.fixture(scope="module")
def official(tiny_state_dict):
  """The tiny fixture's state dict (official key names, float32 + int64 buffers)."""
  return dict(tiny_state_dict)


# ------------------------------------------------------------------------------------------
# torch.save files.


def test_deris_checkpoint_reads_back_exactly(tmp_path, official):
  path = tmp_path / "DeRIS-B-refcoco.pth"
  tf.save_zip(_deris_checkpoint({k: tf.tensor(v) for k, v in official.items()}), path,
              prefix="DeRIS-B-refcoco")
  assert readers.detect_format(path) == readers.TORCH_ZIP
  got = readers.read_checkpoint(path)
  _assert_same(got, official)  # `module.` stripped, optimizer and metrics left out
  assert got["perception_branch.hier_vision_encoder.layers.0.blocks.0.attn."
             "relative_position_index"].dtype == np.int64
  shapes = readers.read_checkpoint_shapes(path)
  assert shapes == {k: (v.shape, v.dtype) for k, v in official.items()}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_views_offsets_shared_storages_and_dtypes(tmp_path, writer):
  tensors = _odd_tensors()
  path = tmp_path / "odd.pth"
  WRITERS[writer](_deris_checkpoint(tensors), path)
  want = _expected(tensors)
  assert want["bf16"].dtype == np.float32 and want["fp16"].dtype == np.float16
  got = readers.read_checkpoint(path)
  _assert_same(got, want)
  assert readers.read_checkpoint_shapes(path) == {k: (v.shape, v.dtype) for k, v in want.items()}
  arrays = list(got.values())
  for i, a in enumerate(arrays):
    assert a.flags.c_contiguous and a.flags.writeable
    for b in arrays[i + 1:]:
      assert not np.shares_memory(a, b)
  got["shared.base"][0, 0] = -1.0  # arrays are independent even where storages were shared
  assert got["shared.tied"][0, 0] == 0.0 and got["shared.transposed"][0, 0] == 0.0


def test_formats_are_told_by_content_not_extension(tmp_path):
  state = {"w": tf.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))}
  tf.save_zip(state, tmp_path / "weights.pkl")
  tf.save_legacy(state, tmp_path / "weights.zip")
  with open(tmp_path / "weights.pth", "wb") as f:
    pickle.dump({"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, f, protocol=4)
  save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(tmp_path / "weights.bin"))
  formats = {name: readers.detect_format(tmp_path / name)
             for name in ("weights.pkl", "weights.zip", "weights.pth", "weights.bin")}
  assert formats == {"weights.pkl": readers.TORCH_ZIP, "weights.zip": readers.TORCH_LEGACY,
                     "weights.pth": readers.PICKLE, "weights.bin": readers.SAFETENSORS}
  for name in formats:
    np.testing.assert_array_equal(readers.read_checkpoint(tmp_path / name)["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("layout,key,found", [
    ({"model": {"a": 1}}, None, "model"),            # unilm BEiT-3 `.zip`, detectron2
    ({"module": {"a": 1}}, None, "module"),
    ({"a": 1}, None, None),                          # a bare state dict
    ({"state_dict": {"a": 1}, "ema_state_dict": {"a": 2}}, "ema_state_dict", "ema_state_dict"),
])
def test_state_dict_is_found(tmp_path, layout, key, found):
  values = {1: np.arange(3, dtype=np.float32), 2: np.full(3, 5.0, np.float32)}
  tree = {k: ({n: tf.tensor(values[v]) for n, v in sub.items()} if isinstance(sub, dict)
              else tf.tensor(values[sub])) for k, sub in layout.items()}
  path = tmp_path / "beit3_base_patch16_224.zip"
  tf.save_zip(tree, path)
  want = layout[found] if found else layout
  got = readers.read_checkpoint(path, key=key)
  assert list(got) == list(want)
  for name, index in want.items():
    np.testing.assert_array_equal(got[name], values[index])


def test_only_the_state_dict_storages_are_read(tmp_path):
  weight = tf.tensor(np.arange(4, dtype=np.float32))
  moment = tf.tensor(np.full(4, 9.0, np.float32))
  path = tmp_path / "ckpt.pth"
  storages = tf.save_zip({"state_dict": {"w": weight}, "optimizer": {"m": moment}}, path)
  key_of = {id(s): k for k, s in storages.items()}
  _flip_byte(path, _record_data_offset(path, f"archive/data/{key_of[id(moment.storage)]}"))
  np.testing.assert_array_equal(readers.read_checkpoint(path)["w"], np.arange(4))
  with pytest.raises(CheckpointError, match=r"ckpt\.pth.*CRC"):
    readers.read_checkpoint(path, key="optimizer")  # the damaged storage is read only now


def test_shapes_read_no_tensor_data(tmp_path):
  tensors = _odd_tensors()
  path = tmp_path / "ckpt.pth"
  storages = tf.save_zip({"state_dict": tensors}, path)
  want = readers.read_checkpoint_shapes(path)
  for key in storages:
    _flip_byte(path, _record_data_offset(path, f"archive/data/{key}"))
  assert readers.read_checkpoint_shapes(path) == want
  assert want["bf16"] == ((7, 3), np.dtype(np.float32))
  with pytest.raises(CheckpointError, match="CRC"):
    readers.read_checkpoint(path)


def test_untyped_storages_and_deflated_records(tmp_path):
  tensors = {  # torch saves these dtypes as bytes + `_rebuild_tensor_v3(..., dtype)`
      "uint16": tf.tensor(np.arange(60000, 60005, dtype=np.uint16)),
      "float8": tf.tensor(np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e4m3fn)),
      "float32": tf.tensor(np.arange(4096, dtype=np.float32)),
  }
  path, deflated = tmp_path / "v3.pth", tmp_path / "deflated.pth"
  tf.save_zip({"state_dict": tensors}, path)
  _rewrite_zip(path, deflated, lambda name, data: data, compression=zipfile.ZIP_DEFLATED)
  for file in (path, deflated):
    _assert_same(readers.read_checkpoint(file), _expected(tensors))
  _flip_byte(deflated, _record_data_offset(deflated, "archive/data/2") + 100)
  with pytest.raises(CheckpointError, match=r"deflated\.pth: corrupt or truncated"):
    readers.read_checkpoint(deflated)


def test_legacy_storage_views(tmp_path):
  root = tf.Storage(np.arange(10, dtype=np.float32))
  view = tf.StorageView(root, offset=4, size=6, key="view0")
  state = {"head": tf.Tensor(root, 0, (4,), (1,)), "tail": tf.Tensor(view, 1, (2, 2), (1, 2))}
  path = tmp_path / "old.pth"
  tf.save_legacy(state, path)
  got = readers.read_checkpoint(path)
  np.testing.assert_array_equal(got["head"], [0, 1, 2, 3])
  np.testing.assert_array_equal(got["tail"], [[5, 7], [6, 8]])


# ------------------------------------------------------------------------------------------
# detectron2 pickles and safetensors.


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_pickle(tmp_path, official, protocol):
  model = {f"sem_seg_head.{k}": v for k, v in list(official.items())[:40]}
  model["sem_seg_head.fortran"] = np.asfortranarray(np.arange(12.0).reshape(3, 4))
  model["sem_seg_head.half"] = np.arange(5, dtype=np.float16)
  model["sem_seg_head.zero_d"] = np.array(7, np.int64)
  model["sem_seg_head.big_endian"] = np.arange(3, dtype=">f4")
  path = tmp_path / "model_final_1e7f22.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": model, "__author__": "third_party", "matching_heuristics": True,
                 "iou": np.float64(0.5)}, f, protocol=protocol)
  assert readers.detect_format(path) == readers.PICKLE
  got = readers.read_checkpoint(path)
  want = dict(model, **{"sem_seg_head.big_endian": np.arange(3, dtype=np.float32)})
  _assert_same(got, want)
  assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())
  assert readers.read_checkpoint_shapes(path) == {k: (v.shape, v.dtype) for k, v in want.items()}


def test_safetensors(tmp_path, tiny_dir, tiny_state_dict):
  got = readers.read_checkpoint(tiny_dir / "state_dict.safetensors")
  _assert_same(got, dict(tiny_state_dict), ordered=False)
  path = tmp_path / "w.safetensors"
  bf16 = np.arange(-3, 3, dtype=np.float32).astype(ml_dtypes.bfloat16)
  save_file({"module.a": bf16, "module.b": np.arange(4, dtype=np.int64)}, str(path))
  _assert_same(readers.read_checkpoint(path),
               {"a": np.arange(-3, 3, dtype=np.float32), "b": np.arange(4, dtype=np.int64)},
               ordered=False)  # safetensors stores by alignment: b (int64) comes first
  assert readers.read_checkpoint_shapes(path) == {"a": ((6,), np.dtype(np.float32)),
                                                  "b": ((4,), np.dtype(np.int64))}
  with pytest.raises(CheckpointError, match="key='model' does not apply"):
    readers.read_checkpoint(path, key="model")


def test_sha256(tmp_path):
  path = tmp_path / "blob.bin"
  data = np.random.default_rng(0).bytes(3 << 20)
  path.write_bytes(data)
  assert readers.sha256(path) == hashlib.sha256(data).hexdigest()
  with pytest.raises(CheckpointError, match="nothing.bin: no such file"):
    readers.sha256(tmp_path / "nothing.bin")


# ------------------------------------------------------------------------------------------
# Bad files.


def _good_zip(tmp_path):
  path = tmp_path / "good.pth"
  tf.save_zip(_deris_checkpoint(_odd_tensors()), path)
  return path


def test_missing_empty_and_random_files(tmp_path):
  with pytest.raises(CheckpointError, match="missing.pth: no such file"):
    readers.read_checkpoint(tmp_path / "missing.pth")
  with pytest.raises(CheckpointError, match="not a regular file"):
    readers.read_checkpoint(tmp_path)
  (tmp_path / "empty.pth").write_bytes(b"")
  with pytest.raises(CheckpointError, match="empty.pth: not a checkpoint \\(an empty file\\)"):
    readers.read_checkpoint(tmp_path / "empty.pth")
  (tmp_path / "noise.pth").write_bytes(np.random.default_rng(1).bytes(4096))
  with pytest.raises(CheckpointError, match="noise.pth: not a checkpoint"):
    readers.read_checkpoint_shapes(tmp_path / "noise.pth")


@pytest.mark.parametrize("writer", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_files(tmp_path, writer, keep):
  path = tmp_path / "cut.pth"
  if writer == "pickle":
    with open(path, "wb") as f:
      pickle.dump({"model": {"w": np.arange(5000, dtype=np.float32)}}, f, protocol=4)
  else:
    WRITERS[writer]({"state_dict": {"w": tf.tensor(np.arange(5000, dtype=np.float32))}}, path)
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(CheckpointError, match=r"cut\.pth: .*(corrupt or truncated|truncated)"):
    readers.read_checkpoint(path)


def test_corrupt_zip_records(tmp_path):
  good = _good_zip(tmp_path)
  edits = {
      "no_storage.pth": (lambda n, d: None if n == "archive/data/0" else d,
                         "storage record 'archive/data/0' is missing"),
      "short_storage.pth": (lambda n, d: d[:8] if n == "archive/data/0" else d,
                            "storage record 'archive/data/0' has 8 bytes, the pickle declares"),
      "no_pickle.pth": (lambda n, d: None if n.endswith("data.pkl") else d,
                        "no data.pkl record, so not a torch.save file"),
      "torchscript.pth": (lambda n, d: b"" if n.endswith("data.pkl") else d, None),
  }
  for name, (edit, message) in edits.items():
    if message is None:  # a TorchScript archive: data.pkl plus code/ and constants.pkl
      with zipfile.ZipFile(tmp_path / name, "w") as archive:
        for member in ("archive/data.pkl", "archive/constants.pkl", "archive/code/m.py"):
          archive.writestr(member, b"")
      message = "TorchScript archive"
      with pytest.raises(CheckpointError, match=message):
        readers.read_checkpoint(tmp_path / name)
      continue
    _rewrite_zip(good, tmp_path / name, edit)
    for read in (readers.read_checkpoint, readers.read_checkpoint_shapes):
      with pytest.raises(CheckpointError, match=f"{name}: .*{message}"):
        read(tmp_path / name)


def test_tensor_outside_its_storage(tmp_path):
  base = tf.tensor(np.arange(6, dtype=np.float32))
  path = tmp_path / "oob.pth"
  tf.save_zip({"w": tf.view(base, 4, (2, 2), (2, 1))}, path)
  with pytest.raises(CheckpointError, match=r"oob\.pth: tensor 'w' .* reaches byte 32 of a "
                                            "storage of 24 bytes"):
    readers.read_checkpoint_shapes(path)


@pytest.mark.parametrize("tree,message", [
    ({"state_dict": {"w": tf.tensor(np.ones(2, np.float32)), "note": "hi"}},
     "entry 'note' is a str, not a tensor"),
    ({"state_dict": {"w": tf.tensor(np.ones(2, np.float32)), "lr": 0.1}},
     "entry 'lr' is a float, not a tensor"),
    ({"weights": {"w": tf.tensor(np.ones(2, np.float32))}},
     r"entry 'weights' is a dict, not a tensor; pick the state dict with key= "
     r"\(top-level keys: \['weights'\]\)"),
    ([tf.tensor(np.ones(2, np.float32))], "holds a list, expected a dict"),
    ({"state_dict": {}}, "entry 'state_dict' is an empty dict"),
    ({"state_dict": {"w": tf.Call(tf.Global("torch._utils", "_rebuild_sparse_tensor"))}},
     "unsupported tensor kind 'torch._utils._rebuild_sparse_tensor'"),
])
def test_entries_that_are_not_tensors(tmp_path, tree, message):
  path = tmp_path / "bad.pth"
  tf.save_zip(tree, path)
  with pytest.raises(CheckpointError, match=f"bad.pth: .*{message}"):
    readers.read_checkpoint(path)


def test_missing_key_lists_the_top_level(tmp_path):
  path = _good_zip(tmp_path)
  with pytest.raises(CheckpointError, match=r"no entry 'ema'; top-level keys: \['epoch'"):
    readers.read_checkpoint(path, key="ema")
  with pytest.raises(CheckpointError, match="entry 'lr' is a float, not a state dict"):
    readers.read_checkpoint(path, key="lr")


def test_object_arrays_are_refused(tmp_path):
  path = tmp_path / "objects.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": {"w": np.array([{"a": 1}], dtype=object)}}, f, protocol=2)
  with pytest.raises(CheckpointError, match="entry 'w' is an array of Python objects"):
    readers.read_checkpoint(path)


class _Payload:
  """Pickles as `os.system('touch <marker>')`: creates the marker file if ever unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["state_dict", "optimizer", "top"])
def test_forbidden_global_in_torch_file_never_runs(tmp_path, where):
  marker = tmp_path / "pwned"
  system = tf.Global(os.system.__module__, "system")  # posix.system on Linux
  payload = tf.Call(system, (f"touch {marker}",))
  tree = {"state_dict": {"w": tf.tensor(np.ones(2, np.float32))}, "optimizer": {}}
  if where == "top":
    tree["payload"] = payload
  else:
    tree[where]["payload"] = payload
  path = tmp_path / "evil.pth"
  tf.save_zip(tree, path)
  for read in (readers.read_checkpoint, readers.read_checkpoint_shapes):
    with pytest.raises(CheckpointError,
                       match=f"evil.pth: refusing global '{os.system.__module__}.system'"):
      read(path)
  assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_forbidden_global_in_pickle_never_runs(tmp_path, protocol):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": {"w": np.ones(2)}, "x": _Payload(marker)}, f, protocol=protocol)
  with pytest.raises(CheckpointError, match=f"refusing global '{os.system.__module__}.system'"):
    readers.read_checkpoint(path)
  assert not marker.exists()


def test_refused_modules_are_never_imported(tmp_path):
  assert "this" not in sys.modules  # importing `this` would print the Zen of Python
  path = tmp_path / "evil.pth"
  tf.save_zip({"w": tf.tensor(np.ones(2, np.float32)), "x": tf.Global("this", "s")}, path)
  with pytest.raises(CheckpointError, match="refusing global 'this.s'"):
    readers.read_checkpoint(path)
  assert "this" not in sys.modules


def test_inert_globals_are_read_around_but_never_returned(tmp_path):
  args = tf.Call(tf.Global("argparse", "Namespace"), ())
  weights = {"w": tf.tensor(np.arange(3, dtype=np.float32))}
  path = tmp_path / "beit3.pth"
  tf.save_zip({"model": weights, "args": args}, path)
  with pytest.raises(CheckpointError, match="inert_globals=\\('argparse.Namespace',\\)"):
    readers.read_checkpoint(path)
  got = readers.read_checkpoint(path, inert_globals=("argparse.Namespace",))
  np.testing.assert_array_equal(got["w"], np.arange(3, dtype=np.float32))
  pickled = tmp_path / "with_args.pkl"  # a real Namespace: NEWOBJ + BUILD of its __dict__
  with open(pickled, "wb") as f:
    pickle.dump({"model": {"w": np.ones(2)}, "args": argparse.Namespace(lr=0.1)}, f, protocol=2)
  with pytest.raises(CheckpointError, match="refusing global 'argparse.Namespace'"):
    readers.read_checkpoint(pickled)
  np.testing.assert_array_equal(
      readers.read_checkpoint(pickled, inert_globals=("argparse.Namespace",))["w"], np.ones(2))
  tf.save_zip({"model": dict(weights, args=args)}, path)
  with pytest.raises(CheckpointError, match="entry 'args' is an object of the inert global "
                                            "'argparse.Namespace', not a tensor"):
    readers.read_checkpoint(path, inert_globals=("argparse.Namespace",))
