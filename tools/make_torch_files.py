"""Writes tests/data/torch_files/: small checkpoint files made by real torch, for the readers.

torch is not a dependency of the project (the readers in deris_jax/convert never import it,
and it is not in requirements.txt); it is needed by this script only, and the files it writes
are committed. Made with torch 2.13.0+cpu (CPU wheel from the package index) and numpy 2.4.6,
from the repository root:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchenv/bin/python tools/make_torch_files.py

(any build of torch 2.13 will do; only the CPU is used). A rerun writes the zip files, the npz
and the json byte for byte again; legacy.pth differs in its storage keys only (the legacy
writer names storages by their memory address), so leave the committed one unless the
contents change.

The suite's other `.pth` files come from our own writer (tests/torch_format.py), so reader and
writer would share any misreading of the format; these come from torch.save itself
(tests/test_torch_files.py reads them without torch).

A DeRIS-like checkpoint, saved in two formats, and its state dict alone in a third file:
  `zip.pth`      torch.save's default (zip) format;
  `legacy.pth`   `_use_new_zipfile_serialization=False` (the format before PyTorch 1.6),
                 less the uint16 and float8 entries: torch writes those over an
                 UntypedStorage, which its own legacy loader cannot read back;
  `no_crc32.pth` the state dict alone (`torch.save(model.state_dict())`), zip, written with
                 torch.utils.serialization.config.save.compute_crc32 = False (every record's
                 CRC-32 field left 0; torch.load reads such files);
  `skip_data.pth` a state dict saved under torch.serialization.skip_data(): the storage
                 records are there, but hold no tensor data (and a CRC-32 field of 0 among
                 records that have one); torch.load reads it as zeros, the readers refuse it.
The checkpoint is `{"meta": {...}, "state_dict": OrderedDict, "optimizer": {...}, "epoch",
"iter"}` as training loops save it:
  * state_dict: a real nn.Module's `state_dict()` (an OrderedDict carrying `_metadata`) of a
    tiny model wrapped like DistributedDataParallel (every name starts `module.`): a
    channels-last conv weight, BatchNorm buffers after a training step (0-d int64
    num_batches_tracked), LayerNorm, an embedding tied to the output head (one Parameter under
    two names); plus hand-made entries: float64/float32/float16/bfloat16/int64/int32/int8/
    uint8/uint16/bool/float8_e4m3fn tensors, 0-d and empty tensors, views sharing a storage
    (a slice with a storage offset, a strided slice, a transpose, a bf16 and an fp16 view),
    an expanded tensor (stride 0), a slice of a larger storage saved without its base, an
    nn.Parameter (`_rebuild_parameter`) and a tensor with a Python attribute
    (`_rebuild_from_type_v2`);
  * optimizer: AdamW's state_dict after that step (int keys, 0-d float `step` tensors, a
    param_groups list of plain values);
  * meta: str, int, float, bool, None, tuple, list, a numpy scalar and a numpy array.

Beside them:
  `expected.npz`  what torch itself holds, `<part>/<name>` -> array: `state_dict/<name>` for
                  every state-dict entry and `optimizer/state/<index>/<name>` for the optimizer
                  state. `tensor.contiguous().numpy()`, except bfloat16 and float8, stored as
                  float32 values (`tensor.float().numpy()`, exact);
  `layouts.json`  per state-dict entry, torch's dtype, shape, stride (elements),
                  storage_offset (elements), storage (an index: equal for entries sharing one
                  storage), storage_nbytes and whether legacy.pth has it; plus the state
                  dict's `_metadata`, the optimizer's param_groups (repr) and the checkpoint's
                  epoch and iter;
  `torch_version.txt`  torch.__version__ of the run that wrote them.
"""
import collections
import copy
import json
import pathlib

import numpy as np
import torch
import torch.utils.serialization
from torch import nn

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "torch_files"
# dtypes that torch saves as bytes + a dtype (no storage class): not in legacy.pth.
NOT_LEGACY = (torch.uint16, torch.float8_e4m3fn)
META = {"config": "DeRIS-B-refcoco", "sizes": (384, 224), "ok": True, "lr": 1e-4,
        "note": None, "classes": ["object", "stuff"], "seed": np.int64(7),
        "mean": np.array([0.485, 0.456, 0.406], np.float32)}


class Tiny(nn.Module):
  """A few layers of the kinds DeRIS has, with the embedding tied to the head."""

  def __init__(self):
    super().__init__()
    self.backbone = nn.Sequential(nn.Conv2d(3, 4, 2), nn.BatchNorm2d(4))
    self.embed = nn.Embedding(5, 4)
    self.norm = nn.LayerNorm(4)
    self.head = nn.Linear(4, 5, bias=False)
    self.head.weight = self.embed.weight

  def forward(self, image, tokens):
    features = self.backbone(image).mean((2, 3))
    return self.head(self.norm(features + self.embed(tokens)))


class Wrapper(nn.Module):
  """Names like DistributedDataParallel's: `module.<name>`."""

  def __init__(self, module):
    super().__init__()
    self.module = module


def trained_model(generator):
  model = Wrapper(Tiny()).to(memory_format=torch.channels_last)  # 4-d weights: NHWC strides
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
  image = torch.randn(2, 3, 3, 3, generator=generator)
  tokens = torch.tensor([1, 4])
  model.module(image, tokens).square().sum().backward()
  optimizer.step()
  return model, optimizer


def extra_tensors(generator) -> "collections.OrderedDict[str, torch.Tensor]":
  def randn(*shape):
    return torch.randn(*shape, generator=generator)

  base, weight, tied, big = randn(4, 6), randn(3, 5), randn(2, 3), randn(20)
  tagged = randn(3)
  tagged.tag = "python attribute"  # pickled through torch._tensor._rebuild_from_type_v2
  t = collections.OrderedDict()
  t["float32"] = base
  t["offset_view"] = base[1:]  # same storage, offset 6
  t["strided"] = base[:, ::2]  # same storage, strides (6, 2)
  t["weight"] = weight
  t["weight_t"] = weight.t()  # same storage, transposed
  t["tied_a"] = tied
  t["tied_b"] = tied  # the very same tensor under two names
  t["lonely_slice"] = big[5:8]  # its base is not saved: the whole storage of 20 is
  t["float64"] = randn(2, 2).double()
  t["float16"] = randn(3, 4).half()
  t["float16_t"] = t["float16"].t()
  t["bfloat16"] = randn(2, 7).bfloat16()
  t["bfloat16_view"] = t["bfloat16"][:, 3:]  # a bf16 view with offset
  t["float8_e4m3fn"] = randn(5).to(torch.float8_e4m3fn)  # saved as bytes + a dtype
  t["int64"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
  t["int32"] = torch.tensor([-(2**31), -1, 0, 2**31 - 1], dtype=torch.int32)
  t["int8"] = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
  t["uint8"] = torch.tensor([0, 1, 200, 255], dtype=torch.uint8)
  t["uint16"] = torch.tensor([0, 1, 60000, 65535], dtype=torch.uint16)
  t["bool"] = torch.tensor([[True, False, True], [False, False, True]])
  t["scalar"] = torch.tensor(2.5)
  t["expanded"] = randn(3).expand(2, 3)  # stride (0, 1): three elements stored
  t["empty"] = torch.zeros(0, 3)
  t["parameter"] = nn.Parameter(randn(2, 2))  # pickled through _rebuild_parameter
  t["tagged"] = tagged
  return t


def checkpoint():
  generator = torch.Generator().manual_seed(0)
  torch.manual_seed(0)  # the model's initialisation
  model, optimizer = trained_model(generator)
  state = model.state_dict()  # an OrderedDict with `_metadata`, as torch makes them
  for name, tensor in extra_tensors(generator).items():
    state[f"module.extra.{name}"] = tensor
  return {"meta": META, "state_dict": state, "optimizer": optimizer.state_dict(),
          "epoch": 3, "iter": 1200}


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
  if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn):
    return tensor.detach().float().numpy()  # exact
  return tensor.detach().contiguous().numpy()


def expected(ckpt) -> dict:
  out = {f"state_dict/{name}": as_numpy(t) for name, t in ckpt["state_dict"].items()}
  for index, state in ckpt["optimizer"]["state"].items():
    for name, t in state.items():
      out[f"optimizer/state/{index}/{name}"] = as_numpy(t)
  return out


def layouts(ckpt) -> dict:
  storages = {}  # torch.save tells storages apart by their StorageImpl, as here
  tensors = {}
  for name, t in ckpt["state_dict"].items():
    storage = t.untyped_storage()
    tensors[name] = {
        "dtype": str(t.dtype), "shape": list(t.shape), "stride": list(t.stride()),
        "storage_offset": t.storage_offset(),
        "storage": storages.setdefault(storage._cdata, len(storages)),
        "storage_nbytes": storage.nbytes(), "in_legacy": t.dtype not in NOT_LEGACY}
  groups = ckpt["optimizer"]["param_groups"]
  return {"torch": torch.__version__, "numpy": np.__version__, "tensors": tensors,
          "epoch": ckpt["epoch"], "iter": ckpt["iter"],
          "state_dict_metadata": {k: dict(v) for k, v in ckpt["state_dict"]._metadata.items()},
          "optimizer_param_groups_repr": repr(groups)}


def json_text(value) -> str:
  """Indented JSON with each tensor's layout on one line."""
  tensors = value.pop("tensors")
  lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in tensors.items()]
  head = json.dumps(value, indent=1)[:-2]
  return head + ',\n "tensors": {\n' + ",\n".join(lines) + "\n }\n}\n"


def main() -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  ckpt = checkpoint()
  config = torch.utils.serialization.config.save
  torch.save(ckpt, OUT / "zip.pth")
  legacy = dict(ckpt, state_dict=copy.copy(ckpt["state_dict"]))  # keeps `_metadata`
  for key in [k for k, t in ckpt["state_dict"].items() if t.dtype in NOT_LEGACY]:
    del legacy["state_dict"][key]
  torch.save(legacy, OUT / "legacy.pth", _use_new_zipfile_serialization=False)
  config.compute_crc32 = False
  try:
    torch.save(ckpt["state_dict"], OUT / "no_crc32.pth")
  finally:
    config.compute_crc32 = True
  with torch.serialization.skip_data():
    torch.save({"weight": torch.ones(2, 3)}, OUT / "skip_data.pth")
  for name in ("zip.pth", "legacy.pth", "no_crc32.pth"):  # torch reads back what it wrote
    again = torch.load(OUT / name, weights_only=False)
    if name == "no_crc32.pth":
      again = {"state_dict": again}
    saved = legacy if name == "legacy.pth" else ckpt
    assert list(again["state_dict"]) == list(saved["state_dict"])
    assert again["state_dict"]._metadata == saved["state_dict"]._metadata
    for key, tensor in saved["state_dict"].items():
      assert torch.equal(again["state_dict"][key].float(), tensor.float()), (name, key)
  np.savez_compressed(OUT / "expected.npz", **expected(ckpt))
  (OUT / "layouts.json").write_text(json_text(layouts(ckpt)))
  (OUT / "torch_version.txt").write_text(torch.__version__ + "\n")
  for path in sorted(OUT.iterdir()):
    print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
  main()
