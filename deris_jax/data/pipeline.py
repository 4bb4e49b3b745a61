"""The tf.data input pipeline: a prepared TFDS split -> fixed-shape batches (the batch contract).

Per batch (B = per-host batch, K = data.max_instances, L = data.max_tokens):
  image (B, H, W, 3) float32      normalised, perception input (data.image_size)
  image_mini (B, h, w, 3) float32 normalised, BEiT-3 input (data.cognition_image_size)
  text_ids (B, L) int32           [bos] + ids + [eos] + pad
  text_padding_mask (B, L) int32  1 = padding
  gt_masks (B, K, H, W) uint8     referred instances, nearest-resized; gt_valid (B, K) bool
  exists (B,) int32               1 if at least one referred instance
  weight (B,) float32             0 for the padding that completes the last eval batch
  example_id (B,) int64           stable id, see `SplitIndex.describe`; -1 for padding
Evaluation adds orig_hw (B, 2) int32 and gt_mask_orig (B, Hc, Wc) uint8, the union of the
referred masks at the original resolution, top-left on the data.canvas_size canvas.

Order (`deris_jax.data.order`): one pipeline is one pass. Training is one epoch of the official
sampler (a fresh permutation per epoch from (seed, epoch), batches full, every entry once
besides the padding repeats); evaluation is the annotation file's order, the last batch padded
with weight-0 rows. Each entry is read on its own (random access to its image's record, one
decode per entry, as the official loader does), so any order costs the same.

Hosts: every host reads the rows of each global batch that its devices hold (`local_rows`,
default: an equal contiguous block per process), so the global batches, their order and every
random draw are the same for any number of hosts. An entry's random draws (which expression,
NSC) come from keys folded from (seed, epoch, its position in the epoch): a resumed or
re-sharded run draws the same.
"""
import dataclasses
import functools
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from deris_jax.data.tf_modules import tf, tfds

from deris_jax.data import nsc as nsc_lib
from deris_jax.data import order as order_lib
from deris_jax.data import pipeline_ops as ops
from deris_jax.data import referring_builder
from deris_jax.data import registry
from deris_jax.data import tokenizer as tok

AUTOTUNE = tf.data.AUTOTUNE
# The map functions branch on Python values only (tf.cond/tf.where otherwise): no AutoGraph.
_plain = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class ExampleInfo:
  example_id: int
  split: str
  row: int
  image_id: int
  expressions: tuple[str, ...]  # one for evaluation splits
  source: str
  num_targets: int
  file_index: int  # position of the record in its annotation file


class SplitIndex:
  """Host-side index of a prepared split (from the builder's metadata), rows in file order."""

  def __init__(self, metadata: dict[str, Any], split: str):
    if split not in metadata["splits"]:
      raise ValueError(f"split '{split}' not in the dataset; splits: {metadata['split_names']}")
    self.split = split
    self.split_code = metadata["split_names"].index(split)
    index = metadata["splits"][split]
    rows, images = index["rows"], index["images"]
    self.image_index = np.asarray(rows["image_index"], np.int64)  # (rows,) record position
    self.image_of_row = np.asarray(rows["image_id"], np.int64)
    self.expressions = [tuple(e) for e in rows["expressions"]]
    self.sources = list(rows["source"])
    self.num_targets = np.asarray(rows["num_targets"], np.int64)
    self.file_index = np.asarray(rows["file_index"], np.int64)
    self.image_ids = np.asarray(images["image_id"], np.int64)
    self.heights = np.asarray(images["height"], np.int64)
    self.widths = np.asarray(images["width"], np.int64)
    self.max_targets = int(index["max_targets"])
    # Text rows: every (row, expression) pair, in row order.
    counts = np.asarray([len(e) for e in self.expressions], np.int64)
    self.text_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    self.text_count = counts.astype(np.int32)
    self.texts = [t for e in self.expressions for t in e]
    self.image_of_text = np.repeat(self.image_index, counts)  # image position of each text

  @property
  def num_rows(self) -> int:
    return len(self.expressions)

  def aspect_flags(self) -> np.ndarray:
    """(rows,) the official sampler's group of every row (1 = landscape)."""
    return order_lib.aspect_flags(self.heights[self.image_index], self.widths[self.image_index])

  def example_id(self, row: int) -> int:
    return self.split_code * referring_builder.SPLIT_STRIDE + row

  def describe(self, example_id: int) -> ExampleInfo:
    """example_id -> its split, image and expression(s), for per-sample output."""
    code, row = divmod(int(example_id), referring_builder.SPLIT_STRIDE)
    if code != self.split_code or not 0 <= row < self.num_rows:
      raise KeyError(f"example_id {example_id} is not in split '{self.split}'")
    return ExampleInfo(example_id=int(example_id), split=self.split, row=row,
                       image_id=int(self.image_of_row[row]), expressions=self.expressions[row],
                       source=self.sources[row], num_targets=int(self.num_targets[row]),
                       file_index=int(self.file_index[row]))


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def open_split(data_config: ml_collections.ConfigDict, split: str):
  """(builder, SplitIndex) of a prepared dataset."""
  builder = registry.open_builder(data_config.name, data_config.builder_config,
                                  data_config.get("data_dir"))
  return builder, SplitIndex(builder.info.metadata, split)


def _check_config(data_config, index: SplitIndex, train: bool) -> None:
  if index.max_targets > data_config.max_instances:
    raise ValueError(
        f"split '{index.split}' has expressions with {index.max_targets} referred instances but "
        f"data.max_instances is {data_config.max_instances}: raise data.max_instances")
  if not train:
    canvas = tuple(data_config.canvas_size)
    too_big = (index.heights > canvas[0]) | (index.widths > canvas[1])
    if too_big.any():
      k = int(np.argmax(too_big))
      raise ValueError(
          f"image {index.image_ids[k]} of split '{index.split}' is {index.heights[k]}x"
          f"{index.widths[k]} (HxW), larger than data.canvas_size {canvas}: raise "
          "data.canvas_size (the original-resolution ground truth is placed on that canvas)")


class _Tables:
  """Per-split constant tensors: tokens of every text row, entry -> text rows."""

  def __init__(self, index: SplitIndex, tokenizer: tok.XlmrTokenizer, max_tokens: int):
    encoded = tokenizer.encode(index.texts, max_tokens)
    self.num_truncated = int((encoded["num_pieces"] > max_tokens - 2).sum())
    self.ids = tf.constant(encoded["ids"])  # (N_text, L)
    self.padding = tf.constant(encoded["padding_mask"])  # (N_text, L)
    self.text_start = tf.constant(index.text_start)  # (N_rows,)
    self.text_count = tf.constant(index.text_count)  # (N_rows,)
    self.image_index = tf.constant(index.image_index)  # (N_rows,) record of each row's image


# Records are fetched in chunks: one Python call (it holds the GIL) per chunk of rows instead
# of one per row keeps the parallel decoding threads from queueing on the interpreter.
READ_CHUNK = 32


class _Records:
  """Random access to a split's image records (ArrayRecord) from inside tf.data."""

  def __init__(self, builder, split: str):
    self._source = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self._features = builder.info.features

  def _read_many(self, image_indices: np.ndarray) -> np.ndarray:
    return np.asarray(self._source.__getitems__([int(i) for i in image_indices]), object)

  def read_many(self, image_indices: tf.Tensor) -> tf.Tensor:
    """(n,) image positions -> (n,) serialized records."""
    serialized = tf.numpy_function(self._read_many, [image_indices], tf.string, stateful=False)
    return tf.ensure_shape(serialized, image_indices.shape)

  def parse(self, serialized: tf.Tensor) -> dict:
    """One serialized record -> its features (image bytes left undecoded)."""
    return self._features.deserialize_example(
        serialized, decoders={"image": tfds.decode.SkipDecoding()})


def _key(seed_base, position, stream):
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(seed_base, position), stream)


def _read_chunk(rows, positions, *, tables, records):
  """A chunk of (rows, positions) -> the same plus each row's serialized image record."""
  image_index = tf.gather(tables.image_index, tf.maximum(rows, 0))
  return rows, positions, records.read_many(image_index)


def _make_example(row, position, serialized, *, data_config, tables, index, records, bank,
                  nsc_config, train, seed_base):
  """(row of the split or -1, position in the epoch, its image record) -> one example."""
  is_real = row >= 0
  row = tf.cast(tf.maximum(row, 0), tf.int32)
  record = records.parse(serialized)
  image = ops.decode_image(record["image"])  # (h, w, 3)
  # The entry of `row` among the image's entries -> its target objects' run lengths.
  entries = record["entries"]
  entry = tf.argmax(tf.cast(tf.equal(entries["row"], tf.cast(row, tf.int64)), tf.int32),
                    output_type=tf.int32)
  target_rle = tf.gather(record["objects"]["rle"], entries["targets"][entry])  # (k, None)
  count = tf.gather(tables.text_count, row)
  if train:
    draw = tf.random.stateless_uniform([], seed=_key(seed_base, position, 0), dtype=tf.float64)
    choice = tf.minimum(tf.cast(tf.floor(draw * tf.cast(count, tf.float64)), tf.int32), count - 1)
  else:
    choice = tf.constant(0, tf.int32)
  text_row = tf.gather(tables.text_start, row) + choice
  num_targets = tf.cast(target_rle.nrows(), tf.int32)
  if bank is not None:
    replacement = bank.convert(_key(seed_base, position, 1), text_row, num_targets > 0,
                               nsc_config)
    converted = replacement >= 0
    text_row = tf.where(converted, replacement, text_row)
    num_targets = tf.where(converted, 0, num_targets)
  height, width = record["height"], record["width"]
  masks = ops.decode_rle_masks(target_rle, height, width)  # (k, h, w)
  size = tuple(data_config.image_size)
  resized = ops.resize_masks_nearest(masks, size)  # (k, H, W)
  valid = tf.range(data_config.max_instances) < num_targets  # (K,)
  gt_masks = ops.pad_first_axis(resized, data_config.max_instances)  # (K, H, W)
  gt_masks = gt_masks * tf.cast(valid, tf.uint8)[:, None, None]
  example = {
      "image": ops.resize_bilinear_uint8(image, data_config.image_size),
      "image_mini": ops.resize_bilinear_uint8(image, data_config.cognition_image_size),
      "text_ids": tf.gather(tables.ids, text_row),
      "text_padding_mask": tf.gather(tables.padding, text_row),
      "gt_masks": tf.ensure_shape(gt_masks, (data_config.max_instances,) + size),
      "gt_valid": valid,
      "exists": tf.cast(num_targets > 0, tf.int32),
      "weight": tf.constant(1.0, tf.float32),
      "example_id": tf.cast(row, tf.int64) + index.split_code * referring_builder.SPLIT_STRIDE,
  }
  if not train:
    no_mask = tf.zeros(tf.stack([1, height, width]), tf.uint8)
    union = tf.reduce_max(tf.concat([masks, no_mask], 0), axis=0)  # (h, w); 0 if no target
    example["orig_hw"] = tf.stack([height, width])
    example["gt_mask_orig"] = tf.ensure_shape(
        ops.place_on_canvas(union, data_config.canvas_size), tuple(data_config.canvas_size))
  # A padding row (-1): zeros, weight 0, example_id -1.
  example = {k: tf.where(is_real, v, tf.zeros_like(v)) for k, v in example.items()}
  example["example_id"] = tf.where(is_real, example["example_id"], tf.constant(-1, tf.int64))
  return example


def _normalize_batch(batch, data_config):
  batch = dict(batch)
  batch["image"] = ops.normalize(batch["image"], data_config.mean, data_config.std)
  batch["image_mini"] = ops.normalize(batch["image_mini"], data_config.mean, data_config.std)
  return batch


@dataclasses.dataclass
class Pipeline:
  """What `make_pipeline` returns: the dataset and the facts a train/eval loop needs."""
  dataset: tf.data.Dataset
  index: SplitIndex
  per_host_batch: int
  num_batches: int  # batches of this pass (the same on every host)
  num_examples: int  # real (weight 1) examples this host reads
  num_truncated: int  # expressions of the split longer than max_tokens - 2 pieces
  rows: np.ndarray  # (num_batches, per_host_batch) the rows this host reads, -1 = padding


def split_order(index: SplitIndex, data_config: ml_collections.ConfigDict, *, train: bool,
                batch_size: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
  """The global batches of one pass over `index`: (num_batches, batch_size) rows."""
  if train:
    return order_lib.train_order(index.aspect_flags(), global_batch=batch_size, seed=seed,
                                 epoch=epoch,
                                 world_size=int(data_config.get("official_world_size", 1)))
  return order_lib.eval_order(index.num_rows, batch_size)


def make_pipeline(data_config: ml_collections.ConfigDict, split: str, *, train: bool,
                  batch_size: int, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  local_rows: np.ndarray | None = None) -> Pipeline:
  """One pass over `split` (one training epoch, or the whole evaluation split).

  Args:
    data_config: the `data` config section.
    split: a split of the prepared dataset.
    train: training (sampler order, random expression choice, NSC) or evaluation (file order).
    batch_size: the GLOBAL batch.
    seed, epoch: the training order and every random draw are functions of these.
    start_batch: skip the pass's first batches (an exact resume; costs nothing).
    process_index, process_count: this host (default: jax's); they pick `local_rows`.
    local_rows: the rows of each global batch this host reads (e.g. the rows of its devices,
      `sharding.process_rows`); default an equal contiguous block per process.
  """
  if local_rows is None:
    process_index, process_count = _process(process_index, process_count)
    local_rows = order_lib.host_rows(batch_size, process_index, process_count)
  local_rows = np.asarray(local_rows, np.int64)
  if local_rows.size == 0 or local_rows.min() < 0 or local_rows.max() >= batch_size:
    raise ValueError(f"local_rows {local_rows.tolist()} must be rows of the global batch "
                     f"{batch_size}")
  builder, index = open_split(data_config, split)
  _check_config(data_config, index, train)
  tokenizer = tok.for_data(data_config, builder.info.metadata)
  tables = _Tables(index, tokenizer, data_config.max_tokens)
  global_rows = split_order(index, data_config, train=train, batch_size=batch_size, seed=seed,
                            epoch=epoch)  # (S, G)
  if not 0 <= start_batch <= len(global_rows):
    raise ValueError(f"start_batch {start_batch} not in [0, {len(global_rows)}]")
  positions = np.arange(global_rows.size, dtype=np.int64).reshape(global_rows.shape)
  rows = global_rows[start_batch:, local_rows]  # (S', B)
  positions = positions[start_batch:, local_rows]  # (S', B) position in the epoch
  bank, nsc_config = None, None
  nsc_cfg = data_config.nsc
  if train and nsc_cfg.enabled:
    bank = nsc_lib.ExpressionBank(index.texts, index.image_of_text)
    nsc_config = nsc_lib.NscConfig(rate=nsc_cfg.rate, threshold=nsc_cfg.threshold,
                                   max_tries=nsc_cfg.max_tries, min_words=nsc_cfg.min_words)
  parallel = data_config.get("num_parallel_calls", -1)
  parallel = AUTOTUNE if parallel in (None, -1) else parallel
  records = _Records(builder, split)
  read = _plain(functools.partial(_read_chunk, tables=tables, records=records))
  make = _plain(functools.partial(
      _make_example, data_config=data_config, tables=tables, index=index, records=records,
      bank=bank, nsc_config=nsc_config, train=train,
      seed_base=tf.constant([seed, epoch], tf.int64)))
  examples = tf.data.Dataset.from_tensor_slices((rows.reshape(-1), positions.reshape(-1)))
  options = tf.data.Options()
  options.deterministic = True
  # tf.data's autotuning thread can hold the iterator's deletion (an epoch's or the run's end)
  # for up to its optimisation period, tens of seconds (configs/data_common.py: autotune).
  options.autotune.enabled = bool(data_config.get("autotune", False))
  examples = examples.with_options(options).batch(READ_CHUNK).map(read).unbatch()
  examples = examples.map(make, num_parallel_calls=parallel)
  batches = examples.batch(len(local_rows), drop_remainder=True)
  batches = batches.map(_plain(functools.partial(_normalize_batch, data_config=data_config)),
                        num_parallel_calls=parallel)
  batches = batches.prefetch(data_config.get("prefetch", 2))
  return Pipeline(dataset=batches, index=index, per_host_batch=len(local_rows),
                  num_batches=len(rows), num_examples=int((rows >= 0).sum()),
                  num_truncated=tables.num_truncated, rows=rows)


def as_numpy(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a dataset as dicts of numpy arrays (what a JAX step consumes)."""
  return iter(tfds.as_numpy(dataset))
