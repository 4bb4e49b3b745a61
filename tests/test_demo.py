"""demo.py: the Gradio app served on a free localhost port and called with gradio_client."""
import json
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from gradio_client import Client, handle_file

import demo
from deris_jax import checkpoints, predictor as predictor_lib
from tests import fixture_values

ROOT = pathlib.Path(__file__).resolve().parents[1]
TAU = fixture_values.TAU  # the median of the fixture's scores: some queries pass, some not


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(predict_setup):
  predictor = predictor_lib.Predictor.from_checkpoint(predict_setup["checkpoint"])
  examples = demo.default_examples(predictor)
  port = _free_port()
  app = demo.build_app(predictor, examples)
  app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
  try:
    yield {"predictor": predictor, "examples": examples,
           "client": Client(f"http://127.0.0.1:{port}/", verbose=False)}
  finally:
    app.close()


def test_the_synthetic_examples_come_with_a_synthetic_checkpoint(served):
  examples = served["examples"]
  assert len(examples) == 6 and all(pathlib.Path(image).is_file() for image, _ in examples)
  listed = [json.loads(line) for line in
            (demo.SYNTHETIC_EXAMPLES / demo.EXAMPLES_FILE).read_text().splitlines()]
  assert {line["targets"] for line in listed} == {0, 1, 2}  # one, several and no target


def test_a_prediction_through_the_server_equals_the_predictor(served):
  image, text = served["examples"][1]
  overlay_path, mask_path, scores, verdict = served["client"].predict(
      handle_file(image), text, TAU, api_name="/segment")
  want = served["predictor"].predict(image, text, score_threshold=TAU)
  mask = np.asarray(PIL.Image.open(mask_path))
  assert mask.shape == want.mask.shape == (64, 64)
  np.testing.assert_array_equal(mask == 255, want.mask)
  rows = scores["data"]
  queries = range(fixture_values.NUM_QUERIES)
  assert [row[0] for row in rows] == sorted(queries, key=lambda q: -want.scores[q])
  np.testing.assert_allclose([row[1] for row in rows],
                             np.sort(want.scores)[::-1], atol=1e-4)
  assert [row[0] for row in rows if row[2] == "selected"] == want.selected.tolist()
  assert ("no target" in verdict) == want.no_target
  assert PIL.Image.open(overlay_path).size[0] == 384  # 64x64 shown at 384


def test_no_target_is_said(served):
  image, text = served["examples"][0]
  *_, verdict = served["client"].predict(handle_file(image), text, 0.99, api_name="/segment")
  assert verdict.startswith("**no target**") and "no query scores above tau 0.99" in verdict


def test_bad_input_is_an_error_on_the_page(served):
  image, _ = served["examples"][0]
  with pytest.raises(Exception, match="empty expression"):
    served["client"].predict(handle_file(image), "?!", TAU, api_name="/segment")


def test_an_old_checkpoint_says_to_pass_a_config(tmp_path, capsys):
  old = tmp_path / "old"
  checkpoints.save_params(old, {"w": np.zeros(2, np.float32)}, metadata={"kind": "train"})
  assert demo.main(["--checkpoint", str(old)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pass --config" in err[0]


@pytest.mark.slow
def test_the_command_serves(predict_setup):
  """`python demo.py --checkpoint DIR --port N` as a user starts it."""
  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, str(ROOT / "demo.py"), "--checkpoint", predict_setup["checkpoint"],
       "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        break
      except Exception:  # not up yet
        assert process.poll() is None, process.stdout.read()
        time.sleep(1)
    else:
      pytest.fail("demo.py did not serve within 240 s")
    image, text = demo.read_examples(demo.SYNTHETIC_EXAMPLES)[0]
    _, mask_path, _, _ = client.predict(handle_file(image), text, TAU, api_name="/segment")
    assert np.asarray(PIL.Image.open(mask_path)).shape == (64, 64)
  finally:
    process.terminate()
    output = process.communicate(timeout=30)[0]
  assert f"on http://127.0.0.1:{port}" in output
