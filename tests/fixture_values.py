"""Values the suite takes from the fixture it judges, never from the one it was written against.

`DERIS_FIXTURES` (default ../shared/fixtures) may point at any fixture of the official format
(other sizes, other seeds): the model config comes from its config.json, the number of
queries from that config, and the score threshold the prediction and evaluation tests use
from its own final referring scores (their median, so that some queries pass and some do not).
"""
import json
import os
import pathlib

import ml_collections
import numpy as np

from deris_jax.parity import check

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("DERIS_FIXTURES", ROOT.parent / "shared" / "fixtures"))
TINY = FIXTURES / "deris_tiny"


def model_config() -> ml_collections.ConfigDict:
  """The model section of the fixture's config.json (a fresh copy per call)."""
  return check.model_config_from_fixture(json.loads((TINY / "config.json").read_text()))


def tau() -> float:
  """The median of the fixture's final referring scores, to 2 decimals."""
  with np.load(TINY / "outputs.npz") as outputs:
    return round(float(np.median(outputs["final.refer_scores"])), 2)


CONFIG_FILE = """
import ml_collections
from tests import fixture_values


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict({"model": fixture_values.model_config()})
"""


def write_config_file(path: pathlib.Path) -> str:
  """A config file (for convert.py and the other commands) holding the fixture's model."""
  path = pathlib.Path(path)
  path.write_text(CONFIG_FILE)
  return str(path)


def assert_taps_match(taps, outputs, keys, is_nchw) -> None:
  """Every fixture tensor `keys` equals our tap (atol = rtol = 1e-4); `is_nchw(key)` says which
  of ours are NHWC maps to compare in the fixture's NCHW layout. Prints the errors."""
  errors = {}
  for key in keys:
    got = np.asarray(taps[key])
    if is_nchw(key):
      got = np.transpose(got, (0, 3, 1, 2))  # NHWC -> NCHW
    want = outputs[key]
    assert got.shape == want.shape, key
    errors[key] = float(np.abs(got - want).max())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=key)
  print("max abs error:", errors)


NUM_QUERIES = int(model_config().num_queries) if TINY.is_dir() else 0
TAU = tau() if TINY.is_dir() else 0.5
