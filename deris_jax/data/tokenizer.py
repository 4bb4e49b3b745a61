"""XLM-R sentencepiece tokenization of expressions, as the official loader (docs/design.md §8).

The official code builds `transformers.XLMRobertaTokenizer("pretrain_weights/beit3.spm")`
(transformers 4.x, the sentencepiece-backed "slow" class) and per expression does
`tokenize(clean_string(text))` -> `convert_tokens_to_ids` -> truncate to max_tokens-2 ->
`[bos] + ids + [eos]` -> pad. That class maps a sentencepiece id p to p + 1 (fairseq offset)
and sentencepiece's <unk> (id 0) to 3, with bos 0, pad 1, eos 2.

`XlmrTokenizer` does exactly that with the `sentencepiece` library directly. Why not
transformers here: transformers 5 made `XLMRobertaTokenizer` a `tokenizers`-backed class whose
constructor silently ignores `vocab_file=` (every word becomes <unk>), and its converter only
accepts files named `*.model`; `tests/test_data_tokenizer.py` checks that the ids here equal
those of transformers' `XLMRobertaTokenizer.from_pretrained` on the same model.
"""
import io
import os
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import sentencepiece as spm

from deris_jax.data import locations
from deris_jax.data import text as T

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # XLM-R / fairseq special ids
_FAIRSEQ_OFFSET = 1


class XlmrTokenizer:
  """Cleans and tokenizes expressions into fixed-length id rows with a padding mask."""

  def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
    if (model_path is None) == (model_proto is None):
      raise ValueError("give exactly one of model_path (a .spm file) or model_proto (its bytes)")
    if model_path is not None:
      if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"tokenizer file not found: {model_path} (config data.tokenizer_path): the BEiT-3 "
            "sentencepiece model `beit3.spm` from the BEiT-3 release (microsoft/unilm, beit3)")
      with open(model_path, "rb") as f:
        model_proto = f.read()
    self.processor = spm.SentencePieceProcessor()
    try:
      self.processor.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise ValueError(f"not a sentencepiece model: {model_path or '<bytes>'}: {e}") from e
    self.source = model_path or "<embedded model>"

  @property
  def vocab_size(self) -> int:
    """Size of the id space (pieces + offset + <mask>), as XLMRobertaTokenizer's `len()`."""
    return self.processor.get_piece_size() + _FAIRSEQ_OFFSET + 1

  def piece_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Cleaned texts -> XLM-R ids without specials or truncation."""
    cleaned = [T.clean_expression(t) for t in texts]
    pieces = self.processor.EncodeAsIds(cleaned)
    return [[p + _FAIRSEQ_OFFSET if p != 0 else UNK_ID for p in ids] for ids in pieces]

  def encode(self, texts: Sequence[str], max_tokens: int) -> dict[str, np.ndarray]:
    """Texts -> {'ids' (N, L) int32, 'padding_mask' (N, L) int32 (1 = pad), 'num_pieces' (N,)}.

    Row: [bos] + ids[:max_tokens-2] + [eos] + pad. `num_pieces` is before truncation, so
    `num_pieces > max_tokens - 2` counts the truncated expressions.
    """
    if max_tokens < 3:
      raise ValueError(f"max_tokens must be >= 3 (bos, one token, eos), got {max_tokens}")
    pieces = self.piece_ids(texts)
    ids = np.full((len(texts), max_tokens), PAD_ID, np.int32)  # (N, L)
    padding = np.ones((len(texts), max_tokens), np.int32)  # (N, L)
    num_pieces = np.zeros((len(texts),), np.int32)
    for i, row in enumerate(pieces):
      if not row:
        raise ValueError(f"expression {texts[i]!r} gives no token after cleaning (the official "
                         "loader raises 'The text segment should contains at least one tokens!')")
      num_pieces[i] = len(row)
      row = [BOS_ID] + row[:max_tokens - 2] + [EOS_ID]
      ids[i, :len(row)] = row
      padding[i, :len(row)] = 0
    return {"ids": ids, "padding_mask": padding, "num_pieces": num_pieces}


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        model_type: str = "unigram") -> bytes:
  """Trains a small sentencepiece model on cleaned texts; deterministic; returns its bytes.

  The special ids are sentencepiece's defaults (unk 0, bos 1, eos 2, no pad), the layout of
  the XLM-R and BEiT-3 models, so `XlmrTokenizer` maps it like the real `beit3.spm`.
  `vocab_size` is an upper bound (the trainer shrinks it for small corpora). `model_type`
  "word" gives one piece per word, right for a closed grammar (the synthetic set: a unigram
  model on its ~20 words splits them into ~10 pieces per expression).
  """
  cleaned = sorted(c for c in (T.clean_expression(t).strip() for t in texts) if c)
  if not cleaned:
    raise ValueError("no text to train a tokenizer on")
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(cleaned), model_writer=model, vocab_size=vocab_size,
      hard_vocab_limit=False, model_type=model_type, character_coverage=1.0, num_threads=1,
      minloglevel=2)
  return model.getvalue()


def for_data(data_config, metadata: Optional[Mapping] = None) -> XlmrTokenizer:
  """The tokenizer of a data config: the file data.tokenizer_path, else the sentencepiece model
  a prepared dataset stores in its metadata (the synthetic set). `metadata` is that dataset's
  (read from its metadata.json when not given; FileNotFoundError if it is not prepared)."""
  path = data_config.get("tokenizer_path")
  if path:
    return XlmrTokenizer(path)
  if metadata is None:
    metadata = locations.prepared_metadata(data_config)
  if "tokenizer_spm" not in metadata:
    raise ValueError(f"dataset {data_config.name} stores no tokenizer: set data.tokenizer_path "
                     "to the BEiT-3 sentencepiece model (beit3.spm)")
  return XlmrTokenizer(model_proto=bytes.fromhex(metadata["tokenizer_spm"]))
