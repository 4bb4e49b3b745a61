"""Expression cleaning and XLM-R ids (deris_jax.data.text, deris_jax.data.tokenizer)."""
import os
import shutil

import numpy as np
import pytest

from deris_jax.data import text as T
from tests import tiny_files
from deris_jax.data import tokenizer as tok


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  corpus = tiny_files.all_expressions() + ["the red circle on the left", "all blue squares"]
  path = tmp_path_factory.mktemp("spm") / "tiny.spm"
  path.write_bytes(tok.train_sentencepiece(corpus * 5, vocab_size=120))
  return str(path)


def test_clean_expression_as_official():
  assert T.clean_expression("The man's (red) shirt: LEFT-most/ok?!") == "the mans red shirt left most ok"
  assert T.clean_expression('a "b" #c *d; e.') == "a b c d e"
  assert T.is_empty_expression(" .?! ")
  assert not T.is_empty_expression("a.")


def test_special_ids_truncation_and_padding(spm_path):
  tokenizer = tok.XlmrTokenizer(spm_path)
  out = tokenizer.encode(["left guy", "the small rectangle near the top left corner " * 3], 8)
  ids, padding, pieces = out["ids"], out["padding_mask"], out["num_pieces"]
  assert ids.shape == (2, 8) and ids.dtype == np.int32 and padding.dtype == np.int32
  first_len = 2 + pieces[0]
  assert ids[0, 0] == tok.BOS_ID and ids[0, first_len - 1] == tok.EOS_ID
  assert (ids[0, first_len:] == tok.PAD_ID).all()
  np.testing.assert_array_equal(padding[0], [0] * first_len + [1] * (8 - first_len))
  # The long one is truncated to max_tokens - 2 pieces: bos, 6 pieces, eos, no padding.
  assert pieces[1] > 6 and ids[1, 0] == tok.BOS_ID and ids[1, 7] == tok.EOS_ID
  assert padding[1].sum() == 0
  assert (ids[:, 1:] >= 0).all() and not np.isin(ids[0, 1:first_len - 1], [0, 1, 2]).any()


def test_ids_equal_transformers_xlmroberta(spm_path, tmp_path):
  """Same ids as transformers' XLMRobertaTokenizer on the same sentencepiece model."""
  from transformers import XLMRobertaTokenizer  # pylint: disable=g-import-not-at-top
  shutil.copy(spm_path, tmp_path / "sentencepiece.bpe.model")
  reference = XLMRobertaTokenizer.from_pretrained(str(tmp_path))
  assert (reference.bos_token_id, reference.pad_token_id, reference.eos_token_id,
          reference.unk_token_id) == (tok.BOS_ID, tok.PAD_ID, tok.EOS_ID, tok.UNK_ID)
  texts = tiny_files.all_expressions() + ["zebra xylophone qq", "2nd guy from the left"]
  ours = tok.XlmrTokenizer(spm_path).piece_ids(texts)
  for text, ids in zip(texts, ours):
    cleaned = T.clean_expression(text)
    assert ids == reference.convert_tokens_to_ids(reference.tokenize(cleaned)), text
  assert any(tok.UNK_ID in ids for ids in ours)  # unseen characters map to <unk> = 3


def test_training_is_deterministic_and_errors_are_clear(spm_path, tmp_path):
  corpus = tiny_files.all_expressions()
  assert tok.train_sentencepiece(corpus, 60) == tok.train_sentencepiece(corpus, 60)
  with pytest.raises(FileNotFoundError, match="beit3.spm"):
    tok.XlmrTokenizer(str(tmp_path / "missing.spm"))
  bad = tmp_path / "bad.spm"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    tok.XlmrTokenizer(str(bad))
  with pytest.raises(ValueError, match="no token"):
    tok.XlmrTokenizer(spm_path).encode(["?!"], 10)
  assert os.path.isfile(spm_path)
