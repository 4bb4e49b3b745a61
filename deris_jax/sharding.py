"""Meshes, shardings and batch placement: the one home for how arrays meet devices.

Used by training (mesh, state and batch shardings), evaluation (per-process rows, placement of
parameters, the gather of per-sample results), bench.py and the predictor.

Config `mesh`: sizes of the two axes; -1 takes the devices left (one axis at most).
Config `sharding.rules`: (regex, spec) pairs matched with re.search against the dotted name of
every train-state leaf ('params.beit3.encoder.layers.3.ffn.fc1.kernel',
'opt_state.2.mu.beit3...'); the first match wins, no match replicates. A spec is
  'fsdp'       shard the largest dimension the fsdp axis divides (replicate if none does, or
               if the leaf has fewer than `sharding.fsdp_min_size` elements)
  'replicate'  every device holds all of it
  a tuple      a PartitionSpec per dimension, e.g. (None, 'fsdp')
Optimizer moments have the names of their parameters inside, so the default rule
`('.*', 'fsdp')` shards each moment exactly like its parameter. The batch is split over every
axis of the mesh (`data` x `fsdp` devices share the global batch); each process holds the rows
of its devices (`process_rows`), in global order.
"""
import math
import re
from typing import Any, Sequence

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deris_jax import trees

DATA, FSDP = "data", "fsdp"


def mesh_shape(mesh_config: mlc.ConfigDict, num_devices: int) -> tuple:
  """(data, fsdp) sizes with -1 resolved; errors name the config field."""
  sizes = [int(mesh_config.data), int(mesh_config.fsdp)]
  if sizes.count(-1) > 1:
    raise ValueError(f"config mesh {tuple(sizes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f"config mesh (data={sizes[0]}, fsdp={sizes[1]}) does not fit the "
                     f"{num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config mesh (data={sizes[0]}, fsdp={sizes[1]}) uses {math.prod(sizes)} "
                     f"devices but {num_devices} are present; use -1 for one axis")
  return tuple(sizes)


def make_mesh(mesh_config: mlc.ConfigDict, devices: Sequence[Any] = None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:  # topology-aware order (TPU/GPU); fsdp is the fastest-varying axis
    grid = mesh_utils.create_device_mesh(shape, devices=devices,
                                         allow_split_physical_axes=True)
  except (AttributeError, ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)  # plain order (CPU, or a layout it cannot make)
  return Mesh(grid, (DATA, FSDP))


def _fsdp_spec(shape, mesh: Mesh, min_size: int) -> PartitionSpec:
  fsdp = mesh.shape[FSDP]
  if fsdp == 1 or math.prod(shape) < max(min_size, 1):
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # largest first
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return PartitionSpec(*spec)
  return PartitionSpec()


def leaf_spec(name: str, shape, mesh: Mesh, sharding_config: mlc.ConfigDict) -> PartitionSpec:
  """The PartitionSpec of one leaf from the first matching rule."""
  for pattern, spec in sharding_config.rules:
    if not re.search(pattern, name):
      continue
    if spec == "fsdp":
      return _fsdp_spec(shape, mesh, sharding_config.fsdp_min_size)
    if spec == "replicate":
      return PartitionSpec()
    spec = tuple(spec)
    if len(spec) != len(shape):
      raise ValueError(f"sharding rule ({pattern!r}, {spec}) has {len(spec)} entries but "
                       f"'{name}' has shape {tuple(shape)}")
    for axis, dim in zip(spec, shape):
      size = 1 if axis is None else math.prod(mesh.shape[a] for a in np.atleast_1d(axis))
      if dim % size:
        raise ValueError(f"sharding rule ({pattern!r}, {spec}): dimension {dim} of '{name}' "
                         f"{tuple(shape)} is not divisible by mesh axis {axis} ({size})")
    return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(abstract_tree, mesh: Mesh, sharding_config: mlc.ConfigDict, prefix: str = ""):
  """NamedShardings for every leaf of an abstract tree (leaves with .shape)."""
  def one(name, leaf):
    full = f"{prefix}{name}" if name else prefix.rstrip(".")
    return NamedSharding(mesh, leaf_spec(full, np.shape(leaf), mesh, sharding_config))
  return trees.map_with_names(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every mesh axis (data x fsdp); the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def process_rows(global_batch: int, mesh: Mesh) -> np.ndarray:
  """Sorted indices of the global batch rows that live on this process's devices."""
  shape = (global_batch,)
  indices = batch_sharding(mesh).addressable_devices_indices_map(shape).values()
  rows = set()
  for index in indices:
    rows.update(range(*index[0].indices(global_batch)))
  return np.asarray(sorted(rows), np.int64)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows -> global jax.Arrays sharded like `batch_sharding` (explicit copy).

  The local rows become the global rows `process_rows(...)` in order; every process passes
  the same number of rows. This host-to-device copy is the deliberate one of a train step, so
  it is allowed inside the loop's `jax.transfer_guard("disallow")` (with several processes
  JAX reports it as an implicit transfer).
  """
  sharding = batch_sharding(mesh)
  with jax.transfer_guard_host_to_device("allow"):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def data_mesh(devices: Sequence[Any] = None) -> Mesh:
  """Every device (default: of every process) on one `data` axis: evaluation's default mesh."""
  return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (DATA,))


def global_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """One array of this process's rows -> a global array sharded like `batch_sharding`."""
  with jax.transfer_guard_host_to_device("allow"):
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order (`global_array` inverted)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  by_start = {}
  for shard in x.addressable_shards:
    by_start.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(by_start[k]) for k in sorted(by_start)])


def check_groups_are_local(global_batch: int, group_size: int, mesh: Mesh) -> None:
  """Every group of `group_size` consecutive rows must lie on one process (query_SA groups)."""
  if group_size <= 1:
    return
  rows = process_rows(global_batch, mesh)
  counts = np.bincount(rows // group_size, minlength=global_batch // group_size)
  split = np.flatnonzero((counts > 0) & (counts < group_size))
  if split.size:
    raise ValueError(
        f"query_SA group {int(split[0])} (compat_group_size {group_size}) spans several "
        "processes with this mesh's device order: order the mesh devices by process")


def place_state(state, mesh: Mesh):
  """Parameters on `mesh`: arrays already spread over its devices stay as they are (e.g. FSDP
  sharded by the trainer), anything else is replicated."""
  devices = set(mesh.devices.flat)

  def place(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, replicated(mesh), lambda index: host[index])

  return jax.tree.map(place, state)


def local_copy(state, device):
  """A full copy of (possibly sharded) parameters on one local device."""
  def copy(x):
    if not x.is_fully_replicated:
      x = jax.jit(lambda y: y, out_shardings=replicated(x.sharding.mesh))(x)
    return jax.device_put(x.addressable_data(0), device)

  return jax.tree.map(copy, state)
