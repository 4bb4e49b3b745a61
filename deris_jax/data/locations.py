"""Where prepared datasets live, read without TensorFlow.

`data_dir` is the one default (config data.data_dir, else $TFDS_DATA_DIR, else
~/tensorflow_datasets) of the builders and of the predictor. `prepared_metadata` reads the
metadata a builder stored with a prepared dataset (its newest version) straight from the
`metadata.json` file, so the predictor can take the synthetic set's tokenizer from it without
importing TFDS.
"""
import json
import os
import pathlib
from typing import Any, Dict, Optional


def data_dir(configured: Optional[str]) -> str:
  """The TFDS data directory: `configured`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.path.expanduser(configured or os.environ.get("TFDS_DATA_DIR",
                                                         "~/tensorflow_datasets"))


def _version_key(path: pathlib.Path):
  return tuple(int(part) for part in path.parent.name.split(".") if part.isdigit())


def prepared_metadata(data_config) -> Dict[str, Any]:
  """The stored metadata of the newest prepared version of data.name/data.builder_config.

  Raises FileNotFoundError saying how to prepare the dataset when none is prepared.
  """
  root = pathlib.Path(data_dir(data_config.get("data_dir")))
  folder = root / data_config.name / data_config.builder_config
  versions = sorted(folder.glob("*/metadata.json"), key=_version_key)
  if not versions:
    raise FileNotFoundError(
        f"no prepared dataset {data_config.name}/{data_config.builder_config} under {root} "
        f"(config data.data_dir): run python -m deris_jax.data.prepare --dataset "
        f"{data_config.name} --format {data_config.builder_config} --data_dir {root}")
  with open(versions[-1]) as f:
    return json.load(f)
