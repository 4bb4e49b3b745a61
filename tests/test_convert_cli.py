"""convert.py deris end to end: an official-format .pth -> Orbax -> the fixture's outputs."""
import numpy as np
import pytest

import convert
from deris_jax import checkpoints
from deris_jax.parity import check
from tests import torch_format


@pytest.fixture(scope="module")
def official_pth(tiny_state_dict, tmp_path_factory):
  """The tiny fixture as DeRIS saves it: under 'state_dict', DDP 'module.' prefix, extras."""
  path = tmp_path_factory.mktemp("pth") / "DeRIS-tiny.pth"
  state = {f"module.{k}": torch_format.tensor(v) for k, v in tiny_state_dict.items()}
  torch_format.save_zip({"state_dict": state, "epoch": 3, "lr": 1e-4}, path)
  return path


@pytest.fixture(scope="module")
def converted(official_pth, tmp_path_factory, fixture_config_file):
  out = tmp_path_factory.mktemp("ckpt") / "tiny"
  assert convert.main(["deris", "--checkpoint", str(official_pth),
                       "--config", fixture_config_file, "--out", str(out)]) == 0
  return out


def test_converted_checkpoint_reproduces_the_fixture(converted, tiny_dir):
  fixture = check.load_fixture(tiny_dir)
  model, meta = checkpoints.load_model(converted, fixture.model_config)
  assert meta["kind"] == "converted" and len(meta["sha256"]) == 64
  # Every key of the file is loaded or dropped for a listed reason (index buffers, mapmlp, ...).
  assert meta["loaded"] + len(meta["dropped"]) == len(fixture.state_dict)
  assert meta["loaded"] > len(meta["dropped"]) > 0
  taps = check.run_with_taps(model, fixture.inputs)
  for key in ("final.refer_logits", "final.pred_existence", "decoder.round3.mask_logits"):
    np.testing.assert_allclose(taps[key], fixture.outputs[key], atol=1e-4, rtol=1e-4)


def test_report_is_printed(official_pth, tmp_path, capsys, fixture_config_file):
  assert convert.main(["deris", "--checkpoint", str(official_pth), "--config",
                       fixture_config_file, "--out", str(tmp_path / "c")]) == 0
  out = capsys.readouterr().out
  assert "533 keys loaded, 29 dropped" in out
  assert "relative_position_index" in out and "sha256" in out


def test_truncated_file_is_a_clear_error(official_pth, tmp_path, capsys, fixture_config_file):
  bad = tmp_path / "truncated.pth"
  bad.write_bytes(official_pth.read_bytes()[:5000])
  assert convert.main(["deris", "--checkpoint", str(bad), "--config", fixture_config_file,
                       "--out", str(tmp_path / "c")]) == 1
  err = capsys.readouterr().err
  assert "truncated.pth" in err and not (tmp_path / "c").exists()


def test_other_model_size_names_key_and_shapes(official_pth, tmp_path, capsys):
  assert convert.main(["deris", "--checkpoint", str(official_pth), "--config",
                       "configs/deris_b_refcoco.py", "--out", str(tmp_path / "c")]) == 1
  err = capsys.readouterr().err
  assert "shape mismatch for '" in err and "model expects" in err
  assert not (tmp_path / "c").exists()


def test_renamed_key_is_an_error(tiny_state_dict, tmp_path, capsys, fixture_config_file):
  state = {k.replace("SEG_cls", "SEG_clz"): torch_format.tensor(v)
           for k, v in tiny_state_dict.items()}
  path = tmp_path / "renamed.pth"
  torch_format.save_zip({"state_dict": state}, path)
  assert convert.main(["deris", "--checkpoint", str(path), "--config", fixture_config_file,
                       "--out", str(tmp_path / "c")]) == 1
  assert "SEG_clz" in capsys.readouterr().err


def test_checkpoint_of_another_variant_is_refused(converted):
  from configs import deris_b_refcoco
  with pytest.raises(checkpoints.CheckpointError, match="expects|missing|unknown"):
    checkpoints.load_model(converted, deris_b_refcoco.get_config().model)
