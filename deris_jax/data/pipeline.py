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

Hosts: the split's images are cut into `process_count` contiguous ranges, one per host
(disjoint and complete). Training repeats forever, shuffles images then examples with seeds
from (seed, process_index), draws one of an entry's expressions and applies NSC with keys
folded from (seed, process_index, position in the stream): identical output for the same
seed. Evaluation visits every example once in index order, and every host pads its stream
with weight-0 examples to the same number of batches.
"""
import dataclasses
import functools
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from deris_jax.data import nsc as nsc_lib
from deris_jax.data import pipeline_ops as ops
from deris_jax.data import referring_builder
from deris_jax.data import registry
from deris_jax.data import tokenizer as tok

AUTOTUNE = tf.data.AUTOTUNE
# The map functions branch on Python values only (tf.cond/tf.where otherwise): no AutoGraph.
_plain = tf.autograph.experimental.do_not_convert


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


@dataclasses.dataclass(frozen=True)
class ExampleInfo:
  example_id: int
  split: str
  row: int
  image_id: int
  expressions: tuple[str, ...]  # one for evaluation splits
  source: str
  num_targets: int


class SplitIndex:
  """Host-side index of a prepared split (from the builder's metadata)."""

  def __init__(self, metadata: dict[str, Any], split: str):
    if split not in metadata["splits"]:
      raise ValueError(f"split '{split}' not in the dataset; splits: {metadata['split_names']}")
    self.split = split
    self.split_code = metadata["split_names"].index(split)
    index = metadata["splits"][split]
    rows, images = index["rows"], index["images"]
    self.image_of_row = np.asarray(rows["image_id"], np.int64)
    self.expressions = [tuple(e) for e in rows["expressions"]]
    self.sources = list(rows["source"])
    self.num_targets = np.asarray(rows["num_targets"], np.int64)
    self.image_ids = np.asarray(images["image_id"], np.int64)
    self.heights = np.asarray(images["height"], np.int64)
    self.widths = np.asarray(images["width"], np.int64)
    self.image_num_rows = np.asarray(images["num_rows"], np.int64)
    self.max_targets = int(index["max_targets"])
    # Text rows: every (row, expression) pair, in row order.
    counts = np.asarray([len(e) for e in self.expressions], np.int64)
    self.text_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    self.text_count = counts.astype(np.int32)
    self.texts = [t for e in self.expressions for t in e]
    image_slot = np.repeat(np.arange(len(self.image_ids)), self.image_num_rows)
    self.image_of_text = np.repeat(image_slot, counts)

  @property
  def num_rows(self) -> int:
    return len(self.expressions)

  def example_id(self, row: int) -> int:
    return self.split_code * referring_builder.SPLIT_STRIDE + row

  def describe(self, example_id: int) -> ExampleInfo:
    """example_id -> its split, image and expression(s), for per-sample output."""
    code, row = divmod(int(example_id), referring_builder.SPLIT_STRIDE)
    if code != self.split_code or not 0 <= row < self.num_rows:
      raise KeyError(f"example_id {example_id} is not in split '{self.split}'")
    return ExampleInfo(example_id=int(example_id), split=self.split, row=row,
                       image_id=int(self.image_of_row[row]), expressions=self.expressions[row],
                       source=self.sources[row], num_targets=int(self.num_targets[row]))

  def host_images(self, process_index: int, process_count: int) -> tuple[int, int]:
    """[first, last) image positions read by this host: contiguous, disjoint, complete."""
    total = len(self.image_ids)
    return (process_index * total) // process_count, ((process_index + 1) * total) // process_count

  def host_rows(self, process_index: int, process_count: int) -> int:
    first, last = self.host_images(process_index, process_count)
    return int(self.image_num_rows[first:last].sum())


def open_split(data_config: ml_collections.ConfigDict, split: str):
  """(builder, SplitIndex) of a prepared dataset."""
  builder = registry.open_builder(data_config.name, data_config.builder_config,
                                  data_config.get("data_dir"))
  return builder, SplitIndex(builder.info.metadata, split)


def load_tokenizer(data_config, metadata) -> tok.XlmrTokenizer:
  """The configured tokenizer file, else the one stored with the dataset (synthetic set)."""
  path = data_config.get("tokenizer_path")
  if path:
    return tok.XlmrTokenizer(path)
  if "tokenizer_spm" in metadata:
    return tok.XlmrTokenizer(model_proto=bytes.fromhex(metadata["tokenizer_spm"]))
  raise ValueError(f"dataset {data_config.name} stores no tokenizer: set data.tokenizer_path to "
                   "the BEiT-3 sentencepiece model (beit3.spm)")


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


def _decode_image(example, data_config):
  """Per image: decode once, resize to both input sizes (uint8)."""
  image = ops.decode_image(example["image"])  # (h, w, 3)
  return {
      "image": ops.resize_bilinear_uint8(image, data_config.image_size),
      "image_mini": ops.resize_bilinear_uint8(image, data_config.cognition_image_size),
      "height": example["height"],
      "width": example["width"],
      "objects": example["objects"],
      "entries": example["entries"],
  }


def _entries_of_image(image_example):
  """One element per entry of the image, carrying the resized images and target masks (RLE)."""
  entries = image_example["entries"]
  shared = {k: image_example[k] for k in ("image", "image_mini", "height", "width")}

  def entry(e):
    targets = entries["targets"][e]  # (k,) indices into objects
    return {"row": entries["row"][e], **shared,
            "target_rle": tf.gather(image_example["objects"]["rle"], targets)}  # (k, None)

  return tf.data.Dataset.range(tf.shape(entries["row"], out_type=tf.int64)[0]).map(_plain(entry))


def _key(seed_base, position, stream):
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(seed_base, position), stream)


def _make_example(position, entry, *, data_config, tables, index, bank, nsc_config, train,
                  seed_base):
  """(position in the stream, entry element) -> one example of the batch contract."""
  row = tf.cast(entry["row"], tf.int32)
  count = tf.gather(tables.text_count, row)
  if train:
    draw = tf.random.stateless_uniform([], seed=_key(seed_base, position, 0), dtype=tf.float64)
    choice = tf.minimum(tf.cast(tf.floor(draw * tf.cast(count, tf.float64)), tf.int32), count - 1)
  else:
    choice = tf.constant(0, tf.int32)
  text_row = tf.gather(tables.text_start, row) + choice
  num_targets = tf.cast(entry["target_rle"].nrows(), tf.int32)
  if bank is not None:
    replacement = bank.convert(_key(seed_base, position, 1), text_row, num_targets > 0,
                               nsc_config)
    converted = replacement >= 0
    text_row = tf.where(converted, replacement, text_row)
    num_targets = tf.where(converted, 0, num_targets)
  height, width = entry["height"], entry["width"]
  masks = ops.decode_rle_masks(entry["target_rle"], height, width)  # (k, h, w)
  size = tuple(data_config.image_size)
  resized = ops.resize_masks_nearest(masks, size)  # (k, H, W)
  valid = tf.range(data_config.max_instances) < num_targets  # (K,)
  gt_masks = ops.pad_first_axis(resized, data_config.max_instances)  # (K, H, W)
  gt_masks = gt_masks * tf.cast(valid, tf.uint8)[:, None, None]
  example = {
      "image": entry["image"],
      "image_mini": entry["image_mini"],
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
  return example


def _normalize_batch(batch, data_config):
  batch = dict(batch)
  batch["image"] = ops.normalize(batch["image"], data_config.mean, data_config.std)
  batch["image_mini"] = ops.normalize(batch["image_mini"], data_config.mean, data_config.std)
  return batch


def _padding_examples(element_spec, count: int) -> tf.data.Dataset:
  """`count` weight-0 examples of the same structure (ids -1, everything else zero)."""
  zeros = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in element_spec.items()}
  zeros["example_id"] = tf.constant(-1, tf.int64)
  return tf.data.Dataset.from_tensors(zeros).repeat(count)


@dataclasses.dataclass
class Pipeline:
  """What `make_pipeline` returns: the dataset and the facts a train/eval loop needs."""
  dataset: tf.data.Dataset
  index: SplitIndex
  per_host_batch: int
  num_batches: int | None  # evaluation: batches per host (same on every host); train: None
  num_examples: int  # examples of this host (without padding)
  num_truncated: int  # expressions of the split longer than max_tokens - 2 pieces


def make_pipeline(data_config: ml_collections.ConfigDict, split: str, *, train: bool,
                  batch_size: int, seed: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
  """Builds the pipeline of `split`. `batch_size` is GLOBAL: each host gets batch_size / hosts."""
  process_index, process_count = _process(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by the "
                     f"{process_count} processes")
  per_host = batch_size // process_count
  builder, index = open_split(data_config, split)
  _check_config(data_config, index, train)
  tokenizer = load_tokenizer(data_config, builder.info.metadata)
  tables = _Tables(index, tokenizer, data_config.max_tokens)
  nsc_cfg = data_config.nsc
  bank, nsc_config = None, None
  if train and nsc_cfg.enabled:
    bank = nsc_lib.ExpressionBank(index.texts, index.image_of_text)
    nsc_config = nsc_lib.NscConfig(rate=nsc_cfg.rate, threshold=nsc_cfg.threshold,
                                   max_tries=nsc_cfg.max_tries, min_words=nsc_cfg.min_words)
  first, last = index.host_images(process_index, process_count)
  host_split = f"{split}[{first}:{last}]" if last > first else f"{split}[:1]"
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=1)
  images = builder.as_dataset(split=host_split, shuffle_files=False, read_config=read_config,
                              decoders={"image": tfds.decode.SkipDecoding()})
  if last == first:
    images = images.take(0)
  options = tf.data.Options()
  options.deterministic = True
  images = images.with_options(options)
  parallel = data_config.get("num_parallel_calls", -1)
  parallel = AUTOTUNE if parallel in (None, -1) else parallel
  seed_base = tf.constant([seed, process_index], tf.int64)
  if train:
    images = images.shuffle(data_config.shuffle_buffer_images, seed=seed * 1000 + process_index,
                            reshuffle_each_iteration=True).repeat()
  examples = images.map(_plain(functools.partial(_decode_image, data_config=data_config)),
                        num_parallel_calls=parallel)
  examples = examples.flat_map(_plain(_entries_of_image))
  if train:
    examples = examples.shuffle(data_config.shuffle_buffer_examples,
                                seed=seed * 1000 + process_index + 500,
                                reshuffle_each_iteration=True)
  make = _plain(functools.partial(_make_example, data_config=data_config, tables=tables, index=index,
                                  bank=bank, nsc_config=nsc_config, train=train,
                                  seed_base=seed_base))
  examples = examples.enumerate().map(make, num_parallel_calls=parallel)
  num_examples = index.host_rows(process_index, process_count)
  num_batches = None
  if not train:
    most = max(index.host_rows(p, process_count) for p in range(process_count))
    num_batches = -(-most // per_host)
    examples = examples.concatenate(
        _padding_examples(examples.element_spec, num_batches * per_host - num_examples))
  batches = examples.batch(per_host, drop_remainder=True)
  batches = batches.map(_plain(functools.partial(_normalize_batch, data_config=data_config)),
                        num_parallel_calls=parallel)
  batches = batches.prefetch(data_config.get("prefetch", 2))
  return Pipeline(dataset=batches, index=index, per_host_batch=per_host, num_batches=num_batches,
                  num_examples=num_examples, num_truncated=tables.num_truncated)


def make_dataset(data_config: ml_collections.ConfigDict, split: str, *, train: bool,
                 batch_size: int, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> tf.data.Dataset:
  """The batched tf.data.Dataset of `make_pipeline` (batch_size is global)."""
  return make_pipeline(data_config, split, train=train, batch_size=batch_size, seed=seed,
                       process_index=process_index, process_count=process_count).dataset


def as_numpy(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a dataset as dicts of numpy arrays (what a JAX step consumes)."""
  return iter(tfds.as_numpy(dataset))
