"""Our torch-free readers on files that real torch wrote (tools/make_torch_files.py).

The other `.pth` files of the suite come from our own writer (tests/torch_format.py); these
were written by torch.save (the version in torch_version.txt), in the zip and the legacy
format, with float32, float16, bfloat16, int64 and bool tensors, views that share a storage
(offsets, strides, a transpose), a tensor tied under two names, and a DDP `module.` prefix.
`expected.npz` is what torch itself read back.
"""
import pathlib

import ml_dtypes
import numpy as np
import pytest

from deris_jax.convert import readers

FILES = pathlib.Path(__file__).resolve().parent / "data" / "torch_files"


@pytest.fixture(scope="module")
def expected():
  with np.load(FILES / "expected.npz") as data:  # names as torch saved them, `module.` first
    return {name[len("module."):]: data[name] for name in data.files}


@pytest.mark.parametrize("name", ["zip.pth", "legacy.pth"])
def test_every_tensor_reads_back_as_torch_reads_it(name, expected):
  fmt = readers.TORCH_ZIP if name == "zip.pth" else readers.TORCH_LEGACY
  assert readers.detect_format(FILES / name) == fmt
  got = readers.read_checkpoint(FILES / name)
  assert list(got) == list(expected)  # the file's order, the `module.` prefix stripped
  for key, want in expected.items():
    value = got[key]
    assert value.shape == want.shape, key
    if key.startswith("half.bfloat16"):  # widened exactly to float32
      assert value.dtype == np.float32
      np.testing.assert_array_equal(value.astype(ml_dtypes.bfloat16).astype(np.float32), want)
    else:
      assert value.dtype == want.dtype, key
    np.testing.assert_array_equal(value, want, err_msg=key)
    assert value.flags.c_contiguous
  shapes = readers.read_checkpoint_shapes(FILES / name)
  assert shapes == {k: (v.shape, v.dtype) for k, v in got.items()}


def test_views_of_one_storage_come_back_as_separate_arrays(expected):
  got = readers.read_checkpoint(FILES / "zip.pth")
  np.testing.assert_array_equal(got["backbone.offset_view"], got["backbone.float32"][1:])
  np.testing.assert_array_equal(got["backbone.strided"], got["backbone.float32"][:, ::2])
  np.testing.assert_array_equal(got["decoder.weight_t"], got["decoder.weight"].T)
  np.testing.assert_array_equal(got["decoder.tied_a"], got["decoder.tied_b"])
  got["decoder.tied_a"][0, 0] = 123.0  # independent arrays, as read_checkpoint promises
  assert got["decoder.tied_b"][0, 0] == expected["decoder.tied_b"][0, 0]


def test_the_files_are_the_committed_ones():
  assert (FILES / "torch_version.txt").read_text().startswith("2.")
  assert sum(p.stat().st_size for p in FILES.iterdir()) < 100_000
