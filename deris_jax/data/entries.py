"""The common in-memory form every annotation reader produces, and the validation errors.

A reader (DeRIS JSON, REFER pickles/JSON, the synthetic generator) turns its files into one
`SplitData` per split: images, the annotated instances (COCO segmentations) and referring
`Entry`s (an image, its expression(s), the ids of the referred instances). The TFDS builders
only ever see this form, so every format yields the same examples.

Bad input raises `DataError` naming the file and the record. Problems a user may prefer to
skip (one unreadable image among 20k) go through a `SkipReport`: with `skip_invalid` the record
is dropped and counted, and the counts and reasons are printed at the end of preparation.
"""
import collections
import dataclasses
import os
from typing import Any


class DataError(ValueError):
  """Invalid input data; the message names the file, the record and what was expected."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One referring entry: an image, its expression(s) and the referred instance ids.

  Training entries may hold several expressions (the DeRIS RefCOCO files keep all sentences of
  a ref; the pipeline draws one per visit, as the official loader does). Evaluation entries hold
  exactly one (a record with several sentences becomes consecutive entries with the same
  `file_index`). `target_ids` is empty for a no-target expression (gRefCOCO).
  """
  image_id: int
  expressions: tuple[str, ...]
  target_ids: tuple[int, ...]
  source: str  # which dataset the entry comes from (see `SOURCES`)
  where: str = dataclasses.field(default="", compare=False)  # "file: record" for messages
  # Position of the record in its annotation file (the official dataset index); the split
  # keeps the readers' order, which is the files' order (evaluation runs in it).
  file_index: int = dataclasses.field(default=-1, compare=False)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  image_id: int
  path: str  # the image file (JPEG or PNG), or a name when `data` holds the bytes
  height: int
  width: int
  where: str = dataclasses.field(default="", compare=False)
  data: bytes | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class SplitData:
  """Everything a builder needs for one split."""
  entries: list[Entry]
  images: dict[int, ImageInfo]  # image_id -> info
  segmentations: dict[int, Any]  # annotation id -> COCO segmentation (polygons or RLE)


# Source datasets an entry can come from. The DeRIS mixed training split does not record
# which of RefCOCO/+/g an entry belongs to, so both formats label it "refcoco_mixed".
SOURCES = ("refcoco_mixed", "refcoco_unc", "refcocoplus_unc", "refcocog_umd", "grefcoco",
           "synthetic")


def require_file(path: str, what: str) -> str:
  """Returns `path` or raises DataError saying which file is missing and what it is."""
  if not os.path.isfile(path):
    parent = os.path.dirname(path)
    hint = "" if os.path.isdir(parent) else f" (its folder {parent} does not exist either)"
    raise DataError(f"missing file {path}: {what}{hint}")
  return path


def require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise DataError(f"missing folder {path}: {what}")
  return path


class SkipReport:
  """Raises on a bad record, or (with `skip_invalid`) counts it by reason and goes on."""

  def __init__(self, skip_invalid: bool):
    self.skip_invalid = skip_invalid
    self.counts = collections.Counter()
    self.examples = {}  # reason -> first message

  def bad(self, reason: str, message: str) -> None:
    """Reports one bad record; returns only when skipping is allowed."""
    if not self.skip_invalid:
      raise DataError(f"{message} (pass skip_invalid / --skip_invalid to drop such records)")
    self.counts[reason] += 1
    self.examples.setdefault(reason, message)

  def summary(self) -> str:
    if not self.counts:
      return "no records skipped"
    lines = [f"skipped {sum(self.counts.values())} record(s):"]
    for reason, count in sorted(self.counts.items()):
      lines.append(f"  {count} x {reason} (first: {self.examples[reason]})")
    return "\n".join(lines)


def as_int(value: Any, what: str, where: str) -> int:
  """An integer field (ints stored as floats like 12.0 are accepted)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      isinstance(value, float) and not value.is_integer()):
    raise DataError(f"{where}: field '{what}' must be an integer, got {value!r}")
  return int(value)


def field(record: Any, key: str, where: str) -> Any:
  if not isinstance(record, dict) or key not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: missing field '{key}' (record has {keys})")
  return record[key]
