"""A minimal writer of `torch.save` files (zip and legacy formats), so tests need no torch.

The pickle is written opcode by opcode (protocol 2, as torch.save does) for exactly what a
checkpoint holds: dicts, OrderedDicts, lists, tuples, str, int, float, bool, None, tensors
(written as torch writes them: `torch._utils._rebuild_tensor_v2` over a typed storage given by
persistent id, `_rebuild_tensor_v3` over an UntypedStorage for dtypes without a storage class,
`_rebuild_parameter` around either) and explicit `Call`s of any named global,
to build files that reference globals the reader must refuse. Verified once against real
torch: `torch.load(weights_only=True)` reads these files back exactly.
"""
import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from typing import Any, Dict, Sequence, Tuple, Union

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.complex64): "ComplexFloatStorage",
}
# dtypes that torch saves over an UntypedStorage with `_rebuild_tensor_v3` (no legacy class).
TORCH_DTYPE_NAMES = {
    np.dtype(np.uint16): "uint16", np.dtype(np.uint32): "uint32",
    np.dtype(ml_dtypes.float8_e4m3fn): "float8_e4m3fn",
    np.dtype(ml_dtypes.float8_e5m2): "float8_e5m2",
}


@dataclasses.dataclass(eq=False)
class Storage:
  data: np.ndarray  # 1-D; its dtype is the storage's


@dataclasses.dataclass(eq=False)
class StorageView:
  """A pre-1.0 storage view (legacy format only): `size` elements of `root` from `offset`."""
  root: Storage
  offset: int
  size: int
  key: str

  @property
  def data(self) -> np.ndarray:
    return self.root.data[self.offset:self.offset + self.size]


@dataclasses.dataclass(eq=False)
class Tensor:
  """A strided view of a storage; offset and strides in elements, as in torch."""
  storage: Union[Storage, StorageView]
  offset: int
  shape: Tuple[int, ...]
  stride: Tuple[int, ...]
  parameter: bool = False

  @property
  def value(self) -> np.ndarray:
    """The array this tensor holds."""
    data = self.storage.data
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.shape, tuple(s * itemsize for s in self.stride))
    return np.array(view)


@dataclasses.dataclass(frozen=True)
class Global:
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class _PersistentId:
  """Written as the tuple `pid` followed by BINPERSID."""
  pid: Tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Call:
  """Pickled as `func(*args)` (GLOBAL + REDUCE)."""
  func: Global
  args: Tuple[Any, ...] = ()


def tensor(array, *, parameter: bool = False) -> Tensor:
  """A contiguous tensor with a storage of its own."""
  array = np.asarray(array)
  strides = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
  return Tensor(Storage(np.ascontiguousarray(array).reshape(-1)), 0, array.shape, strides,
                parameter)


def view(base: Tensor, offset: int, shape: Sequence[int], stride: Sequence[int]) -> Tensor:
  """Another view of `base`'s storage (shared storage, offsets, non-contiguous strides)."""
  return Tensor(base.storage, offset, tuple(shape), tuple(stride))


def transpose(base: Tensor) -> Tensor:
  """`base.t()`: the same storage with the last two axes swapped (not contiguous)."""
  shape, stride = list(base.shape), list(base.stride)
  shape[-2:], stride[-2:] = shape[:-3:-1], stride[:-3:-1]
  return view(base, base.offset, shape, stride)


class _Pickler:
  """Protocol-2 opcodes for the objects above; storages become persistent ids."""

  def __init__(self, legacy: bool):
    self.legacy = legacy
    self.storages: Dict[int, Tuple[str, Storage]] = {}
    self.out = io.BytesIO()

  def dump(self, obj) -> bytes:
    self.out.write(b"\x80\x02")
    self.save(obj)
    self.out.write(b".")
    return self.out.getvalue()

  def save(self, obj):  # pylint: disable=too-many-branches
    write = self.out.write
    if obj is None:
      write(b"N")
    elif obj is True or obj is False:
      write(b"\x88" if obj else b"\x89")
    elif isinstance(obj, int):
      if 0 <= obj < 256:
        write(b"K" + bytes([obj]))
      elif -(1 << 31) <= obj < (1 << 31):
        write(b"J" + struct.pack("<i", obj))
      else:
        encoded = pickle.encode_long(obj)
        write(b"\x8a" + bytes([len(encoded)]) + encoded)
    elif isinstance(obj, float):
      write(b"G" + struct.pack(">d", obj))
    elif isinstance(obj, str):
      encoded = obj.encode("utf-8")
      write(b"X" + struct.pack("<I", len(encoded)) + encoded)
    elif isinstance(obj, tuple):
      write(b"(")
      for item in obj:
        self.save(item)
      write(b"t")
    elif isinstance(obj, list):
      write(b"](")
      for item in obj:
        self.save(item)
      write(b"e")
    elif isinstance(obj, collections.OrderedDict):
      self.save(Call(Global("collections", "OrderedDict")))
      self._items(obj)
    elif isinstance(obj, dict):
      write(b"}")
      self._items(obj)
    elif isinstance(obj, Global):
      write(f"c{obj.module}\n{obj.name}\n".encode("ascii"))
    elif isinstance(obj, Call):
      self.save(obj.func)
      self.save(tuple(obj.args))
      write(b"R")
    elif isinstance(obj, Tensor):
      self._tensor(obj)
    elif isinstance(obj, _PersistentId):
      self.save(obj.pid)
      write(b"Q")  # BINPERSID
    else:
      raise TypeError(f"cannot write a {type(obj).__name__}")

  def _items(self, mapping):
    self.out.write(b"(")
    for key, value in mapping.items():
      self.save(key)
      self.save(value)
    self.out.write(b"u")

  def _tensor(self, t: Tensor):
    if t.parameter:
      plain = dataclasses.replace(t, parameter=False)
      self.save(Call(Global("torch._utils", "_rebuild_parameter"),
                     (plain, True, collections.OrderedDict())))
      return
    view = t.storage if isinstance(t.storage, StorageView) else None
    root = view.root if view else t.storage
    key, _ = self.storages.setdefault(id(root), (str(len(self.storages)), root))
    dtype = root.data.dtype
    layout = (t.offset, tuple(t.shape), tuple(t.stride), False, collections.OrderedDict())
    if dtype in TORCH_DTYPE_NAMES:  # as torch does: raw bytes, the dtype given to the rebuild
      if self.legacy:
        raise ValueError(f"{dtype} tensors exist only in the zip format")
      pid = ("storage", Global("torch.storage", "UntypedStorage"), key, "cpu", root.data.nbytes)
      self.save(Call(Global("torch._utils", "_rebuild_tensor_v3"),
                     (_PersistentId(pid),) + layout + (Global("torch", TORCH_DTYPE_NAMES[dtype]),)))
      return
    pid = ("storage", Global("torch", STORAGE_NAMES[dtype]), key, "cpu", root.data.size)
    if self.legacy:
      pid += ((view.key, view.offset, view.size) if view else None,)
    elif view:
      raise ValueError("storage views exist only in the legacy format")
    self.save(Call(Global("torch._utils", "_rebuild_tensor_v2"), (_PersistentId(pid),) + layout))


def _storage_bytes(data: np.ndarray, byteorder: str) -> bytes:
  if byteorder == "little" or data.dtype.itemsize == 1:
    return data.tobytes()
  word = data.dtype.itemsize // 2 if data.dtype.kind == "c" else data.dtype.itemsize
  return data.view(np.dtype(f"u{word}")).byteswap().tobytes()


def save_zip(obj, path, *, prefix: str = "archive",
             byteorder: str = "little") -> Dict[str, Storage]:
  """Writes `obj` as torch.save (zip format) does: data.pkl, data/<key>, byteorder, version.

  Returns the storages written, by record key (the record is `<prefix>/data/<key>`).
  """
  pickler = _Pickler(legacy=False)
  data_pkl = pickler.dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{prefix}/data.pkl", data_pkl)
    archive.writestr(f"{prefix}/byteorder", byteorder)
    for key, storage in pickler.storages.values():
      archive.writestr(f"{prefix}/data/{key}", _storage_bytes(storage.data, byteorder))
    archive.writestr(f"{prefix}/version", "3\n")
  return dict(pickler.storages.values())


def save_legacy(obj, path) -> Dict[str, Storage]:
  """Writes `obj` as torch.save(..., _use_new_zipfile_serialization=False) does.

  Returns the storages written, by key.
  """
  pickler = _Pickler(legacy=True)
  data_pkl = pickler.dump(obj)
  sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 4}}
  storages = dict(pickler.storages.values())
  with open(path, "wb") as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info):
      f.write(_Pickler(legacy=True).dump(header))
    f.write(data_pkl)
    keys = sorted(storages)
    f.write(_Pickler(legacy=True).dump(keys))
    for key in keys:
      data = storages[key].data
      f.write(struct.pack("<q", data.size))
      f.write(data.tobytes())
  return storages
