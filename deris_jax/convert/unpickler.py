"""The restricted unpickler of checkpoint files and its allow-list: what a pickle may name.

A global resolves only through `_GLOBALS`, a table of tensor rebuild functions implemented here
(torch is never imported), numpy's array/dtype reconstruction, and plain containers. Every
other global is refused with a CheckpointError before anything is imported, unless the caller
names it in `inert_globals`, which turns it into an inert placeholder that may sit outside the
weights (e.g. saved training arguments) but never inside them.

Unpickling builds references (`StorageRef`, `TensorRef`, `ArrayShape`), not arrays: the data
is read later, by `torch_files` and `arrays`.
"""
import collections
import dataclasses
import math
import pickle
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from deris_jax.convert.errors import CheckpointError

Shape = Tuple[int, ...]


# ------------------------------------------------------------------------------------------
# What pickles unpickle to: references to storages, tensors and arrays, read later.


@dataclasses.dataclass(frozen=True)
class StorageType:
  """Stands in for a torch storage class (`torch.FloatStorage`, ...)."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class StorageRef:
  """A slice of a root storage of the file: `numel` elements of `dtype` from `element_offset`."""
  key: str
  dtype: np.dtype
  numel: int
  element_offset: int = 0

  @property
  def nbytes(self) -> int:
    return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor of the file: a strided view of a storage (offset and strides in elements)."""
  storage: StorageRef
  offset: int
  shape: Shape
  stride: Shape
  dtype: np.dtype
  problem: Optional[str] = None  # set for tensors this reader cannot represent


class ArrayShape:
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


class InertObject:
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
    _INERT_TYPES[full_name] = type("Inert", (InertObject,), {"global_name": full_name})
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


def _rebuild_tensor(storage, storage_offset, size, stride) -> TensorRef:
  if not isinstance(storage, StorageRef):
    raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}")
  return TensorRef(storage, int(storage_offset), tuple(int(n) for n in size),
                    tuple(int(s) for s in stride), storage.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> TensorRef:
  del requires_grad, backward_hooks
  tensor = _rebuild_tensor(storage, storage_offset, size, stride)
  return _with_metadata(tensor, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> TensorRef:
  del requires_grad, backward_hooks
  if not isinstance(dtype, np.dtype):
    raise pickle.UnpicklingError(f"tensor dtype is a {type(dtype).__name__}")
  tensor = dataclasses.replace(_rebuild_tensor(storage, storage_offset, size, stride),
                               dtype=dtype)
  return _with_metadata(tensor, metadata)


def _with_metadata(tensor: TensorRef, metadata) -> TensorRef:
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
_GLOBALS.update({f"{module}.{name}": StorageType(name, np.dtype(dtype))
                 for module in ("torch", "torch.cuda") for name, dtype in _STORAGE_DTYPES.items()})
_GLOBALS["torch.storage.UntypedStorage"] = _GLOBALS["torch.UntypedStorage"]
_GLOBALS.update({f"torch.{name}": np.dtype(dtype) for name, dtype in _TORCH_DTYPES.items()})
# Resolved per unpickler, as they depend on whether array data is kept.
_ARRAY_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_ARRAY_FROMBUFFER = ("numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer")


class RestrictedUnpickler(pickle.Unpickler):
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
    bytes as its memory: no copy), or an ArrayShape when the data is not wanted."""
    del shape, typecode
    if subtype is not _NDARRAY_CLASS:
      raise pickle.UnpicklingError("_reconstruct of a class other than numpy.ndarray")
    return np.empty((0,), np.uint8) if self._keep_array_data else ArrayShape()

  def _array_from_buffer(self, buffer, dtype, shape, order):
    """Protocol 5 arrays: numpy's `_frombuffer(buffer, dtype, shape, order)`."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
      raise pickle.UnpicklingError(f"_frombuffer with dtype {dtype!r}")
    if not self._keep_array_data:
      array = ArrayShape()
      array.fill(buffer, dtype, shape)
      return array
    return np.frombuffer(buffer, dtype).reshape(tuple(shape), order=order)


def ascii_str(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)
