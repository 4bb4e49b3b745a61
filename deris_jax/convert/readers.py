"""Torch-free readers of checkpoint files: a file in, `{name: np.ndarray}` out, no code from it run.

Formats, told apart by their first bytes (never by the file extension):
  * `torch_zip`: `torch.save` since PyTorch 1.6 -- the DeRIS `.pth` files and the unilm BEiT-3
    `.zip` files (a torch.save file with a `.zip` name, not an archive holding one);
  * `torch_legacy`: `torch.save(..., _use_new_zipfile_serialization=False)`, PyTorch < 1.6;
  * `pickle`: detectron2 / Mask2Former `.pkl` files (`{'model': {name: np.ndarray}, ...}`);
  * `safetensors`: read with the `safetensors` package (numpy backend).

This module is the public API (`read_checkpoint`, `read_checkpoint_shapes`, `detect_format`,
`sha256`, `CheckpointError`), format detection, the choice of the state dict inside a file,
detectron2 pickles and safetensors. The pieces behind it, one job each:
  * `unpickler.py`: the restricted unpickler and its allow-list. No global outside it is ever
    imported; `inert_globals` lets named globals sit outside the weights as inert placeholders;
  * `torch_files.py`: torch zip / legacy files: the pickled tree plus storage records;
  * `arrays.py`: references -> arrays (dtypes, strides, byte order), each storage read once;
  * `errors.py`: `CheckpointError` and the guard that names the damaged file.

`read_checkpoint_shapes` reads no tensor data from torch files (a detectron2 pickle holds its
arrays inline, so it is read through once, building no arrays).
"""
import contextlib
import hashlib
import json
import os
import struct
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
from safetensors import safe_open

from deris_jax.convert import arrays
from deris_jax.convert.errors import CheckpointError, PathLike, existing_file, reraise
from deris_jax.convert.torch_files import (LEGACY_MAGIC_PICKLED, Source, TorchLegacySource,
                                           TorchZipSource)
from deris_jax.convert.unpickler import ArrayShape, InertObject, RestrictedUnpickler, TensorRef

__all__ = ["CheckpointError", "detect_format", "read_checkpoint", "read_checkpoint_shapes",
           "sha256", "TORCH_ZIP", "TORCH_LEGACY", "PICKLE", "SAFETENSORS", "STATE_DICT_KEYS"]

Shape = Tuple[int, ...]

TORCH_ZIP = "torch_zip"
TORCH_LEGACY = "torch_legacy"
PICKLE = "pickle"
SAFETENSORS = "safetensors"

# Where checkpoints keep their state dict, tried in order: DeRIS `torch.save` (state_dict),
# unilm BEiT-3 and detectron2 (model), BEiT-3 DeepSpeed-style (module).
STATE_DICT_KEYS = ("state_dict", "model", "module")
DDP_PREFIX = "module."


# ------------------------------------------------------------------------------------------
# Public API.


def detect_format(path: PathLike) -> str:
  """TORCH_ZIP, TORCH_LEGACY, PICKLE or SAFETENSORS, from the file's first bytes.

  Raises:
    CheckpointError: the file is missing, empty, or none of these formats.
  """
  path = existing_file(path)
  with open(path, "rb") as f:
    head = f.read(512)
    size = os.fstat(f.fileno()).st_size
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
      return TORCH_ZIP
    if _looks_like_safetensors(f, head, size):
      return SAFETENSORS
  if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
    return TORCH_LEGACY if head[2:].startswith(LEGACY_MAGIC_PICKLED) else PICKLE
  if head[257:262] == b"ustar":
    raise CheckpointError(f"{path}: a tar archive (torch.save of PyTorch < 0.4?); this format "
                          "is not supported, re-save it with a recent PyTorch")
  what = "an empty file" if not head else f"first bytes {head[:8]!r}"
  raise CheckpointError(
      f"{path}: not a checkpoint ({what}); expected a torch.save zip (starts with 'PK'), a "
      "pickle of protocol 2-5 (detectron2 .pkl, legacy torch.save) or a safetensors file")


def read_checkpoint(path: PathLike, *, key: Optional[str] = None,
                    inert_globals: Sequence[str] = ()) -> Dict[str, np.ndarray]:
  """Reads the state dict of a checkpoint file as numpy arrays, without torch.

  Args:
    path: a torch.save file (zip or legacy), a detectron2 pickle or a safetensors file.
    key: the entry holding the state dict. By default the first of STATE_DICT_KEYS that holds
      a dict, else the top level. A DDP `module.` prefix shared by every name is stripped.
    inert_globals: 'module.name' globals allowed as inert placeholders outside the state dict
      (e.g. 'argparse.Namespace' for saved training arguments); nothing of theirs is imported.
  Returns:
    name -> C-contiguous array with the tensor's shape and dtype (bfloat16 widened exactly to
    float32), in the file's order. No two arrays share memory.
  Raises:
    CheckpointError: the file is missing, corrupt, truncated, not a checkpoint, refers to a
      global outside the allowlist, or an entry of the state dict is not a tensor.
  """
  fmt = detect_format(path)
  path = os.fspath(path)
  if fmt == SAFETENSORS:
    return _read_safetensors(path, key, with_data=True)
  with _source(path, fmt, inert_globals, keep_array_data=True) as source:
    state = _select_state_dict(source.tree, key, path)
    with reraise(path, f"{fmt} file"):
      return arrays.materialize(state, source, path)


def read_checkpoint_shapes(
    path: PathLike, *, key: Optional[str] = None,
    inert_globals: Sequence[str] = ()) -> Dict[str, Tuple[Shape, np.dtype]]:
  """name -> (shape, dtype) that `read_checkpoint` would return, without reading tensor data.

  Same arguments and errors as `read_checkpoint`. For torch files only the pickled structure
  is read, plus the zip directory or legacy record headers to check that every storage is there
  and large enough. A detectron2 pickle holds its arrays inline, so it is read through once,
  building no arrays. safetensors files: the header only.
  """
  fmt = detect_format(path)
  path = os.fspath(path)
  if fmt == SAFETENSORS:
    return _read_safetensors(path, key, with_data=False)
  with _source(path, fmt, inert_globals, keep_array_data=False) as source:
    state = _select_state_dict(source.tree, key, path)
    with reraise(path, f"{fmt} file"):
      return {name: arrays.entry_signature(name, value, source, path)
              for name, value in state.items()}


def sha256(path: PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  path = existing_file(path)
  digest = hashlib.sha256()
  block = bytearray(1 << 20)
  view = memoryview(block)
  with reraise(path, "file"), open(path, "rb") as f:
    while n := f.readinto(block):
      digest.update(view[:n])
  return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# Opening a file: a Source per format (torch files in torch_files.py, plain pickles here).


class _PickleSource(Source):
  """A plain pickle (detectron2 `.pkl`): arrays are inside the pickle, no storages."""

  def __init__(self, path: str, inert_globals: Sequence[str], keep_array_data: bool):
    with open(path, "rb") as f:
      self.tree = RestrictedUnpickler(f, path=path, inert_globals=inert_globals,
                                       keep_array_data=keep_array_data).load()

  def close(self):
    pass


_SOURCES = {TORCH_ZIP: TorchZipSource, TORCH_LEGACY: TorchLegacySource, PICKLE: _PickleSource}


@contextlib.contextmanager
def _source(path: str, fmt: str, inert_globals: Sequence[str],
            keep_array_data: bool) -> Iterator[Source]:
  with reraise(path, f"{fmt} file"):
    source = _SOURCES[fmt](path, tuple(inert_globals), keep_array_data)
  try:
    yield source
  finally:
    source.close()


# ------------------------------------------------------------------------------------------
# From a tree to the state dict.


def _select_state_dict(tree: Any, key: Optional[str], path: str) -> Dict[str, Any]:
  found = None
  if not isinstance(tree, dict):
    raise CheckpointError(f"{path}: holds {_kind(tree)}, expected a dict (a state dict, or a "
                          f"checkpoint with one of {list(STATE_DICT_KEYS)})")
  if key is not None:
    if key not in tree:
      raise CheckpointError(f"{path}: no entry '{key}'; top-level keys: {_preview(tree)}")
    state, where = tree[key], f"entry '{key}'"
  else:
    found = next((k for k in STATE_DICT_KEYS if isinstance(tree.get(k), dict)), None)
    state, where = (tree[found], f"entry '{found}'") if found else (tree, "top level")
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: {where} is {_kind(state)}, not a state dict")
  if not state:
    raise CheckpointError(f"{path}: {where} is an empty dict, no tensors")
  bad = [k for k in state if not isinstance(k, str)]
  if bad:
    raise CheckpointError(f"{path}: {where} has non-string keys such as {bad[0]!r}; "
                          f"pick the state dict with key= (top-level keys: {_preview(tree)})")
  if all(k.startswith(DDP_PREFIX) for k in state):
    state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
  for name, value in state.items():
    problem = arrays.unsupported(value)
    if problem:
      raise CheckpointError(f"{path}: state dict ({where}) entry '{name}' is {problem}, "
                            "which cannot be read")
    if not isinstance(value, (TensorRef, ArrayShape, np.ndarray, np.generic)):
      hint = "" if key is not None or found is not None else (
          f"; pick the state dict with key= (top-level keys: {_preview(tree)})")
      raise CheckpointError(f"{path}: state dict ({where}) entry '{name}' is "
                            f"{_kind(value)}, not a tensor{hint}")
  return state


def _kind(value) -> str:
  if isinstance(value, InertObject):
    return f"an object of the inert global '{value.global_name}'"
  return f"a {type(value).__name__}"


def _preview(tree: Mapping) -> str:
  keys = [repr(k) for k in list(tree)[:12]]
  return "[" + ", ".join(keys) + (", ...]" if len(tree) > 12 else "]")


# ------------------------------------------------------------------------------------------
# safetensors.

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
    "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "C64": np.complex64,
}


def _looks_like_safetensors(f, head: bytes, size: int) -> bool:
  """An 8-byte little-endian header length, then a JSON object of that length."""
  if len(head) < 10 or head[8:9] != b"{":
    return False
  length = int.from_bytes(head[:8], "little")
  if length > size - 8 or length > 100 << 20:
    return False
  f.seek(8)
  try:
    return isinstance(json.loads(f.read(length)), dict)
  except ValueError:
    return False


def _safetensors_order(path: str, names) -> list:
  """`names` in the order of their data in the file (safe_open lists them sorted)."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  return sorted(names, key=lambda n: tuple(header[n]["data_offsets"]))


def _read_safetensors(path: str, key: Optional[str], with_data: bool) -> Dict[str, Any]:
  if key is not None:
    raise CheckpointError(f"{path}: a safetensors file holds one flat state dict; "
                          f"key={key!r} does not apply")
  out = {}
  with reraise(path, "safetensors file"), safe_open(path, framework="np") as f:
    for name in _safetensors_order(path, f.keys()):
      if with_data:
        out[name] = arrays.finish(f.get_tensor(name), may_alias=True)
      else:
        tensor = f.get_slice(name)
        dtype = tensor.get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
          raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        out[name] = (tuple(tensor.get_shape()),
                     arrays.output_dtype(np.dtype(_SAFETENSORS_DTYPES[dtype])))
  if not out:
    raise CheckpointError(f"{path}: a safetensors file with no tensors")
  if all(k.startswith(DDP_PREFIX) for k in out):
    out = {k[len(DDP_PREFIX):]: v for k, v in out.items()}
  return out
