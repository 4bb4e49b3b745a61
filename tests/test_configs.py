"""The configs: their values pinned, linked shared values, the check.

Values two sections share (`deris_jax.config_check.SHARED_FIELDS`) are one FieldReference:
an override of either moves both, and `check_config` stops configs where they differ.
"""
import hashlib
import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from deris_jax import config_check
from deris_jax.config_loader import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# sha256 (first 16 hex digits) of json.dumps(get_config().to_dict(), sort_keys=True), taken
# before the configs linked their shared values. A deliberate change of a recipe updates the
# digest here.
DIGESTS = {
    "deris_b_refcoco": "a9120c94aa51bd93",
    "deris_b_grefcoco": "891f8ddd3ec32c9c",
    "deris_l_refcoco": "f2e2f12151a55401",
    "deris_l_grefcoco": "c8365e3420a0842c",
    "deris_tiny": "8391dc96031850ad",
    "deris_micro": "0b16894c86a511e4",
    "synthetic": "26dec0decd27ef81",
}
ALL_CONFIGS = sorted(DIGESTS)


def _digest(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_configs_keep_their_values(name):
  assert _digest(load_config(f"configs/{name}.py")) == DIGESTS[name]


def _another(value):
  """A different value of the same type: sizes and counts doubled, one more split."""
  if isinstance(value, tuple):
    return value + ("other",) if isinstance(value[0], str) else tuple(2 * v for v in value)
  return 2 * value


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_one_override_moves_both_sections(name):
  config = load_config(f"configs/{name}.py")
  linked = 0
  for owner, other, _ in config_check.SHARED_FIELDS:
    if not (config_check.lookup(config, owner)[0] and config_check.lookup(config, other)[0]):
      continue
    linked += 1
    new = _another(config_check.lookup(config, owner)[1])
    for target, follower in ((owner, other), (other, owner)):
      moved = load_config(f"configs/{name}.py", [f"{target}={new!r}"])
      assert config_check.lookup(moved, follower)[1] == new, (target, follower)
  assert linked == {"deris_tiny": 0}.get(name, len(config_check.SHARED_FIELDS))


def test_config_flags_overrides_move_both_sections():
  """train.py parses with absl config_flags: its --config.a.b overrides go through the links."""
  argv = ["train.py", f"--config={ROOT / 'configs' / 'deris_micro.py'}",
          "--config.data.image_size=(64,64)", "--config.model.max_tokens=16"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  config = values.config
  assert (config.model.image_size, config.data.max_tokens) == ((64, 64), 16)
  config_check.check_config(config)


def _plain(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())  # the values, no FieldReference


@pytest.mark.parametrize("field, value, message", [
    ("data.image_size", (64, 64),
     r"config data.image_size \(64, 64\) differs from model.image_size \(32, 32\): the model "
     r"would see another input size"),
    ("model.max_tokens", 16,
     r"config data.max_tokens 12 differs from model.max_tokens 16: the model would see another "
     r"text length"),
    ("loss.official_world_size", 4,
     r"config loss.official_world_size 4 differs from data.official_world_size 1: the "
     r"sampler's per-GPU batches and the loss's per-GPU groups would differ"),
    ("eval.batch_size", 4, r"config eval.batch_size 4 differs from data.eval_batch_size 8"),
    ("eval.splits", ("val", "test"),
     r"config eval.splits \('val', 'test'\) differs from data.eval_splits \('val',\)"),
])
def test_check_names_both_fields(field, value, message):
  config = _plain(load_config("configs/deris_micro.py"))
  config_check.check_config(config)
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_check.check_config(config)
  with pytest.raises(ValueError, match=message):  # sections that disagree are never linked
    common.link_shared(config)


def test_load_config_checks_the_loaded_config(tmp_path):
  path = tmp_path / "unlinked.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict(dict(model=dict(max_tokens=12), "
                  "data=dict(max_tokens=12)))\n")
  assert load_config(str(path)).data.max_tokens == 12
  with pytest.raises(ValueError, match="config data.max_tokens 16 differs from model.max_tokens "
                     "12"):
    load_config(str(path), ["data.max_tokens=16"])


def test_train_py_checks_the_parsed_config(tmp_path):
  path = tmp_path / "unlinked.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict(dict(model=dict(max_tokens=12), "
                  "data=dict(max_tokens=12)))\n")
  proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path),
                         "--config.data.max_tokens=16", "--workdir", str(tmp_path / "w")],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: config data.max_tokens 16 differs from model.max_tokens 12: the model would see "
      "another text length"]
  assert not (tmp_path / "w").exists()


