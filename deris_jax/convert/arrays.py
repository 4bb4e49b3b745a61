"""From unpickled references to numpy arrays: output dtypes, layouts inside storages, byte
order, and reading each storage once, in file order.

Only the storages of the requested state dict are read (an optimizer state next to it costs
nothing). When a tensor is its whole storage, the buffer read from the file becomes the array;
arrays inside a pickle are kept over the pickled bytes. No two returned arrays share memory.
"""
import collections
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes
import numpy as np

from deris_jax.convert.errors import CheckpointError
from deris_jax.convert.torch_files import Source
from deris_jax.convert.unpickler import ArrayShape, Shape, TensorRef


def unsupported(value) -> Optional[str]:
  """Why a tensor-like `value` cannot be returned as an array, or None."""
  if isinstance(value, (TensorRef, ArrayShape)):
    return value.problem
  if isinstance(value, (np.ndarray, np.generic)) and value.dtype.hasobject:
    return "an array of Python objects"
  return None


def output_dtype(dtype: np.dtype) -> np.dtype:
  if dtype == ml_dtypes.bfloat16:
    return np.dtype(np.float32)
  return dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype


def check_extent(name: str, tensor: TensorRef, path: str) -> None:
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


def entry_signature(name: str, value, source: Source, path: str) -> Tuple[Shape, np.dtype]:
  if isinstance(value, TensorRef):
    check_extent(name, value, path)
    source.check(source.root(value.storage.key))
    return value.shape, output_dtype(value.dtype)
  if isinstance(value, ArrayShape):
    return value.shape, output_dtype(value.dtype)
  value = np.asarray(value)
  return value.shape, output_dtype(value.dtype)


def materialize(state: Mapping[str, Any], source: Source, path: str) -> Dict[str, np.ndarray]:
  """Reads the storages behind `state` in file order, each once; returns name -> array."""
  tensors = {n: v for n, v in state.items() if isinstance(v, TensorRef)}
  for name, tensor in tensors.items():
    check_extent(name, tensor, path)
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
      buffers[key] = native_order(source.read(key), source.root(key).dtype, source.native, path)
    out[name] = tensor_array(tensor, buffers[key], may_alias=key not in handed_out)
    if out[name].base is buffers[key]:
      handed_out.add(key)
    users[key] -= 1
    if not users[key]:
      del buffers[key]  # later tensors own or copy their memory, so the buffer can go
  returned = set()  # ids of pickled arrays already returned (one array under two names)
  for name, value in state.items():
    if isinstance(value, np.ndarray):  # unpickled by numpy itself, over the pickled bytes
      out[name] = finish(value, may_alias=id(value) not in returned)
      returned.add(id(value))
    elif not isinstance(value, TensorRef):
      out[name] = finish(np.asarray(value), may_alias=False)
  return {name: out[name] for name in state}


def native_order(buffer: np.ndarray, dtype: np.dtype, native: bool, path: str) -> np.ndarray:
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


def tensor_array(tensor: TensorRef, buffer: np.ndarray, may_alias: bool) -> np.ndarray:
  """The tensor as an array; a view of `buffer` only if allowed and it is the whole buffer."""
  if math.prod(tensor.shape) == 0:
    return np.zeros(tensor.shape, output_dtype(tensor.dtype))
  itemsize = tensor.dtype.itemsize
  byte_offset = tensor.storage.element_offset * tensor.storage.dtype.itemsize
  byte_offset += tensor.offset * itemsize
  view = np.ndarray(tensor.shape, tensor.dtype, buffer=buffer, offset=byte_offset,
                    strides=tuple(s * itemsize for s in tensor.stride))
  whole = byte_offset == 0 and view.nbytes == buffer.nbytes and view.flags.c_contiguous
  return finish(view, may_alias=may_alias and whole)


def finish(array: np.ndarray, *, may_alias: bool) -> np.ndarray:
  """Output dtype, C order, own memory unless `may_alias` (the source buffer is not shared)."""
  dtype = output_dtype(array.dtype)
  if dtype != array.dtype:
    return array.astype(dtype, order="C")
  if may_alias and array.flags.writeable and array.flags.c_contiguous:
    return array
  return np.array(array, order="C", copy=True)
