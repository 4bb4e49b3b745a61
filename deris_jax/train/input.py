"""The training input stream with a resumable position: epoch-seeded pipelines.

Epoch e reads `make_pipeline(config.data, train_split, train=True, seed=epoch_seed(seed, e))`
and takes its first `steps_per_epoch` batches, with steps_per_epoch = ceil(examples / global
batch) (the official sampler also rounds up). The batches of a step are therefore a function
of (seed, epoch, batch index in the epoch) only, and resuming at step s rebuilds epoch
s // steps_per_epoch and skips s % steps_per_epoch batches: the same stream as a run that
never stopped. Skipping costs the input pipeline's time for the skipped batches (within one
epoch at most); `skip_seconds` reports it.

The pipeline module imports TensorFlow; it is imported here lazily (the GPU/TPU images need
no TF unless they train from tf.data).
"""
import dataclasses
import time
from typing import Dict, Iterator, Tuple

import ml_collections as mlc
import numpy as np

from deris_jax.train import step as step_lib


def epoch_seed(seed: int, epoch: int) -> int:
  """The pipeline seed of an epoch (distinct per epoch, fixed by the run's seed)."""
  return seed * 1000 + epoch


def steps_per_epoch(data_config: mlc.ConfigDict, global_batch: int) -> Tuple[int, int]:
  """(steps per epoch, examples in the training split)."""
  from deris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, index = pipeline.open_split(data_config, data_config.train_split)
  examples = index.num_rows
  if examples == 0:
    raise ValueError(f"training split '{data_config.train_split}' of {data_config.name} is "
                     "empty")
  return -(-examples // global_batch), examples


def check_vocabulary(data_config: mlc.ConfigDict, model_config: mlc.ConfigDict) -> None:
  """The tokenizer's ids must fit the BEiT-3 embedding (out-of-range ids would be clamped)."""
  from deris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  builder, _ = pipeline.open_split(data_config, data_config.train_split)
  vocab = pipeline.load_tokenizer(data_config, builder.info.metadata).vocab_size
  if vocab > model_config.beit3.vocab_size:
    raise ValueError(f"the tokenizer of {data_config.name} has {vocab} ids but "
                     f"model.beit3.vocab_size is {model_config.beit3.vocab_size}")


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
               steps_per_epoch_: int, process_index: int, process_count: int):
    self.data_config = data_config
    self.global_batch = global_batch
    self.seed = seed
    self.steps_per_epoch = steps_per_epoch_
    self.process_index = process_index
    self.process_count = process_count
    self.skip_seconds = 0.0  # time spent skipping batches when resuming

  def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Dict[str, np.ndarray]]:
    from deris_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    data = pipeline.make_pipeline(
        self.data_config, self.data_config.train_split, train=True,
        batch_size=self.global_batch, seed=epoch_seed(self.seed, epoch),
        process_index=self.process_index, process_count=self.process_count)
    dataset = data.dataset.take(self.steps_per_epoch)
    if skip:
      t0 = time.perf_counter()
      dataset = dataset.skip(skip)
      iterator = pipeline.as_numpy(dataset)
      first = next(iterator)  # the skipped batches are produced here
      self.skip_seconds += time.perf_counter() - t0
      yield first
      yield from iterator
    else:
      yield from pipeline.as_numpy(dataset)

  def batches(self, start_step: int) -> Iterator[Dict[str, np.ndarray]]:
    """Local batches (only the keys the train step reads) of steps start_step, +1, ..."""
    position = Position.of_step(start_step, self.steps_per_epoch)
    epoch, skip = position.epoch, position.batch
    while True:
      for batch in self._epoch_batches(epoch, skip):
        yield {k: batch[k] for k in step_lib.BATCH_KEYS}
      epoch, skip = epoch + 1, 0


# Datasets train.py may prepare by itself (no downloads): data.name -> prepare's --dataset.
SELF_PREPARING = {"deris_synthetic": "synthetic"}


def ensure_prepared(data_config: mlc.ConfigDict, log=print) -> None:
  """Prepares the configured dataset if it needs no download and is not prepared yet."""
  if data_config.name not in SELF_PREPARING:
    return
  from deris_jax.data import prepare, registry  # pylint: disable=g-import-not-at-top
  builder = registry.builder_class(data_config.name)(
      config=data_config.builder_config,
      data_dir=registry.data_dir_or_default(data_config.get("data_dir")))
  if builder.is_prepared():
    return
  log(f"preparing {data_config.name}/{data_config.builder_config} in "
      f"{registry.data_dir_or_default(data_config.get('data_dir'))} (once)")
  t0 = time.perf_counter()
  counts = prepare.prepare(SELF_PREPARING[data_config.name], data_dir=data_config.get("data_dir"),
                           config=data_config.builder_config)
  log(f"prepared {counts} in {time.perf_counter() - t0:.1f}s")
