"""torch.save files without torch: the zip format (PyTorch >= 1.6) and the legacy format.

Each is opened as a `Source`: the unpickled tree (tensors as references to storages) plus a
way to read one storage's bytes on demand. Storage records are read straight from the file
into the buffer that becomes the array; a record is never read twice.
"""
import io
import os
import pickle
import struct
import sys
import zipfile
import zlib
from typing import Any, Dict, Sequence

import numpy as np

from deris_jax.convert.errors import CheckpointError
from deris_jax.convert.unpickler import (RestrictedUnpickler, StorageRef, StorageType,
                                         ascii_str)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# How pickle protocol >= 2 writes LEGACY_MAGIC: LONG1, 10 bytes, little-endian.
LEGACY_MAGIC_PICKLED = b"\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")
_COPY_CHUNK = 1 << 26  # bytes per read when a zip record has to be streamed


class Source:
  """An opened checkpoint: `tree` (the unpickled object) and its storages, read on demand."""
  tree: Any = None
  native: bool = True  # storages are stored in this machine's byte order

  def root(self, key: str) -> StorageRef:
    raise KeyError(key)

  def position(self, key: str) -> int:
    return 0

  def check(self, ref: StorageRef) -> None:
    """Raises CheckpointError if the file cannot hold `ref` (missing or short record)."""

  def read(self, key: str) -> np.ndarray:
    """The bytes of root storage `key`, as a fresh writeable uint8 array."""
    raise KeyError(key)


class StorageTable:
  """Root storages met in a pickle's persistent ids, one StorageRef per key."""

  def __init__(self, path: str):
    self._path = path
    self.roots: Dict[str, StorageRef] = {}

  def get(self, storage_type, key, numel) -> StorageRef:
    if not isinstance(storage_type, StorageType):
      raise pickle.UnpicklingError(f"storage type is a {type(storage_type).__name__}")
    key = ascii_str(key)
    ref = self.roots.setdefault(key, StorageRef(key, storage_type.dtype, int(numel)))
    if ref.dtype != storage_type.dtype or ref.numel != int(numel):
      raise CheckpointError(f"{self._path}: storage '{key}' is declared both as {ref.numel} "
                            f"x {ref.dtype} and {numel} x {storage_type.dtype}")
    return ref


class TorchZipSource(Source):
  """`torch.save` zip: `<prefix>/data.pkl`, storages in `<prefix>/data/<key>`."""

  def __init__(self, path: str, inert_globals: Sequence[str], keep_array_data: bool):
    self._path = path
    self._zip = zipfile.ZipFile(path)
    self._file = open(path, "rb")  # stored (uncompressed) records are read from here
    self._records = {info.filename: info for info in self._zip.infolist()}
    # torch.save with torch.utils.serialization.config.save.compute_crc32 = False leaves every
    # record's CRC-32 field 0, and torch.load reads such files: then there is none to check.
    self._has_crc32 = any(info.CRC for info in self._records.values())
    self._prefix = self._archive_prefix()
    byteorder = self._records.get(self._prefix + "byteorder")
    order = self._read_record(byteorder).tobytes().decode() if byteorder else "little"
    if order not in ("little", "big"):
      raise CheckpointError(f"{path}: unknown byte order record {order!r}")
    self.native = order == sys.byteorder
    self._storages = StorageTable(path)
    data = self._read_record(self._records[self._prefix + "data.pkl"])
    self.tree = RestrictedUnpickler(
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

  def _persistent_load(self, pid) -> StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and ascii_str(pid[0]) == "storage"):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    return self._storages.get(storage_type, key, numel)

  def root(self, key: str) -> StorageRef:
    return self._storages.roots[key]

  def _record(self, key: str) -> zipfile.ZipInfo:
    name = f"{self._prefix}data/{key}"
    if name not in self._records:
      raise CheckpointError(f"{self._path}: storage record '{name}' is missing")
    return self._records[name]

  def position(self, key: str) -> int:
    return self._record(key).header_offset

  def check(self, ref: StorageRef) -> None:
    info = self._record(ref.key)
    if info.file_size < ref.nbytes:
      raise CheckpointError(f"{self._path}: storage record '{info.filename}' has "
                            f"{info.file_size} bytes, the pickle declares {ref.nbytes}")

  def read(self, key: str) -> np.ndarray:
    return self._read_record(self._record(key))

  def _read_record(self, info: zipfile.ZipInfo) -> np.ndarray:
    """A record's bytes as a fresh uint8 array, its CRC-32 checked if the archive has them."""
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
      if self._has_crc32 and zlib.crc32(buffer) != info.CRC:
        hint = "" if info.CRC else (
            "; its CRC-32 field is 0 while other records have one, as torch.save writes "
            "storages under torch.serialization.skip_data(), without the tensor data")
        raise zipfile.BadZipFile(f"bad CRC-32 for record '{info.filename}'{hint}")
    else:  # not torch's doing; zipfile checks the CRC-32 when it reaches the end
      with self._zip.open(info) as stream:
        view, done = memoryview(buffer), 0
        while done < info.file_size:
          chunk = stream.read(min(_COPY_CHUNK, info.file_size - done))
          if not chunk:
            raise zipfile.BadZipFile(f"record '{info.filename}' is truncated")
          view[done:done + len(chunk)] = chunk
          done += len(chunk)
        stream.read(1)
    return buffer


class TorchLegacySource(Source):
  """Legacy `torch.save`: magic, protocol, sys_info, data pickle, storage keys, raw storages.

  Each storage is an 8-byte element count followed by its bytes, in the order of the keys.
  """

  def __init__(self, path: str, inert_globals: Sequence[str], keep_array_data: bool):
    self._path = path
    self._file = open(path, "rb")
    self._storages = StorageTable(path)
    self._views: Dict[str, StorageRef] = {}

    def unpickle(persistent_load=None):
      return RestrictedUnpickler(self._file, path=path, inert_globals=inert_globals,
                                  keep_array_data=keep_array_data,
                                  persistent_load=persistent_load).load()

    if unpickle() != LEGACY_MAGIC:
      raise CheckpointError(f"{path}: bad magic number of a legacy torch.save file")
    protocol = unpickle()
    if protocol != LEGACY_PROTOCOL:
      raise CheckpointError(f"{path}: legacy torch.save protocol {protocol!r}, expected "
                            f"{LEGACY_PROTOCOL}")
    sys_info = unpickle()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    self.native = (sys.byteorder == "little") == bool(little)
    self.tree = unpickle(self._persistent_load)
    keys = [ascii_str(k) for k in unpickle()]
    self._offsets = self._index_records(keys, "<q" if little else ">q")

  def close(self):
    self._file.close()

  def _persistent_load(self, pid) -> StorageRef:
    if not (isinstance(pid, tuple) and pid and ascii_str(pid[0]) in ("storage", "module")):
      raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    if ascii_str(pid[0]) == "module":
      raise CheckpointError(f"{self._path}: holds a pickled nn.Module, not a state dict; "
                            "save model.state_dict() instead")
    _, storage_type, root_key, _, numel, view = pid
    root = self._storages.get(storage_type, root_key, numel)
    if view is None:
      return root
    view_key, offset, size = ascii_str(view[0]), int(view[1]), int(view[2])
    if offset < 0 or offset + size > root.numel:
      raise CheckpointError(f"{self._path}: storage view '{view_key}' [{offset}, "
                            f"{offset + size}) lies outside storage '{root.key}' ({root.numel})")
    return self._views.setdefault(
        view_key, StorageRef(root.key, root.dtype, size, element_offset=offset))

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

  def root(self, key: str) -> StorageRef:
    return self._storages.roots[key]

  def position(self, key: str) -> int:
    return self._offsets[key]

  def check(self, ref: StorageRef) -> None:
    if ref.key not in self._offsets:
      raise CheckpointError(f"{self._path}: storage '{ref.key}' has no record")

  def read(self, key: str) -> np.ndarray:
    buffer = np.empty(self.root(key).nbytes, np.uint8)
    self._file.seek(self._offsets[key])
    if self._file.readinto(memoryview(buffer)) != buffer.nbytes:
      raise CheckpointError(f"{self._path}: truncated inside storage '{key}'")
    return buffer
