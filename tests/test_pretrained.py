"""convert.py pretrained: Mask2Former .pkl + BEiT-3 .pth -> the paper's initial DeRIS weights.

The files are written here with the official key names: the tiny fixture's state dict mapped
back to Mask2Former / unilm BEiT-3 names (plus what the real files hold and DeRIS does not use:
6 more decoder layers, the COCO class head, 25 queries, a pretraining head), so every loaded
value can be checked against the fixture's converted state dict. The released variants are
checked on shapes only, from ../shared/fixtures/manifests.
"""
import collections
import contextlib
import hashlib
import importlib
import io
import math
import pathlib
import pickle
import re

import numpy as np
import pytest
from flax import nnx

import convert
from deris_jax import checkpoints, trees
from deris_jax.convert import bicubic, deris_checkpoint, pretrained, torch_to_nnx
from deris_jax.convert.torch_to_nnx import ConversionError
from deris_jax.models.deris import abstract_model, build_model
from tests import fixture_values
from tests import torch_format

REF = pathlib.Path(__file__).parent / "data" / "pretrained_interp_ref.npz"
TOTAL_QUERIES = 25  # Mask2Former's query_embed rows in the synthetic file (100 in COCO's)
NUM_CLASSES = 81  # COCO instance: 80 + no-object
M2F_LAYERS = 9
PB = "perception_branch."
BEIT = "understanding_branch.vis_enc.beit3."
POSITIONS = "beit3.encoder.embed_positions.A.weight"

# What the files must provide, written independently of pretrained_keys.
PROVIDED = re.compile(
    r"^(swin|beit3)\.|^pixel_decoder\.(?!(adapter_1|layer_1)\.0\.bias$)"
    r"|^decoder\.(transformer_\w+_layers|decoder_norm|level_embed|mask_embed|query_embed)\.")


def official_mask2former(deris):
  """Mask2Former key -> (shape, DeRIS key holding its value or None = random), in the order
  of a detectron2 checkpoint, from DeRIS key -> shape."""
  out = collections.OrderedDict()
  for key, shape in deris.items():
    if key.startswith(PB + "hier_vision_encoder."):
      out["backbone." + key[len(PB + "hier_vision_encoder."):]] = (shape, key)
  for key, shape in deris.items():
    if key.startswith(PB + "pixel_decoder."):
      rest = key[len(PB + "pixel_decoder."):]
      m = re.fullmatch(r"(adapter_1|layer_1)\.([01])\.(weight|bias)", rest)
      if m and m[2] == "0" and m[3] == "bias":
        continue  # detectron2's conv has no bias
      if m:
        rest = f"{m[1]}.weight" if m[2] == "0" else f"{m[1]}.norm.{m[3]}"
      out["sem_seg_head.pixel_decoder." + rest] = (shape, key)
  hidden = None
  for key, shape in deris.items():
    rest = key[len(PB + "predictor."):] if key.startswith(PB + "predictor.") else ""
    if re.match(r"(transformer_\w+_layers\.\d+|decoder_norm|level_embed|mask_embed)\.", rest):
      out["sem_seg_head.predictor." + rest] = (shape, key)
    if rest == "query_embed.weight":
      hidden = shape[1]
      out["sem_seg_head.predictor.query_embed.weight"] = ((TOTAL_QUERIES, hidden), key)
  for layer in range(3, M2F_LAYERS):
    for name, (shape, _) in list(out.items()):
      m = re.fullmatch(r"(sem_seg_head\.predictor\.transformer_\w+_layers)\.0\.(.*)", name)
      if m:
        out[f"{m[1]}.{layer}.{m[2]}"] = (shape, None)
  out["sem_seg_head.predictor.class_embed.weight"] = ((NUM_CLASSES, hidden), None)
  out["sem_seg_head.predictor.class_embed.bias"] = ((NUM_CLASSES,), None)
  out["sem_seg_head.predictor.query_feat.weight"] = ((TOTAL_QUERIES, hidden), None)
  out["criterion.empty_weight"] = ((NUM_CLASSES,), None)
  return out


def official_beit3(deris):
  """unilm BEiT-3 key -> (shape, DeRIS key or None), plus a pretraining head."""
  out = collections.OrderedDict(("beit3." + k[len(BEIT):], (shape, k))
                                for k, shape in deris.items() if k.startswith(BEIT))
  dim = out["beit3.text_embed.weight"][0][1]
  out["mim_head.weight"] = ((8, dim), None)
  return out


def fill(entries, state_dict, seed):
  """Arrays for `official_*` entries: the DeRIS value, or random; a longer query_embed keeps
  the DeRIS rows first."""
  rng = np.random.default_rng(seed)
  out = collections.OrderedDict()
  for name, (shape, source) in entries.items():
    value = rng.standard_normal(shape).astype(np.float32)
    if source is not None:
      known = state_dict[source]
      value[:known.shape[0]] = known  # the whole value, or the first rows of query_embed
      value = value.astype(known.dtype)
    out[name] = value
  return out


def read_manifest(path):
  shapes = collections.OrderedDict()
  for line in path.read_text().splitlines():
    name, shape, _ = line.split("\t")
    shapes[name] = tuple(int(n) for n in shape.strip("[]").split(",") if n.strip())
  return shapes


_SHAPES = {}


def variant_shapes(variant, cognition_image_size=None):
  """(config.model, model path -> shape) of a released variant, cached per module."""
  key = (variant, cognition_image_size)
  if key not in _SHAPES:
    config = importlib.import_module(f"configs.{variant}").get_config().model
    if cognition_image_size:
      config.cognition_image_size = cognition_image_size
    _SHAPES[key] = (config, torch_to_nnx.flat_shapes(nnx.state(abstract_model(config),
                                                               nnx.Param)))
  return _SHAPES[key]


def flat_params(params_tree):
  return {k: np.asarray(v) for k, v in trees.named_leaves(params_tree).items()}


@pytest.fixture(scope="module")
def ref():
  with np.load(REF) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def tiny_config():
  return fixture_values.model_config()  # the model whose state dict the files are made from


@pytest.fixture(scope="module")
def tiny_model_shapes(tiny_config):
  return torch_to_nnx.flat_shapes(nnx.state(abstract_model(tiny_config), nnx.Param))


@pytest.fixture(scope="module")
def official_files(tiny_state_dict, ref, tmp_path_factory):
  """(m2f.pkl, beit3.zip, their state dicts) in the official formats."""
  deris_shapes = {k: v.shape for k, v in tiny_state_dict.items()}
  m2f = fill(official_mask2former(deris_shapes), tiny_state_dict, seed=1)
  beit = fill(official_beit3(deris_shapes), tiny_state_dict, seed=2)
  beit[POSITIONS] = ref["tiny_6_to_4.input"]  # a 6x6 grid, resized to the config's 4x4
  root = tmp_path_factory.mktemp("pretrained")
  m2f_path, beit_path = root / "model_final_tiny.pkl", root / "beit3_tiny_patch16_96.zip"
  with open(m2f_path, "wb") as f:  # detectron2: numpy arrays under 'model', protocol 2
    pickle.dump({"model": m2f, "__author__": "deris-jax tests", "matching_heuristics": True}, f,
                protocol=2)
  args = torch_format.Call(torch_format.Global("argparse", "Namespace"), ())
  torch_format.save_zip({"model": {k: torch_format.tensor(v) for k, v in beit.items()},
                         "args": args, "epoch": 20}, beit_path)
  return m2f_path, beit_path, m2f, beit


@pytest.fixture(scope="module")
def converted(official_files, tmp_path_factory, fixture_config_file):
  """convert.py pretrained on the tiny config: (output directory, stdout)."""
  m2f_path, beit_path, _, _ = official_files
  out = tmp_path_factory.mktemp("ckpt") / "init"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    rc = convert.main(["pretrained", "--mask2former", str(m2f_path), "--beit3", str(beit_path),
                       "--config", fixture_config_file, "--out", str(out), "--seed", "3"])
  assert rc == 0
  return out, stdout.getvalue()


@pytest.fixture(scope="module")
def restored(converted):
  params, meta = checkpoints.restore_params(converted[0])
  return flat_params(params), meta


# ------------------------------------------------------------------------------------------
# Position-table interpolation and key-set compaction.


@pytest.mark.parametrize("case", ["tiny_6_to_4", "ckpt224_to_tiny", "ckpt224_to_384",
                                  "grid_3_to_7"])
def test_position_interpolation_matches_official_torch(ref, case):
  table, want = ref[f"{case}.input"], ref[f"{case}.output"]
  side = math.isqrt(want.shape[0] - 3)
  got = pretrained.resize_vision_positions(table, (side, side))
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_array_equal(got[:3], table[:3])  # cls + 2 offset rows are kept
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)  # measured max 4.5e-8


def test_bicubic_matches_torch_on_a_non_square_image(ref):
  got = bicubic.resize(ref["image.input"], (11, 4))
  np.testing.assert_allclose(got, ref["image.output_11x4"], rtol=0, atol=3e-6)


def test_non_square_position_table_is_refused():
  with pytest.raises(ValueError, match="not 3 \\+ a square"):
    pretrained.resize_vision_positions(np.zeros((3 + 12, 4), np.float32), (2, 2))


def test_compact_keys_expand_to_exactly_the_keys():
  keys = ([f"a.layers.{i}.blocks.{b}.{n}.weight" for i, d in enumerate((2, 2, 18, 2))
           for b in range(d) for n in ("fc1", "fc2")] + ["a.norm.bias", "a.x", "b.3.w", "b.5.w"])
  patterns = pretrained.compact_keys(keys)
  assert "a.layers.2.blocks.{0..17}.{fc1,fc2}.weight" in patterns
  assert "b.{3,5}.w" in patterns
  expanded = [k for p in patterns for k in pretrained.expand_pattern(p)]
  assert sorted(expanded) == sorted(keys)  # no key lost, none invented, none twice


# ------------------------------------------------------------------------------------------
# The converted tiny checkpoint.


def test_every_loaded_value_lands_in_place(restored, tiny_state_dict, tiny_config,
                                           tiny_model_shapes, ref):
  params, meta = restored
  want = flat_params(deris_checkpoint.convert_state_dict(tiny_state_dict, tiny_config)[0])
  provided = sorted(p for p in tiny_model_shapes if PROVIDED.search(p))
  assert sorted(meta["loaded"]) == provided
  for path in provided:
    if path == "beit3.encoder.embed_positions.A.embedding":
      np.testing.assert_allclose(params[path], ref["tiny_6_to_4.output"], rtol=0, atol=1e-7)
    else:  # same values and layout as the official DeRIS state dict converts to
      np.testing.assert_array_equal(params[path], want[path], err_msg=path)
  renames = {  # model path -> official key, as the official loaders map them
      "swin.patch_embed.proj.kernel": "mask2former:backbone.patch_embed.proj.weight",
      "pixel_decoder.adapter_1.0.kernel": "mask2former:sem_seg_head.pixel_decoder.adapter_1.weight",
      "pixel_decoder.adapter_1.1.scale":
          "mask2former:sem_seg_head.pixel_decoder.adapter_1.norm.weight",
      "pixel_decoder.layer_1.0.kernel": "mask2former:sem_seg_head.pixel_decoder.layer_1.weight",
      "pixel_decoder.layer_1.1.bias": "mask2former:sem_seg_head.pixel_decoder.layer_1.norm.bias",
      "decoder.transformer_ffn_layers.2.linear1.kernel":
          "mask2former:sem_seg_head.predictor.transformer_ffn_layers.2.linear1.weight",
      "decoder.query_embed.embedding": "mask2former:sem_seg_head.predictor.query_embed.weight",
      "decoder.level_embed.embedding": "mask2former:sem_seg_head.predictor.level_embed.weight",
      "beit3.text_embed.embedding": "beit3:beit3.text_embed.weight",
  }
  for path, key in renames.items():
    assert meta["loaded"][path] == key
  # query_embed: the first N of the file's 25 rows.
  assert params["decoder.query_embed.embedding"].shape == (tiny_config.num_queries, 32)


def test_the_other_parameters_keep_build_models_values(restored, tiny_config,
                                                       tiny_model_shapes):
  params, meta = restored
  initialised = sorted(p for p in tiny_model_shapes if not PROVIDED.search(p))
  assert sorted(meta["initialised"]) == initialised
  assert meta["seed"] == 3
  model = flat_params(nnx.to_pure_dict(nnx.state(build_model(tiny_config, 3),
                                                         nnx.Param)))
  for path in initialised:
    np.testing.assert_array_equal(params[path], model[path], err_msg=path)
  for path in ("pixel_decoder.adapter_1.0.bias", "pixel_decoder.layer_1.0.bias"):
    assert not params[path].any()  # detectron2 convs have no bias: the init value 0 stays


def test_checkpoint_is_a_params_checkpoint_for_init_from(converted, restored, official_files,
                                                         tiny_config):
  model, meta = checkpoints.load_model(converted[0], tiny_config)  # what --init_from does
  assert meta["kind"] == "pretrained"
  for role, path in zip(("mask2former", "beit3"), official_files[:2]):
    assert meta["sources"][role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["sources"][role]["path"] == str(path)
  assert meta["sources"]["mask2former"]["keys"] == len(official_files[2])
  assert meta["config"]["model"]["num_queries"] == tiny_config.num_queries
  loaded = flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert sorted(loaded) == sorted(restored[0])
  for path in ("decoder.query_embed.embedding", "beit3.encoder.embed_positions.A.embedding"):
    np.testing.assert_array_equal(loaded[path], restored[0][path])


def _section(stdout, header_start, next_header_start):
  """The 4-space-indented pattern lines of one report section."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  end = next((i for i, line in enumerate(lines) if i > start and
              line.startswith(next_header_start)), len(lines))
  return [line.strip() for line in lines[start + 1:end]
          if line.startswith("    ") and ": " not in line]


def test_report_is_exact(converted, restored, official_files, tiny_model_shapes):
  _, stdout = converted
  _, meta = restored
  m2f_path, beit_path, m2f, beit = official_files
  ignored_m2f = {k for k in m2f if k.endswith(".relative_position_index")
                 or re.search(r"_layers\.[3-8]\.|class_embed|query_feat|^criterion\.", k)}
  assert set(meta["ignored"]["mask2former"]) == ignored_m2f
  assert set(meta["ignored"]["beit3"]) == {"beit3.vision_embed.mask_token", "mim_head.weight"}
  assert "recomputed from the window size" in meta["ignored"]["mask2former"][
      "backbone.layers.0.blocks.0.attn.relative_position_index"]
  assert "never read by the official loader" in meta["ignored"]["mask2former"][
      "criterion.empty_weight"]
  assert "outside beit3.*" in meta["ignored"]["beit3"]["mim_head.weight"]
  loaded = [p for p in tiny_model_shapes if PROVIDED.search(p)]
  initialised = [p for p in tiny_model_shapes if not PROVIDED.search(p)]
  numbers = sum(math.prod(tiny_model_shapes[p]) for p in loaded)
  ignored = len(ignored_m2f) + 2
  for role, path in (("mask2former", m2f_path), ("beit3", beit_path)):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"--{role} {path.name}: sha256 {digest}" in stdout
  assert f"loaded {len(loaded)} parameters ({numbers:,} numbers):" in stdout
  assert (f"  {len(m2f) - len(ignored_m2f)} of the {len(m2f)} keys of {m2f_path.name} "
          "(--mask2former) -> swin 125, pixel_decoder 53, decoder 64") in stdout
  assert f"  {len(beit) - 2} of the {len(beit)} keys of {beit_path.name} (--beit3)" in stdout
  assert "first 10 of its 25 rows" in stdout and "resized 6x6 -> 4x4" in stdout
  assert f"initialised {len(initialised)} parameters" in stdout
  assert f"ignored {ignored} keys:" in stdout
  assert ("    sem_seg_head.predictor.transformer_ffn_layers.{3..8}.{linear1,linear2,norm}."
          "{bias,weight}") in stdout
  # Every list expands to exactly its set of keys.
  expand = lambda lines: sorted(k for line in lines for k in pretrained.expand_pattern(line))
  assert expand(_section(stdout, "initialised ", "ignored ")) == sorted(initialised)
  assert expand(_section(stdout, "ignored ", "wrote ")) == sorted(
      ignored_m2f | {"beit3.vision_embed.mask_token", "mim_head.weight"})
  loaded_keys = [k for k in list(m2f) + list(beit) if k not in ignored_m2f
                 and k not in ("beit3.vision_embed.mask_token", "mim_head.weight")]
  assert expand(_section(stdout, "loaded ", "initialised ")) == sorted(loaded_keys)


# ------------------------------------------------------------------------------------------
# Wrong files.


def _tiny_file_shapes(official_files):
  _, _, m2f, beit = official_files
  return ({k: v.shape for k, v in m2f.items()}, {k: v.shape for k, v in beit.items()})


def _plan(config, model_shapes, m2f, beit):
  return pretrained.plan_pretrained(config, model_shapes, {"mask2former": m2f, "beit3": beit},
                                    {"mask2former": "m2f.pkl", "beit3": "beit3.pth"})


def test_file_of_another_variant_names_the_first_key_that_differs(official_files, tmp_path,
                                                                  capsys):
  m2f_path, beit_path, m2f, _ = official_files
  out = tmp_path / "c"
  assert convert.main(["pretrained", "--mask2former", str(m2f_path), "--beit3", str(beit_path),
                       "--config", "configs/deris_b_refcoco.py", "--out", str(out)]) == 1
  err = capsys.readouterr().err
  # Every Swin-S shape differs from the tiny Swin's: the first key of the file is named.
  first = next(k for k in m2f if not k.endswith(".relative_position_index"))
  assert f"{m2f_path.name}: shape mismatch for '{first}' -> 'swin." in err
  assert f"checkpoint {m2f[first].shape}" in err and "model expects" in err
  assert not out.exists()


def test_swin_s_file_with_the_l_config_is_refused(fixtures_root):
  """The issue's example, on the real shapes: DeRIS-B's files (Swin-S, BEiT3-base) with L."""
  deris = read_manifest(fixtures_root / "manifests" / "deris_b_refcoco.tsv")
  m2f = {k: s for k, (s, _) in official_mask2former(deris).items()}
  beit = {k: s for k, (s, _) in official_beit3(deris).items()}
  config, model_shapes = variant_shapes("deris_l_refcoco")
  with pytest.raises(ConversionError, match=r"m2f.pkl: shape mismatch for "
                     r"'backbone\.patch_embed\.proj\.weight' .* checkpoint \(96, 3, 4, 4\)"):
    _plan(config, model_shapes, m2f, beit)
  l_deris = read_manifest(fixtures_root / "manifests" / "deris_l_refcoco.tsv")
  l_m2f = {k: s for k, (s, _) in official_mask2former(l_deris).items()}
  with pytest.raises(ConversionError, match=r"beit3.pth: shape mismatch for "
                     r"'beit3\.text_embed\.weight' .* checkpoint \(64010, 768\)"):
    _plan(config, model_shapes, l_m2f, beit)


def test_swapped_files_are_refused(official_files, tiny_config, tiny_model_shapes):
  m2f, beit = _tiny_file_shapes(official_files)
  with pytest.raises(ConversionError, match="m2f.pkl: none of its 92 keys .* --mask2former"):
    _plan(tiny_config, tiny_model_shapes, beit, m2f)


def test_missing_provided_key_is_an_error(official_files, tiny_config, tiny_model_shapes):
  m2f, beit = _tiny_file_shapes(official_files)
  del m2f["sem_seg_head.predictor.transformer_ffn_layers.2.linear1.weight"]
  with pytest.raises(ConversionError, match="m2f.pkl: 1 parameter.* missing .*"
                     "'decoder.transformer_ffn_layers.2.linear1.kernel' \\(32, 64\\)"):
    _plan(tiny_config, tiny_model_shapes, m2f, beit)
  m2f, beit = _tiny_file_shapes(official_files)
  del beit["beit3.encoder.layers.1.ffn.B.fc2.bias"]
  with pytest.raises(ConversionError, match="beit3.pth: 1 parameter.*'beit3.encoder.layers.1."
                     "ffn.B.fc2.bias'"):
    _plan(tiny_config, tiny_model_shapes, m2f, beit)


def test_unknown_keys_strict_for_the_backbone_only(official_files, tiny_config,
                                                   tiny_model_shapes):
  m2f, beit = _tiny_file_shapes(official_files)
  m2f["backbone.layers.0.blocks.0.attn.extra.weight"] = (4, 4)
  with pytest.raises(ConversionError, match="unknown key.*backbone.layers.0.blocks.0.attn.extra"):
    _plan(tiny_config, tiny_model_shapes, m2f, beit)
  m2f, beit = _tiny_file_shapes(official_files)
  m2f["sem_seg_head.predictor.input_proj.0.weight"] = (32, 32, 1, 1)  # enforce_input_project
  beit["beit3.encoder.layers.0.self_attn.xpos.scale"] = (4,)
  plan = _plan(tiny_config, tiny_model_shapes, m2f, beit)
  assert "strict=False" in plan.sources["mask2former"].ignored[
      "sem_seg_head.predictor.input_proj.0.weight"]
  assert "strict=False" in plan.sources["beit3"].ignored[
      "beit3.encoder.layers.0.self_attn.xpos.scale"]


def test_too_few_queries_or_a_bad_position_table_are_errors(official_files, tiny_config,
                                                            tiny_model_shapes):
  m2f, beit = _tiny_file_shapes(official_files)
  m2f["sem_seg_head.predictor.query_embed.weight"] = (6, 32)
  with pytest.raises(ConversionError,
                     match="query_embed.weight.*\\(6, 32\\).*expects \\(10, 32\\)"):
    _plan(tiny_config, tiny_model_shapes, m2f, beit)
  m2f, beit = _tiny_file_shapes(official_files)
  beit[POSITIONS] = (3 + 30, 64)
  with pytest.raises(ConversionError, match="beit3.pth: '.*A.weight' has 33 rows, not 3 \\+ a "
                     "square"):
    _plan(tiny_config, tiny_model_shapes, m2f, beit)


# ------------------------------------------------------------------------------------------
# The released variants, on shapes.


@pytest.mark.parametrize("variant", ["deris_b_refcoco", "deris_b_grefcoco", "deris_l_refcoco",
                                     "deris_l_grefcoco"])
def test_released_variants_plan_completely(variant, fixtures_root):
  deris = read_manifest(fixtures_root / "manifests" / f"{variant}.tsv")
  m2f = {k: s for k, (s, _) in official_mask2former(deris).items()}
  beit = {k: s for k, (s, _) in official_beit3(deris).items()}
  beit[POSITIONS] = (3 + 14 * 14, beit[POSITIONS][1])
  m2f["sem_seg_head.predictor.query_embed.weight"] = (100, 256)  # COCO instance: 100 queries
  config, model_shapes = variant_shapes(variant)
  plan = _plan(config, model_shapes, m2f, beit)
  assert sorted(plan.loaded) == sorted(p for p in model_shapes if PROVIDED.search(p))
  assert sorted(plan.initialised) == sorted(p for p in model_shapes if not PROVIDED.search(p))
  assert not plan.sources["beit3"].adjusted  # 224 checkpoints at 224: no interpolation
  assert plan.sources["mask2former"].adjusted == {
      "sem_seg_head.predictor.query_embed.weight":
          f"first {config.num_queries} of its 100 rows (query_embed sliced to the N queries, "
          "as the official loader does)"}


def test_position_table_is_resized_for_another_image_size(fixtures_root):
  deris = read_manifest(fixtures_root / "manifests" / "deris_b_refcoco.tsv")
  m2f = {k: s for k, (s, _) in official_mask2former(deris).items()}
  beit = {k: s for k, (s, _) in official_beit3(deris).items()}
  config, model_shapes = variant_shapes("deris_b_refcoco", (384, 384))
  plan = _plan(config, model_shapes, m2f, beit)
  assert "resized 14x14 -> 24x24" in plan.sources["beit3"].adjusted[POSITIONS]
  assert plan.loaded["beit3.encoder.embed_positions.A.embedding"] == ("beit3", POSITIONS)
