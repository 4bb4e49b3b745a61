"""Writes tests/data/torch_files/: small checkpoint files made by real torch, for the readers.

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchenv/bin/python tools/make_torch_files.py

torch is not a dependency of the project (the readers in deris_jax/convert never import it);
it is needed here only, and the files it writes are committed. The test suite's other `.pth`
files come from our own writer (tests/torch_format.py); these come from torch.save itself, so
reader and writer are not from the same hands (tests/test_torch_files.py reads them).

Each of `zip.pth` (torch.save's default format) and `legacy.pth`
(`_use_new_zipfile_serialization=False`) holds a DeRIS-like checkpoint:
  {"state_dict": OrderedDict(module.<name> -> tensor), "epoch", "lr", "meta": {...}}
with float32, float16, bfloat16, int64 and bool tensors, and views of shared storages: a
tensor and a slice of it with a storage offset, a transposed (non-contiguous) view, a strided
slice, and two names tied to one tensor. `expected.npz` holds what torch itself reads back
for every name (`tensor.float().numpy()` for bfloat16, stored as float32; the other dtypes as
they are), and `torch_version.txt` the version that wrote them.
"""
import collections
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "torch_files"


def state_dict() -> "collections.OrderedDict[str, torch.Tensor]":
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=generator)
  weight = torch.randn(3, 5, generator=generator)
  tied = torch.randn(2, 3, generator=generator)
  tensors = collections.OrderedDict()
  tensors["backbone.float32"] = base
  tensors["backbone.offset_view"] = base[1:]  # same storage, offset 6
  tensors["backbone.strided"] = base[:, ::2]  # same storage, strides (6, 2)
  tensors["decoder.weight"] = weight
  tensors["decoder.weight_t"] = weight.t()  # same storage, transposed
  tensors["decoder.tied_a"] = tied
  tensors["decoder.tied_b"] = tied  # the very same tensor under two names
  tensors["half.float16"] = torch.randn(3, 4, generator=generator).half()
  tensors["half.bfloat16"] = torch.randn(2, 7, generator=generator).bfloat16()
  tensors["half.bfloat16_view"] = tensors["half.bfloat16"][:, 3:]  # a bf16 view with offset
  tensors["index.int64"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
  tensors["mask.bool"] = torch.tensor([[True, False, True], [False, False, True]])
  tensors["scalar.float32"] = torch.tensor(2.5)
  return collections.OrderedDict((f"module.{k}", v) for k, v in tensors.items())


def expected(tensors) -> dict:
  out = {}
  for name, tensor in tensors.items():
    if tensor.dtype == torch.bfloat16:
      out[name] = tensor.float().numpy()
    else:
      out[name] = tensor.contiguous().numpy()
  return out


def main() -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  tensors = state_dict()
  checkpoint = {"state_dict": tensors, "epoch": 3, "lr": 1e-4,
                "meta": {"config": "DeRIS-B-refcoco", "sizes": (384, 224), "ok": True}}
  torch.save(checkpoint, OUT / "zip.pth")
  torch.save(checkpoint, OUT / "legacy.pth", _use_new_zipfile_serialization=False)
  np.savez(OUT / "expected.npz", **expected(tensors))
  (OUT / "torch_version.txt").write_text(torch.__version__ + "\n")
  for path in sorted(OUT.iterdir()):
    print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
  main()
