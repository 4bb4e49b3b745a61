"""The converter against the real DeRIS-B/L state-dict manifests, by shape (no weights)."""
import importlib
import json

import numpy as np
import pytest
from flax import nnx

from deris_jax.convert import deris_checkpoint, torch_to_nnx
from deris_jax.models.deris import abstract_model

VARIANTS = ["deris_b_refcoco", "deris_b_grefcoco", "deris_l_refcoco", "deris_l_grefcoco"]


def read_manifest(path):
  shapes = {}
  for line in path.read_text().splitlines():
    name, shape, _ = line.split("\t")
    shapes[name] = tuple(json.loads(shape))
  return shapes


@pytest.fixture(scope="module")
def abstract_models():
  cache = {}

  def get(variant):
    if variant not in cache:
      config = importlib.import_module(f"configs.{variant}").get_config()
      cache[variant] = abstract_model(config.model)
    return cache[variant]

  return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifest_maps_completely(variant, fixtures_root, abstract_models):
  manifest = read_manifest(fixtures_root / "manifests" / f"{variant}.tsv")
  model = abstract_models(variant)
  plan = deris_checkpoint.plan_for_model(model, manifest, source=variant)
  params = torch_to_nnx.flat_shapes(nnx.state(model, nnx.Param))
  # Every model parameter is assigned exactly once, every manifest key is used or dropped.
  assert sorted(a.path for a in plan.assignments) == sorted(params)
  assert len(plan.assignments) + len(plan.dropped) == len(manifest)
  # The parameter count equals the manifest's count minus the dropped entries.
  count = sum(int(np.prod(s)) for s in params.values())
  manifest_count = sum(int(np.prod(s)) for s in manifest.values())
  dropped_count = sum(int(np.prod(manifest[k])) for k in plan.dropped)
  assert count == manifest_count - dropped_count
  # Only the documented unused keys are dropped.
  reasons = set(plan.dropped.values())
  assert len(reasons) <= 7


def test_reference_parameter_counts(abstract_models):
  """docs/design.md §1: DeRIS-B 291.46 M and DeRIS-L 781.54 M numbers in the state dict."""
  for variant, millions in [("deris_b_refcoco", 291.46), ("deris_l_refcoco", 781.54)]:
    params = torch_to_nnx.flat_shapes(nnx.state(abstract_models(variant), nnx.Param))
    count = sum(int(np.prod(s)) for s in params.values())
    assert 0.99 * millions * 1e6 < count < millions * 1e6


def test_other_model_size_is_a_shape_error(fixtures_root, abstract_models):
  manifest = read_manifest(fixtures_root / "manifests" / "deris_b_refcoco.tsv")
  with pytest.raises(torch_to_nnx.ConversionError, match=r"shape mismatch for '.*' .*\(.*\)"):
    deris_checkpoint.plan_for_model(abstract_models("deris_l_refcoco"), manifest,
                                    source="DeRIS-B.pth")


def test_renamed_key_is_reported(fixtures_root, abstract_models):
  manifest = read_manifest(fixtures_root / "manifests" / "deris_b_refcoco.tsv")
  key = "perception_branch.predictor.SEG_cls.weight"
  renamed = dict(manifest)
  renamed["perception_branch.predictor.SEG_clz.weight"] = renamed.pop(key)
  with pytest.raises(torch_to_nnx.ConversionError, match="unknown key.*SEG_clz"):
    deris_checkpoint.plan_for_model(abstract_models("deris_b_refcoco"), renamed)


def test_missing_key_is_reported(fixtures_root, abstract_models):
  manifest = read_manifest(fixtures_root / "manifests" / "deris_b_refcoco.tsv")
  del manifest["perception_branch.predictor.decoder_norm.weight"]
  with pytest.raises(torch_to_nnx.ConversionError, match="missing.*decoder.decoder_norm.scale"):
    deris_checkpoint.plan_for_model(abstract_models("deris_b_refcoco"), manifest)


def test_grefcoco_differs_only_in_query_tables(fixtures_root):
  b_ref = read_manifest(fixtures_root / "manifests" / "deris_b_refcoco.tsv")
  b_gref = read_manifest(fixtures_root / "manifests" / "deris_b_grefcoco.tsv")
  differ = sorted(k for k in b_ref if b_ref[k] != b_gref[k])
  assert differ == ["perception_branch.perception_query_embed.weight",
                    "perception_branch.predictor.query_embed.weight",
                    "understanding_branch.init_query.weight"]
