"""The training input stream with a resumable position: one sampler pass per epoch.

Epoch e is one pass of `pipeline.make_pipeline(config.data, train_split, train=True,
seed=config.train.seed, epoch=e)`: the official sampler's order for (seed, e)
(`deris_jax.data.order`), every batch full. The batches of a step are therefore a function of
(seed, epoch, batch index in the epoch) only, and resuming at step s opens epoch
s // steps_per_epoch at batch s % steps_per_epoch directly (random access; nothing is read
and thrown away): the same stream as a run that never stopped, on any number of hosts.

The pipeline module imports TensorFlow; it is imported here lazily (the GPU/TPU images need
no TF unless they train from tf.data).
"""
import dataclasses
import time
from typing import Callable, Dict, Iterator, Tuple

import ml_collections as mlc
import numpy as np

from deris_jax import batch as batch_lib
from deris_jax.data import locations
from deris_jax.data import order as order_lib
from deris_jax.data import tokenizer as tokenizer_lib


def steps_per_epoch(data_config: mlc.ConfigDict, global_batch: int) -> Tuple[int, int]:
  """(steps per epoch, entries in the training split)."""
  from deris_jax.data import pipeline  # TF boundary: the pipeline imports TensorFlow
  _, index = pipeline.open_split(data_config, data_config.train_split)
  if index.num_rows == 0:
    raise ValueError(f"training split '{data_config.train_split}' of {data_config.name} is "
                     "empty")
  steps = order_lib.steps_per_epoch(
      index.aspect_flags(), global_batch=global_batch,
      world_size=int(data_config.get("official_world_size", 1)))
  return steps, index.num_rows


def check_data(data_config: mlc.ConfigDict, model_config: mlc.ConfigDict,
               log: Callable[[str], None] = print) -> None:
  """The prepared training split against the model: vocabulary and target counts.

  The tokenizer's ids must fit the BEiT-3 embedding (out-of-range ids would be clamped).
  An expression with more referred instances than the model has queries trains as the
  official criterion does (at most num_queries of them are matched, all count in the mask
  normaliser); that is worth a line in the log, not an error.
  """
  from deris_jax.data import pipeline  # TF boundary: the pipeline imports TensorFlow
  builder, index = pipeline.open_split(data_config, data_config.train_split)
  vocab = tokenizer_lib.for_data(data_config, builder.info.metadata).vocab_size
  if vocab > model_config.beit3.vocab_size:
    raise ValueError(f"the tokenizer of {data_config.name} has {vocab} ids but "
                     f"model.beit3.vocab_size is {model_config.beit3.vocab_size}")
  if index.max_targets > data_config.max_instances:
    raise ValueError(
        f"training split '{index.split}' has expressions with {index.max_targets} referred "
        f"instances but data.max_instances is {data_config.max_instances}: raise "
        "data.max_instances")
  if index.max_targets > model_config.num_queries:
    over = int((index.num_targets > model_config.num_queries).sum())
    log(f"note: {over} training expression(s) refer to more than model.num_queries="
        f"{model_config.num_queries} instances (up to {index.max_targets}); as in the official "
        "criterion, at most num_queries of them are matched")


@dataclasses.dataclass
class Position:
  """Where the input stream is: the next batch is batch `batch` of epoch `epoch`."""
  epoch: int
  batch: int
  steps_per_epoch: int

  @classmethod
  def of_step(cls, step: int, steps_per_epoch: int) -> "Position":
    return cls(step // steps_per_epoch, step % steps_per_epoch, steps_per_epoch)


class TrainInput:
  """Iterates the local (this process's) training batches from a given step on."""

  def __init__(self, data_config: mlc.ConfigDict, *, global_batch: int, seed: int,
               steps_per_epoch_: int, local_rows: np.ndarray):
    """`local_rows`: the rows of each global batch this process feeds (its devices' rows,
    `sharding.process_rows(global_batch, mesh)`)."""
    self.data_config = data_config
    self.global_batch = global_batch
    self.seed = seed
    self.steps_per_epoch = steps_per_epoch_
    self.local_rows = np.asarray(local_rows, np.int64)
    self.open_seconds = 0.0  # time spent opening epochs (tokenizing, sampler order)

  def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """The local batches of one epoch from `start_batch` on (only the keys the step reads)."""
    from deris_jax.data import pipeline  # TF boundary: the pipeline imports TensorFlow
    t0 = time.perf_counter()
    data = pipeline.make_pipeline(
        self.data_config, self.data_config.train_split, train=True,
        batch_size=self.global_batch, seed=self.seed, epoch=epoch, start_batch=start_batch,
        local_rows=self.local_rows)
    if data.num_batches + start_batch != self.steps_per_epoch:
      raise RuntimeError(f"epoch {epoch} has {data.num_batches + start_batch} batches, the run "
                         f"was planned with {self.steps_per_epoch} per epoch")
    self.open_seconds += time.perf_counter() - t0
    for batch in pipeline.as_numpy(data.dataset):
      yield {k: batch[k] for k in batch_lib.TRAIN_KEYS}

  def batches(self, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
    """Local batches of steps start_step, start_step + 1, ... (endless)."""
    position = Position.of_step(start_step, self.steps_per_epoch)
    epoch, start = position.epoch, position.batch
    while True:
      yield from self.epoch_batches(epoch, start)
      epoch, start = epoch + 1, 0


# Datasets train.py may prepare by itself (no downloads): data.name -> prepare's --dataset.
SELF_PREPARING = {"deris_synthetic": "synthetic"}


def ensure_prepared(data_config: mlc.ConfigDict, log=print) -> None:
  """Prepares the configured dataset if it needs no download and is not prepared yet."""
  if data_config.name not in SELF_PREPARING:
    return
  from deris_jax.data import prepare, registry  # TF boundary: the builders import TFDS
  builder = registry.builder_class(data_config.name)(
      config=data_config.builder_config,
      data_dir=locations.data_dir(data_config.get("data_dir")))
  if builder.is_prepared():
    return
  log(f"preparing {data_config.name}/{data_config.builder_config} in "
      f"{locations.data_dir(data_config.get('data_dir'))} (once)")
  t0 = time.perf_counter()
  counts = prepare.prepare(SELF_PREPARING[data_config.name], data_dir=data_config.get("data_dir"),
                           config=data_config.builder_config)
  log(f"prepared {counts} in {time.perf_counter() - t0:.1f}s")
