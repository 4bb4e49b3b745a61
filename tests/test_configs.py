"""The configs: one DeRIS family file, its four released aliases, linked shared values, the check.

The released names (configs/deris_{b,l}_{refcoco,grefcoco}.py) are aliases of
configs/deris.py:variant=...,data=...; their values are pinned here as they were before the
family file existed (a digest of the whole section tree and the fields that tell them apart).
Values two sections share (`deris_jax.config_check.SHARED_FIELDS`) are one FieldReference:
an override of either moves both, and `check_config` stops configs where they differ.
"""
import argparse
import ast
import hashlib
import json
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import deris
from configs import deris_b_refcoco
from deris_jax import cli, config_check
from deris_jax.config_loader import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
RELEASED = {  # alias -> family argument
    "deris_b_refcoco": "variant=b,data=refcoco",
    "deris_b_grefcoco": "variant=b,data=grefcoco",
    "deris_l_refcoco": "variant=l,data=refcoco",
    "deris_l_grefcoco": "variant=l,data=grefcoco",
}
# sha256 (first 16 hex digits) of json.dumps(get_config().to_dict(), sort_keys=True), taken
# before the shared values were linked and the family file replaced the four released files.
# A deliberate change of a recipe updates the digest here (and the fields below).
DIGESTS = {
    "deris_b_refcoco": "85ea426f40e11630",
    "deris_b_grefcoco": "91a21adf6153878e",
    "deris_l_refcoco": "94f11883903e3648",
    "deris_l_grefcoco": "131040d3e9fe9a7c",
    "deris_tiny": "8391dc96031850ad",
    "deris_micro": "89c54042b0b69964",
    "synthetic": "25d67555772c1568",
}
ALL_CONFIGS = sorted(DIGESTS)
_REFCOCO_VAL = ("val_refcoco_unc", "val_refcocoplus_unc", "val_refcocog_umd")
# (swin embed, beit3 embed, beit3 drop path, queries, query_SA group), (data name, max tokens,
# max instances, global batch, official GPUs, NSC), (epochs, warmup, decay epochs),
# (task, tau, training tau, best start epoch, training splits)
PINNED = {
    "deris_b_refcoco": ((96, 768, 0.1, 10, 16), ("refcoco_mixed", 20, 1, 64, 4, False),
                        (20, 1, (15, 19)), ("ris", 0.7, 0.9, 10, _REFCOCO_VAL)),
    "deris_b_grefcoco": ((96, 768, 0.1, 20, 1), ("grefcoco", 50, 32, 4, 4, True),
                         (6, 0, (6,)), ("gres", 0.7, 0.7, 5, ("val",))),
    "deris_l_refcoco": ((128, 1024, 0.0, 10, 16), ("refcoco_mixed", 20, 1, 64, 4, False),
                        (20, 1, (15, 19)), ("ris", 0.7, 0.9, 15, _REFCOCO_VAL)),
    "deris_l_grefcoco": ((128, 1024, 0.0, 20, 1), ("grefcoco", 50, 32, 4, 4, True),
                         (6, 0, (6,)), ("gres", 0.9, 0.9, 3, ("val",))),
}


def _digest(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_configs_keep_their_values(name):
  assert _digest(load_config(f"configs/{name}.py")) == DIGESTS[name]


@pytest.mark.parametrize("alias", sorted(RELEASED))
def test_released_name_is_an_alias_of_the_family(alias):
  config = load_config(f"configs/{alias}.py")
  family = load_config(f"configs/deris.py:{RELEASED[alias]}")
  assert config.to_dict() == family.to_dict()
  m, d, ev = config.model, config.data, config.eval
  assert ((m.swin.embed_dim, m.beit3.embed_dim, m.beit3.drop_path_rate, m.num_queries,
           m.compat_group_size), (d.name, d.max_tokens, d.max_instances, d.batch_size,
                                  d.official_world_size, d.nsc.enabled),
          (config.train.epochs, config.schedule.warmup_epochs, config.schedule.decay_epochs),
          (ev.task, ev.score_threshold, ev.train_score_threshold, ev.best_start_epoch,
           ev.train_splits)) == PINNED[alias]
  assert (m.image_size, m.cognition_image_size, m.scan_layers) == ((384, 384), (224, 224), True)
  assert (config.loss.normalizer, config.loss.official_world_size) == ("official", 4)


def test_family_arguments():
  assert load_config("configs/deris.py").to_dict() == deris_b_refcoco.get_config().to_dict()
  with pytest.raises(ValueError, match=r"unknown config argument variant=xl; known: \['b', 'l'\]"):
    deris.get_config("variant=xl")
  with pytest.raises(ValueError, match=r"unknown config argument data=coco; known: "):
    deris.get_config("data=coco")
  with pytest.raises(ValueError, match=r"unknown config argument 'size'"):
    deris.get_config("size=b")
  with pytest.raises(ValueError, match=r"configs/deris_b_refcoco.py takes no argument \(got "
                     r"'variant=l'\); use configs/deris.py:variant=b,data=refcoco"):
    load_config("configs/deris_b_refcoco.py:variant=l")


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


def _config_flag(*args) -> ml_collections.ConfigDict:
  """The config as train.py's absl config_flags parses it from these arguments."""
  argv = ["train.py", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_config_flags_overrides_move_both_sections():
  """train.py parses with absl config_flags: its --config.a.b overrides go through the links."""
  config = _config_flag(f"--config={ROOT / 'configs' / 'deris_micro.py'}",
                        "--config.data.image_size=(64,64)", "--config.model.max_tokens=16")
  assert (config.model.image_size, config.data.max_tokens) == ((64, 64), 16)
  config_check.check_config(config)
  config = _config_flag(f"--config={ROOT / 'configs' / 'deris.py'}:variant=l,data=grefcoco",
                        "--config.model.cognition_image_size=(384,384)")
  assert config.to_dict() == load_config(
      "configs/deris_l_grefcoco.py", ["data.cognition_image_size=(384, 384)"]).to_dict()


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
    config_check.link_shared(config)


def test_load_config_checks_the_loaded_config(tmp_path):
  path = tmp_path / "unlinked.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict(dict(model=dict(max_tokens=12), "
                  "data=dict(max_tokens=12)))\n")
  assert load_config(str(path)).data.max_tokens == 12
  with pytest.raises(ValueError, match="config data.max_tokens 16 differs from model.max_tokens "
                     "12"):
    load_config(str(path), ["data.max_tokens=16"])


@pytest.mark.slow  # a subprocess or several processes
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


def test_default_workdir_keeps_variants_apart():
  import train  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(train.default_workdir("configs/deris.py:variant=l,data=grefcoco"))
  assert workdir == ROOT / "workdir" / "deris_variant-l_data-grefcoco"
  assert pathlib.Path(train.default_workdir("configs/synthetic.py")) == (
      ROOT / "workdir" / "synthetic")


def test_package_reads_configs_by_path_only():
  """Nothing under deris_jax/ imports the top-level configs package or edits sys.path."""
  for path in (ROOT / "deris_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        modules = [node.module or ""]
      else:
        continue
      assert not any(m == "configs" or m.startswith("configs.") for m in modules), path
  assert "sys.path" not in (ROOT / "deris_jax" / "config_loader.py").read_text()


def _argparse_config(*args) -> ml_collections.ConfigDict:
  """The same arguments through deris_jax.cli, as eval/predict/convert/bench parse them."""
  parser = argparse.ArgumentParser()
  cli.add_arguments(parser)
  parsed, overrides = cli.parse(parser, list(args))
  return cli.load(parsed.config, overrides)


@pytest.mark.parametrize("args", [
    ("--config.model.dtype=bfloat16", "--config.eval.batch_size=4"),
    ("--config.model.image_size=(64,64)", "--config.train.max_steps=3"),
    ("--config.data.eval_splits=('val',)", "--config.model.reference_compat=False"),
    ("--config.model.reference_compat=true", "--config.model.remat=0"),  # absl bool spellings
    ("--config.model.dtype=123",),  # a string field keeps the text
])
def test_train_and_the_other_commands_read_a_command_line_alike(args):
  micro = str(ROOT / "configs" / "deris_micro.py")
  ours = _argparse_config("--config", micro, *args)
  theirs = _config_flag(f"--config={micro}", *args)
  assert ours.to_dict() == theirs.to_dict()
  assert ours.data.image_size == ours.model.image_size  # linked in both
