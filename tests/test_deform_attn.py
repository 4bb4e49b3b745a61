"""Multi-scale deformable attention: the core against a loop-based numpy grid_sample and the
official fixture, its gradients, and the MSDeformAttn module's official initialisation."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deris_jax.models import deform_attn

SHAPES = ((3, 4), (2, 2), (5, 3))  # (h, w) per level, deliberately non-square
B, LQ, HEADS, D, POINTS = 2, 6, 2, 3, 4


def numpy_grid_sample_core(value, shapes, locations, weights):
  """Independent reference: `F.grid_sample(bilinear, zeros, align_corners=False)` on 2*loc-1,
  one sampling point at a time (value (B,S,H,D), locations (B,Lq,H,L,P,2))."""
  b_, _, heads, d = value.shape
  _, lq, _, levels, points, _ = locations.shape
  out = np.zeros((b_, lq, heads, d), np.float64)
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    level = value[:, start:start + h * w].reshape(b_, h, w, heads, d).astype(np.float64)
    start += h * w
    for b in range(b_):
      for q in range(lq):
        for m in range(heads):
          for p in range(points):
            gx, gy = 2.0 * locations[b, q, m, lvl, p].astype(np.float64) - 1.0
            ix = ((gx + 1.0) * w - 1.0) / 2.0  # unnormalise, align_corners=False
            iy = ((gy + 1.0) * h - 1.0) / 2.0
            x0, y0 = math.floor(ix), math.floor(iy)
            acc = np.zeros(d)
            for yy, xx, wt in ((y0, x0, (x0 + 1 - ix) * (y0 + 1 - iy)),
                               (y0, x0 + 1, (ix - x0) * (y0 + 1 - iy)),
                               (y0 + 1, x0, (x0 + 1 - ix) * (iy - y0)),
                               (y0 + 1, x0 + 1, (ix - x0) * (iy - y0))):
              if 0 <= yy < h and 0 <= xx < w:  # zero padding
                acc += wt * level[b, yy, xx, m]
            out[b, q, m] += weights[b, q, m, lvl, p] * acc
  return out.reshape(b_, lq, heads * d)


def _edge_case_locations(rng):
  """Random locations plus points outside, exactly on borders, corners and pixel centres."""
  loc = rng.uniform(-0.3, 1.3, (B, LQ, HEADS, len(SHAPES), POINTS, 2)).astype(np.float32)
  special = np.array([
      [0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0],  # the four image corners
      [0.5, 0.0], [0.0, 0.5], [1.0, 0.5], [0.5, 1.0],  # on the borders
      [-0.6, 0.5], [0.5, 1.7], [-0.2, -0.2], [1.25, 1.4],  # far outside
      [-0.05, 0.3], [0.3, 1.04],  # within half a pixel outside: partial contributions
  ], np.float32)
  flat = loc.reshape(-1, 2)
  flat[:len(special)] = special
  # Exact pixel centres and pixel edges of each level, for every point of query 5.
  for lvl, (h, w) in enumerate(SHAPES):
    loc[:, 5, :, lvl, 0] = [0.5 / w, 0.5 / h]
    loc[:, 5, :, lvl, 1] = [(w - 0.5) / w, (h - 0.5) / h]
    loc[:, 5, :, lvl, 2] = [1.0 / w, 2.0 / h]
  return flat.reshape(loc.shape)


@pytest.fixture(scope="module")
def random_case():
  rng = np.random.default_rng(0)
  total = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(B, total, HEADS, D)).astype(np.float32)
  loc = _edge_case_locations(rng)
  logits = rng.normal(size=(B, LQ, HEADS, len(SHAPES) * POINTS))
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return value, loc, weights.reshape(B, LQ, HEADS, len(SHAPES), POINTS).astype(np.float32)


core = jax.jit(deform_attn.ms_deform_attn_core, static_argnums=1)


def test_core_matches_numpy_grid_sample(random_case):
  value, loc, weights = random_case
  got = np.asarray(core(value, SHAPES, loc, weights))
  want = numpy_grid_sample_core(value, SHAPES, loc, weights)
  assert got.shape == (B, LQ, HEADS * D) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  # Far-outside points read exactly zero: a query whose points are all outside gives 0.
  outside = np.full_like(loc, -0.75)
  assert np.abs(np.asarray(core(value, SHAPES, outside, weights))).max() == 0.0


def test_core_matches_fixture(tiny_outputs):
  pre = "perception.pixel_decoder.encoder."
  shapes = tuple(tuple(int(x) for x in s) for s in tiny_outputs[pre + "spatial_shapes"])
  got = core(tiny_outputs[pre + "layer0.msda.value"], shapes,
             tiny_outputs[pre + "layer0.msda.sampling_locations"],
             tiny_outputs[pre + "layer0.msda.attention_weights"])
  want = tiny_outputs[pre + "layer0.msda.core_out"]
  assert np.abs(np.asarray(got) - want).max() < 1e-5
  np.testing.assert_array_equal(deform_attn.level_start_index(shapes),
                                tiny_outputs[pre + "level_start_index"])


def test_core_gradients(random_case):
  value, loc, weights = random_case
  rng = np.random.default_rng(1)
  cotangent = rng.normal(size=(B, LQ, HEADS * D)).astype(np.float32)

  def loss(v, l, w):
    return jnp.sum(deform_attn.ms_deform_attn_core(v, SHAPES, l, w) * cotangent)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  grads = grad_fn(value, loc, weights)
  for g, x in zip(grads, (value, loc, weights)):
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  # The core is linear in the values and in the weights: the gradients are exact adjoints.
  dv = rng.normal(size=value.shape).astype(np.float32)
  np.testing.assert_allclose(float(jnp.vdot(grads[0], dv)),
                             float(jnp.sum(core(dv, SHAPES, loc, weights) * cotangent)),
                             rtol=1e-4)
  dw = rng.normal(size=weights.shape).astype(np.float32)
  np.testing.assert_allclose(float(jnp.vdot(grads[2], dw)),
                             float(jnp.sum(core(value, SHAPES, loc, dw) * cotangent)),
                             rtol=1e-4)
  # Locations: central finite differences in float64 numpy, at points off the pixel grid.
  smooth = rng.uniform(0.1, 0.9, loc.shape).astype(np.float32)
  g_loc = np.asarray(grad_fn(value, smooth, weights)[1])
  direction = rng.normal(size=loc.shape)
  eps = 1e-4
  plus = numpy_grid_sample_core(value, SHAPES, smooth + eps * direction, weights)
  minus = numpy_grid_sample_core(value, SHAPES, smooth - eps * direction, weights)
  numeric = np.sum((plus - minus) * cotangent) / (2 * eps)
  np.testing.assert_allclose(np.sum(g_loc * direction), numeric, rtol=1e-3)


def test_core_keeps_no_gathered_values_for_the_backward(random_case):
  value, loc, weights = random_case
  _, vjp_fn = jax.vjp(lambda v, w: deform_attn.ms_deform_attn_core(v, SHAPES, loc, w),
                      value, weights)
  points4 = POINTS * 4
  for leaf in jax.tree_util.tree_leaves(vjp_fn):
    # The gathered values would be (B, LQ, HEADS, POINTS * 4, D) per level.
    assert np.size(leaf) < B * LQ * HEADS * points4 * D, np.shape(leaf)


def test_core_gathers_from_operands_written_once_on_the_cpu(random_case):
  value, loc, weights = random_case
  if jax.default_backend() != "cpu":
    pytest.skip("the operands are written once on the CPU only")
  text = core.lower(value, SHAPES, loc, weights).compile().as_text()
  computations = text.split("\n\n")
  gathering = [c for c in computations if " gather(" in c]
  assert gathering, text
  # No gather loop recomputes the bilinear corners (their floor) for every value it reads.
  assert not [c for c in gathering if " floor(" in c], gathering


def test_core_without_gradient_sums_the_gathered_rows_by_a_product_on_the_cpu(random_case):
  value, loc, weights = random_case
  if jax.default_backend() != "cpu":
    pytest.skip("the product form is the CPU's")
  text = core.lower(value, SHAPES, loc, weights).compile().as_text()
  # One batched (1, K) x (K, D) product per level, (B, LQ, HEADS, [1,] D) out.
  products = re.findall(rf"= f32\[{B},{LQ},{HEADS},(?:1,)?{D}\]\S* dot\(", text)
  assert len(products) == len(SHAPES), text


def test_core_without_gradient_over_query_chunks(random_case, monkeypatch):
  value, loc, weights = random_case
  # Four of the queries: shapes no other test traces (jax keeps the primal's trace per shape).
  loc, weights, queries = loc[:, 1:5], weights[:, 1:5], 4
  # Each level's gathered rows are B*4*HEADS*(POINTS*4)*D float32: allow half of them.
  monkeypatch.setattr(deform_attn, "GATHER_CHUNK_BYTES", B * queries * HEADS * POINTS * 4 * D * 2)
  got = np.asarray(core(value, SHAPES, loc, weights))
  np.testing.assert_allclose(got, numpy_grid_sample_core(value, SHAPES, loc, weights),
                             atol=2e-6, rtol=1e-5)
  if jax.default_backend() == "cpu":  # each gather reads the rows of half the queries
    text = core.lower(value, SHAPES, loc, weights).compile().as_text()
    rows = re.findall(rf"= f32\[(\d+),1,{D}\]\S* gather\(", text)
    assert rows and set(rows) == {str(B * queries // 2 * HEADS * POINTS * 4)}, text


def test_query_chunks_divide_the_queries_within_the_budget():
  budget = deform_attn.GATHER_CHUNK_BYTES
  assert deform_attn._query_chunks(3024, budget) == 1
  assert deform_attn._query_chunks(3024, budget + 1) == 2
  # DeRIS-B at the eval batch 16: 3024 queries, 8 heads, 16 corners, 32 channels.
  chunks = deform_attn._query_chunks(3024, 16 * 3024 * 8 * 16 * 32 * 4)
  assert 3024 % chunks == 0 and 16 * 3024 * 8 * 16 * 32 * 4 <= chunks * budget
  assert deform_attn._query_chunks(7, 100 * budget) == 7  # one query at a time at most


def test_core_bfloat16_values_sample_in_float32(random_case):
  value, loc, weights = random_case
  value16 = jnp.asarray(value, jnp.bfloat16)
  got = core(value16, SHAPES, loc, weights)
  assert got.dtype == jnp.bfloat16
  want = core(np.asarray(value16.astype(jnp.float32)), SHAPES, loc, weights)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want), atol=2e-2,
                             rtol=1e-2)


def test_core_rejects_mismatched_shapes(random_case):
  value, loc, weights = random_case
  with pytest.raises(ValueError, match="spatial_shapes"):
    deform_attn.ms_deform_attn_core(value, ((3, 4), (2, 2), (5, 4)), loc, weights)


def test_module_initialisation_is_official():
  # rbg keys: eager random init compiles much faster on CPU than with threefry.
  attn = deform_attn.MSDeformAttn(16, 3, 8, 4,
                                  rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")))
  bias = np.asarray(attn.sampling_offsets.bias[...]).reshape(8, 3, 4, 2)
  # Head h points along angle 2*pi*h/8 scaled onto the square's border, point p at p+1.
  np.testing.assert_allclose(bias[0, :, :, 0], np.tile([1, 2, 3, 4], (3, 1)))
  np.testing.assert_allclose(bias[1, 2, 3], [4.0, 4.0], rtol=1e-6)
  np.testing.assert_allclose(bias[6, 0, 1], [0.0, -2.0], atol=1e-6)
  assert np.all(np.asarray(attn.sampling_offsets.kernel[...]) == 0)
  assert np.all(np.asarray(attn.attention_weights.kernel[...]) == 0)
  assert np.all(np.asarray(attn.attention_weights.bias[...]) == 0)
  assert np.all(np.asarray(attn.value_proj.bias[...]) == 0)
  bound = math.sqrt(6 / 32)  # xavier_uniform for a 16x16 Linear
  assert 0.5 * bound < np.abs(np.asarray(attn.value_proj.kernel[...])).max() <= bound
  # Zero offsets/weights at init: every query averages the points of the grid around it.
  query = jnp.ones((1, 2, 16))
  ref = jnp.full((1, 2, 3, 2), 0.5)
  shapes = ((4, 4), (2, 2), (1, 1))
  graphdef, state = nnx.split(attn)

  @jax.jit
  def run(state):
    taps = {}
    nnx.merge(graphdef, state)(query, ref, jnp.ones((1, 21, 16)), shapes, taps=taps,
                               tap_prefix="t")
    return taps

  taps = run(state)
  np.testing.assert_allclose(np.asarray(taps["t.attention_weights"]), 1 / 12, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(taps["t.sampling_locations"])[0, 0, 0, 0, :, 0],
                             0.5 + np.arange(1, 5) / 4, rtol=1e-6)
