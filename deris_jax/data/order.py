"""Which entries each global batch holds: the official training sampler and evaluation order.

Pure numpy, no TensorFlow: the train loop, evaluation and the tests use it directly. Rows are
positions in a prepared split's index, which keeps the order of the annotation file
(`referring_builder`); -1 marks a padding row (weight 0).

Training (`train_order`): the official DeRIS loader draws its batches with mmdet's
`DistributedGroupSampler(dataset, samples_per_gpu, world_size, rank, seed)`, re-seeded with
`seed + epoch` at every epoch. Per epoch it
  1. splits the entries by aspect flag (`width / height > 1`, `base.py::_set_group_flag`),
  2. permutes each group and pads it to a multiple of samples_per_gpu x world_size with the
     first entries of its own permutation (repeated if needed),
  3. cuts the concatenation into chunks of samples_per_gpu (one GPU's batch), permutes the
     chunks, and gives GPU r the r-th contiguous 1/world_size of them.
Step t of the epoch is then the chunks (GPU 0 step t, ..., GPU W-1 step t). Here the global
batch of step t is exactly those chunks side by side, so each group of `samples_per_gpu`
consecutive samples (the query_SA group of `model.compat_group_size` and the loss groups of
`loss.normalizer='official'`) is one official GPU batch: every batch is full (the padding
repeats real entries, weight 1), and every entry is visited once per epoch besides the
padding. The permutations come from numpy's generator seeded with (seed, epoch), not from
torch's, so the draws are the official sampler's in distribution, not number for number.

Evaluation (`eval_order`): the annotation file's order, batches of the global eval batch, the
last one padded with -1. The official evaluation runs one GPU in that order.

Hosts: a global batch's rows are spread over processes by the batch sharding; every process
reads the rows `host_rows` picks (the rows of its devices), so the stream is the same for any
number of hosts.
"""
import math

import numpy as np

PADDING = -1


def aspect_flags(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
  """The official group flag per entry: 1 if width / height > 1 (landscape), else 0."""
  return (np.asarray(widths, np.float64) / np.asarray(heights, np.float64) > 1).astype(np.int64)


def _check_batch(global_batch: int, world_size: int) -> int:
  if global_batch < 1 or world_size < 1 or global_batch % world_size:
    raise ValueError(f"global batch {global_batch} must be a positive multiple of "
                     f"data.official_world_size {world_size} (the official per-GPU batch times "
                     "the official GPU count)")
  return global_batch // world_size


def steps_per_epoch(flags: np.ndarray, *, global_batch: int, world_size: int = 1) -> int:
  """Batches per epoch of `train_order` (the same every epoch)."""
  _check_batch(global_batch, world_size)
  sizes = np.bincount(np.asarray(flags, np.int64))
  return int(sum(math.ceil(size / global_batch) for size in sizes if size))


def train_order(flags: np.ndarray, *, global_batch: int, seed: int, epoch: int,
                world_size: int = 1) -> np.ndarray:
  """The rows of every global batch of one training epoch, (steps, global_batch) int64.

  Args:
    flags: (num_rows,) the aspect group of every row (`aspect_flags`).
    global_batch: rows per step (= official samples_per_gpu x world_size).
    seed, epoch: the draws are a function of these two only.
    world_size: the official GPU count the global batch stands for.
  """
  flags = np.asarray(flags, np.int64)
  if flags.size == 0:
    raise ValueError("the training split is empty")
  per_gpu = _check_batch(global_batch, world_size)
  rng = np.random.default_rng([seed, epoch])
  padded = []
  for group in range(int(flags.max()) + 1):
    members = np.flatnonzero(flags == group)
    if members.size == 0:
      continue
    members = members[rng.permutation(members.size)]
    total = math.ceil(members.size / global_batch) * global_batch
    padded.append(np.resize(members, total))  # repeats the permutation's head to pad
  rows = np.concatenate(padded)  # (total,)
  chunks = rows.reshape(-1, per_gpu)[rng.permutation(rows.size // per_gpu)]  # (C, per_gpu)
  per_rank = chunks.reshape(world_size, -1, per_gpu)  # (W, steps, per_gpu): contiguous
  return per_rank.transpose(1, 0, 2).reshape(-1, global_batch)  # (steps, W * per_gpu)


def eval_order(num_rows: int, global_batch: int) -> np.ndarray:
  """File order in batches, (num_batches, global_batch) int64, -1 after the last row."""
  if global_batch < 1:
    raise ValueError(f"eval batch {global_batch} must be >= 1")
  num_batches = max(math.ceil(num_rows / global_batch), 1)
  rows = np.full((num_batches * global_batch,), PADDING, np.int64)
  rows[:num_rows] = np.arange(num_rows)
  return rows.reshape(num_batches, global_batch)


def host_rows(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
  """The rows of a global batch that process `process_index` reads, when the batch is split
  into equal contiguous per-process blocks (the layout of a mesh ordered by process)."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} "
                     "processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  per_host = global_batch // process_count
  return np.arange(process_index * per_host, (process_index + 1) * per_host, dtype=np.int64)
