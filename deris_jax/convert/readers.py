"""Torch-free readers of checkpoint files: a file in, `{name: np.ndarray}` out, no code from it run.

Formats, told apart by their first bytes (never by the file extension):
  * `torch_zip`: `torch.save` since PyTorch 1.6 -- the DeRIS `.pth` files and the unilm BEiT-3
    `.zip` files (a torch.save file with a `.zip` name, not an archive holding one);
  * `torch_legacy`: `torch.save(..., _use_new_zipfile_serialization=False)`, PyTorch < 1.6;
  * `pickle`: detectron2 / Mask2Former `.pkl` files (`{'model': {name: np.ndarray}, ...}`);
  * `safetensors`: read with the `safetensors` package (numpy backend).

Pickles go through a restricted unpickler: a global resolves only through `_GLOBALS`, a table
of tensor rebuild functions implemented here (torch is never imported), numpy's array/dtype
reconstruction, and plain containers. Every other global is refused with a CheckpointError
before anything is imported, unless the caller names it in `inert_globals`, which turns it into
an inert placeholder that may sit outside the weights (e.g. saved training arguments) but
never inside them.

Memory: torch tensors are unpickled as references to storages. Only the storages of the
requested state dict are read (an optimizer state next to it costs nothing), each once,
straight from the file into the buffer that becomes the array when the tensor is its whole
storage. Arrays inside a pickle are built by numpy over the pickled bytes, without a copy.
`read_checkpoint_shapes` reads no tensor data from torch files.
"""
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import ml_dtypes
import numpy as np

PathLike = Union[str, os.PathLike]
Shape = Tuple[int, ...]

TORCH_ZIP = "torch_zip"
TORCH_LEGACY = "torch_legacy"
PICKLE = "pickle"
SAFETENSORS = "safetensors"

# Where checkpoints keep their state dict, tried in order: DeRIS `torch.save` (state_dict),
# unilm BEiT-3 and detectron2 (model), BEiT-3 DeepSpeed-style (module).
STATE_DICT_KEYS = ("state_dict", "model", "module")
DDP_PREFIX = "module."

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# How pickle protocol >= 2 writes _LEGACY_MAGIC: LONG1, 10 bytes, little-endian.
_LEGACY_MAGIC_PICKLED = b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")
_COPY_CHUNK = 1 << 26  # bytes per read when a zip record has to be streamed


class CheckpointError(ValueError):
  """A checkpoint file cannot be read; the message names the file and what is wrong."""


# ------------------------------------------------------------------------------------------
# Public API.


def detect_format(path: PathLike) -> str:
  """TORCH_ZIP, TORCH_LEGACY, PICKLE or SAFETENSORS, from the file's first bytes.

  Raises:
    CheckpointError: the file is missing, empty, or none of these formats.
  """
  path = _existing_file(path)
  with open(path, "rb") as f:
    head = f.read(512)
    size = os.fstat(f.fileno()).st_size
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
      return TORCH_ZIP
    if _looks_like_safetensors(f, head, size):
      return SAFETENSORS
  if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
    return TORCH_LEGACY if head[2:].startswith(_LEGACY_MAGIC_PICKLED) else PICKLE
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
    with _reraise(path, f"{fmt} file"):
      return _materialize(state, source, path)


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
    with _reraise(path, f"{fmt} file"):
      return {name: _entry_signature(name, value, source, path) for name, value in state.items()}


def sha256(path: PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  path = _existing_file(path)
  digest = hashlib.sha256()
  block = bytearray(1 << 20)
  view = memoryview(block)
  with _reraise(path, "file"), open(path, "rb") as f:
    while n := f.readinto(block):
      digest.update(view[:n])
  return digest.hexdigest()


# ------------------------------------------------------------------------------------------
# What pickles unpickle to: references to storages, tensors and arrays, read later.


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for a torch storage class (`torch.FloatStorage`, ...)."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A slice of a root storage of the file: `numel` elements of `dtype` from `element_offset`."""
  key: str
  dtype: np.dtype
  numel: int
  element_offset: int = 0

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """A tensor of the file: a strided view of a storage (offset and strides in elements)."""
  storage: _StorageRef
  offset: int
  shape: Shape
  stride: Shape
  dtype: np.dtype
  problem: Optional[str] = None  # set for tensors this reader cannot represent


class _ArrayShape:
  """Shape and dtype of a pickled numpy array, its data dropped (for read_checkpoint_shapes)."""

  def __init__(self):
    self.shape: Shape = ()
    self.dtype = np.dtype(np.uint8)
    self.problem: Optional[str] = None

  def __setstate__(self, state):
    # ndarray state: ([version,] shape, dtype, is_fortran, raw data).
    state = tuple(state)
    shape, dtype, _, raw = state[1:] if len(state) == 5 else state
    self.fill(raw, dtype, shape)

  def fill(self, raw, dtype, shape):
    if not isinstance(dtype, np.dtype):
      raise pickle.UnpicklingError(f"array dtype is a {type(dtype).__name__}")
    self.shape, self.dtype = tuple(int(n) for n in shape), dtype
    if dtype.hasobject:
      self.problem = "an array of Python objects"
      return
    nbytes = len(raw) if isinstance(raw, str) else memoryview(raw).nbytes
    if nbytes != math.prod(self.shape) * dtype.itemsize:
      raise pickle.UnpicklingError(f"array of shape {self.shape} {dtype} has {nbytes} bytes")


class _InertObject:
  """An object of a global named in `inert_globals`: takes any pickle operation, does nothing."""
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, item):
    del item

  def extend(self, items):
    del items


_INERT_TYPES: Dict[str, type] = {}


def _inert_type(full_name: str) -> type:
  if full_name not in _INERT_TYPES:
    _INERT_TYPES[full_name] = type("Inert", (_InertObject,), {"global_name": full_name})
  return _INERT_TYPES[full_name]


# ------------------------------------------------------------------------------------------
# The allowlist: every global a checkpoint may name, implemented without torch.

# torch storage classes -> element dtype. UntypedStorage holds bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# torch dtype objects (pickled as the globals `torch.float32`, ...) -> numpy dtype.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64, "complex128": np.complex128,
    "cdouble": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
_TENSOR_CLASS = object()  # stands in for torch.Tensor / torch.nn.Parameter
_NDARRAY_CLASS = object()  # stands in for numpy.ndarray (only ever an argument)


def _rebuild_tensor(storage, storage_offset, size, stride) -> _TensorRef:
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}")
  return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size),
                    tuple(int(s) for s in stride), storage.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _TensorRef:
  del requires_grad, backward_hooks
  tensor = _rebuild_tensor(storage, storage_offset, size, stride)
  return _with_metadata(tensor, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> _TensorRef:
  del requires_grad, backward_hooks
  if not isinstance(dtype, np.dtype):
    raise pickle.UnpicklingError(f"tensor dtype is a {type(dtype).__name__}")
  tensor = dataclasses.replace(_rebuild_tensor(storage, storage_offset, size, stride),
                               dtype=dtype)
  return _with_metadata(tensor, metadata)


def _with_metadata(tensor: _TensorRef, metadata) -> _TensorRef:
  flags = sorted(k for k, v in dict(metadata or {}).items() if v)
  if flags:
    return dataclasses.replace(tensor, problem=f"a tensor with lazy {'/'.join(flags)} bits")
  return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  del requires_grad, backward_hooks, state
  return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
  """A Tensor/Parameter with Python attributes: rebuild the tensor, drop the attributes."""
  del state
  if func not in _REBUILDERS or new_type is not _TENSOR_CLASS:
    raise pickle.UnpicklingError("_rebuild_from_type_v2 of something other than a tensor")
  return func(*args)


def _torch_size(sizes=()) -> Shape:
  return tuple(int(n) for n in sizes)


def _torch_device(*args) -> str:
  return ":".join(str(a) for a in args)


def _latin1_encode(text, encoding="latin1") -> bytes:
  """`_codecs.encode`, as protocol-2 pickles store bytes; only the latin1 form is accepted."""
  if not isinstance(text, str) or encoding.replace("-", "") != "latin1":
    raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r})")
  return text.encode("latin1")


def _bytes(*args) -> bytes:
  if args:  # protocol 2 writes empty bytes as bytes(); anything else goes via _codecs.encode
    raise pickle.UnpicklingError("bytes() with arguments")
  return b""


def _numpy_dtype(spec, align=False, copy=False) -> np.dtype:
  if not isinstance(spec, str):
    raise pickle.UnpicklingError(f"numpy.dtype of a {type(spec).__name__}")
  return np.dtype(spec, bool(align), bool(copy))


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype):
    raise pickle.UnpicklingError(f"numpy scalar dtype is a {type(dtype).__name__}")
  if dtype.hasobject:
    return data
  if isinstance(data, str):
    data = data.encode("latin1")
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise pickle.UnpicklingError(f"numpy {dtype} scalar with bad data")
  return np.frombuffer(data, dtype)[0]


_GLOBALS: Dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
    "__builtin__.set": set, "__builtin__.frozenset": frozenset, "__builtin__.complex": complex,
    "builtins.bytes": _bytes, "_codecs.encode": _latin1_encode,
    "torch.Size": _torch_size, "torch.device": _torch_device,
    "torch.Tensor": _TENSOR_CLASS, "torch.nn.parameter.Parameter": _TENSOR_CLASS,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "numpy.ndarray": _NDARRAY_CLASS, "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
}
_GLOBALS.update({f"{module}.{name}": _StorageType(name, np.dtype(dtype))
                 for module in ("torch", "torch.cuda") for name, dtype in _STORAGE_DTYPES.items()})
_GLOBALS["torch.storage.UntypedStorage"] = _GLOBALS["torch.UntypedStorage"]
_GLOBALS.update({f"torch.{name}": np.dtype(dtype) for name, dtype in _TORCH_DTYPES.items()})
# Resolved per unpickler, as they depend on whether array data is kept.
_ARRAY_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_ARRAY_FROMBUFFER = ("numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer")


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler whose globals come only from `_GLOBALS` (or inert placeholders)."""

  def __init__(self, file, *, path: str, inert_globals: Sequence[str], keep_array_data: bool,
               persistent_load: Optional[Callable[[Any], Any]] = None):
    super().__init__(file, encoding="latin1")
    self._path = path
    self._inert = frozenset(inert_globals)
    self._keep_array_data = keep_array_data
    self._persistent_load = persistent_load

  def find_class(self, module, name):
    full_name = f"{module}.{name}"
    if full_name in _ARRAY_RECONSTRUCT:
      return self._reconstruct_array
    if full_name in _ARRAY_FROMBUFFER:
      return self._array_from_buffer
    if full_name in _GLOBALS:
      return _GLOBALS[full_name]
    if full_name in self._inert:
      return _inert_type(full_name)
    if full_name.startswith("torch._utils._rebuild"):
      raise CheckpointError(
          f"{self._path}: unsupported tensor kind '{full_name}' (sparse, quantized, nested and "
          "device-only tensors cannot be read); save dense CPU tensors")
    raise CheckpointError(
        f"{self._path}: refusing global '{full_name}': a checkpoint may only reference tensor "
        "and array rebuild functions and plain containers, so that no code from the file "
        f"runs. If '{full_name}' lies outside the weights (e.g. saved training arguments), "
        f"pass inert_globals=('{full_name}',) to read around it")

  def persistent_load(self, pid):
    if self._persistent_load is None:
      raise pickle.UnpicklingError(f"external reference {pid!r} in a plain pickle")
    return self._persistent_load(pid)

  def _reconstruct_array(self, subtype, shape=(0,), typecode=b"b"):
    """An empty array that BUILD fills (numpy's own __setstate__, which keeps the pickled
    bytes as its memory: no copy), or an _ArrayShape when the data is not wanted."""
    del shape, typecode
    if subtype is not _NDARRAY_CLASS:
      raise pickle.UnpicklingError("_reconstruct of a class other than numpy.ndarray")
    return np.empty((0,), np.uint8) if self._keep_array_data else _ArrayShape()

  def _array_from_buffer(self, buffer, dtype, shape, order):
    """Protocol 5 arrays: numpy's `_frombuffer(buffer, dtype, shape, order)`."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
      raise pickle.UnpicklingError(f"_frombuffer with dtype {dtype!r}")
    if not self._keep_array_data:
      array = _ArrayShape()
      array.fill(buffer, dtype, shape)
      return array
    return np.frombuffer(buffer, dtype).reshape(tuple(shape), order=order)


# ------------------------------------------------------------------------------------------
# Sources: a file's unpickled tree plus a way to read its storages.


class _Source:
  """An opened checkpoint: `tree` (the unpickled object) and its storages, read on demand."""
  tree: Any = None
  native: bool = True  # storages are stored in this machine's byte order

  def root(self, key: str) -> _StorageRef:
    raise KeyError(key)

  def position(self, key: str) -> int:
    return 0

  def check(self, ref: _StorageRef) -> None:
    """Raises CheckpointError if the file cannot hold `ref` (missing or short record)."""

  def read(self, key: str) -> np.ndarray:
    """The bytes of root storage `key`, as a fresh writeable uint8 array."""
    raise KeyError(key)


class _StorageTable:
  """Root storages met in a pickle's persistent ids, one _StorageRef per key."""

  def __init__(self, path: str):
    self._path = path
    self.roots: Dict[str, _StorageRef] = {}

  def get(self, storage_type, key, numel) -> _StorageRef:
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"storage type is a {type(storage_type).__name__}")
    key = _ascii(key)
    ref = self.roots.setdefault(key, _StorageRef(key, storage_type.dtype, int(numel)))
    if ref.dtype != storage_type.dtype or ref.numel != int(numel):
      raise CheckpointError(f"{self._path}: storage '{key}' is declared both as {ref.numel} "
                            f"x {ref.dtype} and {numel} x {storage_type.dtype}")
    return ref


class _TorchZipSource(_Source):
  """`torch.save` zip: `<prefix>/data.pkl`, storages in `<prefix>/data/<key>`."""

  def __init__(self, path: str, inert_globals: Sequence[str], keep_array_data: bool):
    self._path = path
    self._zip = zipfile.ZipFile(path)
    self._file = open(path, "rb")  # storage records are read from here, uncompressed
    self._records = {info.filename: info for info in self._zip.infolist()}
    self._prefix = self._archive_prefix()
    byteorder = self._records.get(self._prefix + "byteorder")
    order = self._zip.read(byteorder).decode() if byteorder else "little"
    if order not in ("little", "big"):
      raise CheckpointError(f"{path}: unknown byte order record {order!r}")
    self.native = order == sys.byteorder
    self._storages = _StorageTable(path)
    data = self._zip.read(self._prefix + "data.pkl")
    self.tree = _RestrictedUnpickler(
        io.BytesIO(data), path=path, inert_globals=inert_globals,
        keep_array_data=keep_array_data, persistent_load=self._persistent_load).load()

  def close(self):
    self._zip.close()
    self._file.close()

  def _archive_prefix(self) -> str:
    names = sorted(self._records)
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
      raise CheckpointError(f"{self._path}: a TorchScript archive (torch.jit.save), not a "
                            "torch.save file; save model.state_dict() with torch.save")
    pickles = [n for n in names if n.rsplit("/", 1)[-1] == "data.pkl" and n.count("/") <= 1]
    if len(pickles) == 1:
      return pickles[0][:-len("data.pkl")]
    found = f"{len(pickles)} data.pkl records" if pickles else "no data.pkl record"
    raise CheckpointError(f"{self._path}: a zip archive with {found}, so not a torch.save "
                          f"file (first members: {names[:5]})")

  def _persistent_load(self, pid) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and _ascii(pid[0]) == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    return self._storages.get(storage_type, key, numel)

  def root(self, key: str) -> _StorageRef:
    return self._storages.roots[key]

  def _record(self, key: str) -> zipfile.ZipInfo:
    name = f"{self._prefix}data/{key}"
    if name not in self._records:
      raise CheckpointError(f"{self._path}: storage record '{name}' is missing")
    return self._records[name]

  def position(self, key: str) -> int:
    return self._record(key).header_offset

  def check(self, ref: _StorageRef) -> None:
    info = self._record(ref.key)
    if info.file_size < ref.nbytes:
      raise CheckpointError(f"{self._path}: storage record '{info.filename}' has "
                            f"{info.file_size} bytes, the pickle declares {ref.nbytes}")

  def read(self, key: str) -> np.ndarray:
    info = self._record(key)
    buffer = np.empty(info.file_size, np.uint8)
    if info.compress_type == zipfile.ZIP_STORED:
      # torch writes records uncompressed: one read from the file straight into the buffer.
      f = self._file
      f.seek(info.header_offset)
      header = f.read(30)
      if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of '{info.filename}'")
      name_len, extra_len = struct.unpack("<HH", header[26:30])
      f.seek(info.header_offset + 30 + name_len + extra_len)
      if f.readinto(memoryview(buffer)) != info.file_size:
        raise zipfile.BadZipFile(f"record '{info.filename}' is truncated")
      if zlib.crc32(buffer) != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 for record '{info.filename}'")
    else:
      with self._zip.open(info) as stream:  # checks the CRC when it reaches the end
        view, done = memoryview(buffer), 0
        while done < info.file_size:
          chunk = stream.read(min(_COPY_CHUNK, info.file_size - done))
          if not chunk:
            raise zipfile.BadZipFile(f"record '{info.filename}' is truncated")
          view[done:done + len(chunk)] = chunk
          done += len(chunk)
        stream.read(1)
    return buffer


class _TorchLegacySource(_Source):
  """Legacy `torch.save`: magic, protocol, sys_info, data pickle, storage keys, raw storages.

  Each storage is an 8-byte element count followed by its bytes, in the order of the keys.
  """

  def __init__(self, path: str, inert_globals: Sequence[str], keep_array_data: bool):
    self._path = path
    self._file = open(path, "rb")
    self._storages = _StorageTable(path)
    self._views: Dict[str, _StorageRef] = {}

    def unpickle(persistent_load=None):
      return _RestrictedUnpickler(self._file, path=path, inert_globals=inert_globals,
                                  keep_array_data=keep_array_data,
                                  persistent_load=persistent_load).load()

    if unpickle() != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: bad magic number of a legacy torch.save file")
    protocol = unpickle()
    if protocol != _LEGACY_PROTOCOL:
      raise CheckpointError(f"{path}: legacy torch.save protocol {protocol!r}, expected "
                            f"{_LEGACY_PROTOCOL}")
    sys_info = unpickle()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    self.native = (sys.byteorder == "little") == bool(little)
    self.tree = unpickle(self._persistent_load)
    keys = [_ascii(k) for k in unpickle()]
    self._offsets = self._index_records(keys, "<q" if little else ">q")

  def close(self):
    self._file.close()

  def _persistent_load(self, pid) -> _StorageRef:
    if not (isinstance(pid, tuple) and pid and _ascii(pid[0]) in ("storage", "module")):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    if _ascii(pid[0]) == "module":
      raise CheckpointError(f"{self._path}: holds a pickled nn.Module, not a state dict; "
                            "save model.state_dict() instead")
    _, storage_type, root_key, _, numel, view = pid
    root = self._storages.get(storage_type, root_key, numel)
    if view is None:
      return root
    view_key, offset, size = _ascii(view[0]), int(view[1]), int(view[2])
    if offset < 0 or offset + size > root.numel:
      raise CheckpointError(f"{self._path}: storage view '{view_key}' [{offset}, "
                            f"{offset + size}) lies outside storage '{root.key}' ({root.numel})")
    return self._views.setdefault(
        view_key, _StorageRef(root.key, root.dtype, size, element_offset=offset))

  def _index_records(self, keys, count_format) -> Dict[str, int]:
    """key -> file offset of its bytes, walking the 8-byte headers (no data is read)."""
    size = os.fstat(self._file.fileno()).st_size
    position, offsets = self._file.tell(), {}
    for key in keys:
      if key not in self._storages.roots:
        raise CheckpointError(f"{self._path}: storage '{key}' is listed but never used")
      root = self._storages.roots[key]
      self._file.seek(position)
      header = self._file.read(8)
      if len(header) < 8:
        raise CheckpointError(f"{self._path}: truncated before storage '{key}'")
      (count,) = struct.unpack(count_format, header)
      if count != root.numel:
        raise CheckpointError(f"{self._path}: storage '{key}' holds {count} elements, the "
                              f"pickle declares {root.numel}")
      offsets[key] = position + 8
      position += 8 + root.nbytes
      if position > size:
        raise CheckpointError(f"{self._path}: truncated inside storage '{key}' (file has "
                              f"{size} bytes, needs at least {position})")
    return offsets

  def root(self, key: str) -> _StorageRef:
    return self._storages.roots[key]

  def position(self, key: str) -> int:
    return self._offsets[key]

  def check(self, ref: _StorageRef) -> None:
    if ref.key not in self._offsets:
      raise CheckpointError(f"{self._path}: storage '{ref.key}' has no record")

  def read(self, key: str) -> np.ndarray:
    buffer = np.empty(self.root(key).nbytes, np.uint8)
    self._file.seek(self._offsets[key])
    if self._file.readinto(memoryview(buffer)) != buffer.nbytes:
      raise CheckpointError(f"{self._path}: truncated inside storage '{key}'")
    return buffer


class _PickleSource(_Source):
  """A plain pickle (detectron2 `.pkl`): arrays are inside the pickle, no storages."""

  def __init__(self, path: str, inert_globals: Sequence[str], keep_array_data: bool):
    with open(path, "rb") as f:
      self.tree = _RestrictedUnpickler(f, path=path, inert_globals=inert_globals,
                                       keep_array_data=keep_array_data).load()

  def close(self):
    pass


_SOURCES = {TORCH_ZIP: _TorchZipSource, TORCH_LEGACY: _TorchLegacySource, PICKLE: _PickleSource}


@contextlib.contextmanager
def _source(path: str, fmt: str, inert_globals: Sequence[str],
            keep_array_data: bool) -> Iterator[_Source]:
  with _reraise(path, f"{fmt} file"):
    source = _SOURCES[fmt](path, tuple(inert_globals), keep_array_data)
  try:
    yield source
  finally:
    source.close()


# ------------------------------------------------------------------------------------------
# From a tree to the state dict, and from references to arrays.


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
    problem = _unsupported(value)
    if problem:
      raise CheckpointError(f"{path}: state dict ({where}) entry '{name}' is {problem}, "
                            "which cannot be read")
    if not isinstance(value, (_TensorRef, _ArrayShape, np.ndarray, np.generic)):
      hint = "" if key is not None or found is not None else (
          f"; pick the state dict with key= (top-level keys: {_preview(tree)})")
      raise CheckpointError(f"{path}: state dict ({where}) entry '{name}' is "
                            f"{_kind(value)}, not a tensor{hint}")
  return state


def _unsupported(value) -> Optional[str]:
  """Why a tensor-like `value` cannot be returned as an array, or None."""
  if isinstance(value, (_TensorRef, _ArrayShape)):
    return value.problem
  if isinstance(value, (np.ndarray, np.generic)) and value.dtype.hasobject:
    return "an array of Python objects"
  return None


def _output_dtype(dtype: np.dtype) -> np.dtype:
  if dtype == ml_dtypes.bfloat16:
    return np.dtype(np.float32)
  return dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype


def _check_extent(name: str, tensor: _TensorRef, path: str) -> None:
  """The tensor must lie inside its storage (a corrupt pickle could point anywhere)."""
  if len(tensor.shape) != len(tensor.stride) or min(
      (tensor.offset,) + tensor.shape + tensor.stride) < 0:
    raise CheckpointError(f"{path}: tensor '{name}' has a bad layout: shape {tensor.shape}, "
                          f"stride {tensor.stride}, offset {tensor.offset}")
  if math.prod(tensor.shape) == 0:
    return
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
  end = (last + 1) * tensor.dtype.itemsize
  if end > tensor.storage.nbytes:
    raise CheckpointError(
        f"{path}: tensor '{name}' (shape {tensor.shape}, stride {tensor.stride}, offset "
        f"{tensor.offset}) reaches byte {end} of a storage of {tensor.storage.nbytes} bytes")


def _entry_signature(name: str, value, source: _Source, path: str) -> Tuple[Shape, np.dtype]:
  if isinstance(value, _TensorRef):
    _check_extent(name, value, path)
    source.check(source.root(value.storage.key))
    return value.shape, _output_dtype(value.dtype)
  if isinstance(value, _ArrayShape):
    return value.shape, _output_dtype(value.dtype)
  value = np.asarray(value)
  return value.shape, _output_dtype(value.dtype)


def _materialize(state: Mapping[str, Any], source: _Source, path: str) -> Dict[str, np.ndarray]:
  """Reads the storages behind `state` in file order, each once; returns name -> array."""
  tensors = {n: v for n, v in state.items() if isinstance(v, _TensorRef)}
  for name, tensor in tensors.items():
    _check_extent(name, tensor, path)
    source.check(source.root(tensor.storage.key))
    if not source.native and tensor.dtype.itemsize > tensor.storage.dtype.itemsize:
      raise CheckpointError(f"{path}: tensor '{name}' ({tensor.dtype}) views a byte storage "
                            "saved in the other byte order; this cannot be read")
  users = collections.Counter(t.storage.key for t in tensors.values())
  buffers: Dict[str, np.ndarray] = {}
  handed_out = set()  # storages whose buffer became one of the arrays
  out: Dict[str, np.ndarray] = {}
  for name in sorted(tensors, key=lambda n: (source.position(tensors[n].storage.key), n)):
    tensor = tensors[name]
    key = tensor.storage.key
    if key not in buffers:
      buffers[key] = _native(source.read(key), source.root(key).dtype, source.native, path)
    out[name] = _tensor_array(tensor, buffers[key], may_alias=key not in handed_out)
    if out[name].base is buffers[key]:
      handed_out.add(key)
    users[key] -= 1
    if not users[key]:
      del buffers[key]  # later tensors own or copy their memory, so the buffer can go
  returned = set()  # ids of pickled arrays already returned (one array under two names)
  for name, value in state.items():
    if isinstance(value, np.ndarray):  # unpickled by numpy itself, over the pickled bytes
      out[name] = _finish(value, may_alias=id(value) not in returned)
      returned.add(id(value))
    elif not isinstance(value, _TensorRef):
      out[name] = _finish(np.asarray(value), may_alias=False)
  return {name: out[name] for name in state}


def _native(buffer: np.ndarray, dtype: np.dtype, native: bool, path: str) -> np.ndarray:
  """Byte-swaps a storage saved on a machine of the other byte order, in place."""
  if native or dtype.itemsize == 1:
    return buffer
  if dtype.kind == "V":  # ml_dtypes types report kind 'V'
    word = dtype.itemsize
  else:
    word = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
  if buffer.nbytes % word:
    raise CheckpointError(f"{path}: storage of {buffer.nbytes} bytes is not whole {dtype}")
  buffer.view(np.dtype(f"u{word}")).byteswap(inplace=True)
  return buffer


def _tensor_array(tensor: _TensorRef, buffer: np.ndarray, may_alias: bool) -> np.ndarray:
  """The tensor as an array; a view of `buffer` only if allowed and it is the whole buffer."""
  if math.prod(tensor.shape) == 0:
    return np.zeros(tensor.shape, _output_dtype(tensor.dtype))
  itemsize = tensor.dtype.itemsize
  byte_offset = tensor.storage.element_offset * tensor.storage.dtype.itemsize
  byte_offset += tensor.offset * itemsize
  view = np.ndarray(tensor.shape, tensor.dtype, buffer=buffer, offset=byte_offset,
                    strides=tuple(s * itemsize for s in tensor.stride))
  whole = byte_offset == 0 and view.nbytes == buffer.nbytes and view.flags.c_contiguous
  return _finish(view, may_alias=may_alias and whole)


def _finish(array: np.ndarray, *, may_alias: bool) -> np.ndarray:
  """Output dtype, C order, own memory unless `may_alias` (the source buffer is not shared)."""
  dtype = _output_dtype(array.dtype)
  if dtype != array.dtype:
    return array.astype(dtype, order="C")
  if may_alias and array.flags.writeable and array.flags.c_contiguous:
    return array
  return np.array(array, order="C", copy=True)


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
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if key is not None:
    raise CheckpointError(f"{path}: a safetensors file holds one flat state dict; "
                          f"key={key!r} does not apply")
  out = {}
  with _reraise(path, "safetensors file"), safe_open(path, framework="np") as f:
    for name in _safetensors_order(path, f.keys()):
      if with_data:
        out[name] = _finish(f.get_tensor(name), may_alias=True)
      else:
        tensor = f.get_slice(name)
        dtype = tensor.get_dtype()
        if dtype not in _SAFETENSORS_DTYPES:
          raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        out[name] = (tuple(tensor.get_shape()),
                     _output_dtype(np.dtype(_SAFETENSORS_DTYPES[dtype])))
  if not out:
    raise CheckpointError(f"{path}: a safetensors file with no tensors")
  if all(k.startswith(DDP_PREFIX) for k in out):
    out = {k[len(DDP_PREFIX):]: v for k, v in out.items()}
  return out


# ------------------------------------------------------------------------------------------
# Small helpers.


def _existing_file(path: PathLike) -> str:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not a regular file")
  return path


@contextlib.contextmanager
def _reraise(path: str, what: str) -> Iterator[None]:
  """Turns the errors a damaged file can cause into a CheckpointError naming it."""
  try:
    yield
  except CheckpointError:
    raise
  except MemoryError as e:
    raise CheckpointError(f"{path}: out of memory reading the {what}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from e


def _ascii(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _kind(value) -> str:
  if isinstance(value, _InertObject):
    return f"an object of the inert global '{value.global_name}'"
  return f"a {type(value).__name__}"


def _preview(tree: Mapping) -> str:
  keys = [repr(k) for k in list(tree)[:12]]
  return "[" + ", ".join(keys) + (", ...]" if len(tree) > 12 else "]")
