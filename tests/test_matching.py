"""The jitted Hungarian solver against scipy.optimize.linear_sum_assignment."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from deris_jax import matching

_solve = jax.jit(jax.vmap(matching.linear_sum_assignment))


def _scipy_reference(cost, valid):
  """(total cost, query per valid target slot) from scipy on the valid columns."""
  columns = np.flatnonzero(valid)
  rows, cols = optimize.linear_sum_assignment(cost[:, columns].astype(np.float64))
  query_for_target = np.full(cost.shape[1], -1)
  query_for_target[columns[cols]] = rows
  return cost[rows, columns[cols]].astype(np.float64).sum(), query_for_target


def _check_consistent(assignment, valid):
  """The five fields of one Assignment describe the same matching, of size min(N, V)."""
  q = np.asarray(assignment.query_for_target)
  matched = np.asarray(assignment.query_matched)
  target_of = np.asarray(assignment.target_for_query)
  target_matched = np.asarray(assignment.target_matched)
  np.testing.assert_array_equal(np.asarray(assignment.target_valid), valid)
  np.testing.assert_array_equal(target_matched, q >= 0)
  assert (q[~valid] == -1).all()
  size = min(len(matched), valid.sum())
  assert target_matched.sum() == size and matched.sum() == size
  assert len(set(q[target_matched])) == size  # distinct queries
  np.testing.assert_array_equal(np.flatnonzero(matched), np.sort(q[target_matched]))
  for k in np.flatnonzero(target_matched):
    assert target_of[q[k]] == k
  assert (target_of[~matched] == -1).all()


def _unbatch(assignment, b):
  return matching.Assignment(*(np.asarray(field)[b] for field in assignment))


def _assert_equals_scipy(cost, valid):
  """Solves the (B, N, K) batch in one call; each item's assignment and total equal scipy's."""
  got = _solve(jnp.asarray(cost), jnp.asarray(valid))
  for b in range(cost.shape[0]):
    want_total, want_query = _scipy_reference(cost[b], valid[b])
    one = _unbatch(got, b)
    _check_consistent(one, valid[b])
    np.testing.assert_array_equal(one.query_for_target, want_query,
                                  err_msg=f"item {b}, V={valid[b].sum()}")
    total = float(matching.assignment_cost(jnp.nan_to_num(cost[b]), one))
    np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_queries", [1, 5, 20])
def test_random_padded_matrices_match_scipy(num_queries):
  """Kmax = N slots, the number of valid targets running over 0..N, holes in the validity."""
  rng = np.random.default_rng(num_queries)
  batch = 8 * (num_queries + 1)
  cost = rng.normal(size=(batch, num_queries, num_queries)).astype(np.float32)
  valid = np.zeros((batch, num_queries), bool)
  for b in range(batch):
    count = b % (num_queries + 1)  # 0..N valid targets
    valid[b, rng.choice(num_queries, count, replace=False)] = True
  cost = np.where(valid[:, None, :], cost, np.nan)  # invalid slots hold garbage
  _assert_equals_scipy(cost, valid)  # tie-free: the optimum is unique


@pytest.mark.parametrize("num_queries,num_targets", [(20, 0), (20, 1), (20, 7), (20, 20), (6, 3)])
def test_rectangular_matrices_match_scipy(num_queries, num_targets):
  """Static K < N (and K = N, K = 0), all valid, costs over several orders of magnitude."""
  rng = np.random.default_rng(100 + num_targets)
  batch = 24
  scale = 10.0 ** rng.integers(-3, 4, size=(batch, 1, 1))
  cost = (rng.random((batch, num_queries, num_targets)) * scale).astype(np.float32)
  valid = np.ones((batch, num_targets), bool)
  got = _solve(jnp.asarray(cost), jnp.asarray(valid))
  for b in range(batch):
    want_total, want_query = _scipy_reference(cost[b], valid[b])
    one = _unbatch(got, b)
    _check_consistent(one, valid[b])
    np.testing.assert_array_equal(one.query_for_target, want_query)
    total = float(matching.assignment_cost(cost[b], one))
    np.testing.assert_allclose(total, want_total, rtol=1e-5)


@pytest.mark.parametrize("case", ["slots_within_queries", "more_slots_than_queries"])
def test_ties_reach_the_optimal_cost(case):
  """Small integer costs (many ties): any optimum is fine, its total must equal scipy's; with
  K <= N, and with K > N and valid counts on both sides of N."""
  if case == "slots_within_queries":
    rng = np.random.default_rng(7)
    cost = rng.integers(0, 3, size=(200, 10, 6)).astype(np.float32)
    valid = rng.random((200, 6)) < 0.8
  else:
    rng = np.random.default_rng(12)
    cost = rng.integers(0, 3, size=(300, 6, 10)).astype(np.float32)
    valid = _valid_counts(10, 300, rng)
  got = _solve(jnp.asarray(cost), jnp.asarray(valid))
  for b in range(len(cost)):
    want_total, _ = _scipy_reference(cost[b], valid[b])
    one = _unbatch(got, b)
    _check_consistent(one, valid[b])
    assert float(matching.assignment_cost(cost[b], one)) == want_total


def test_invalid_slots_do_not_change_the_valid_assignment():
  """Same answer as on the compacted matrix, whatever the invalid slots hold or where they are."""
  rng = np.random.default_rng(3)
  compact = rng.integers(0, 4, size=(50, 12, 4)).astype(np.float32)  # ties included
  base = _solve(jnp.asarray(compact), jnp.ones((50, 4), bool))
  padded = np.full((50, 12, 9), -1e6, np.float32)  # very attractive garbage in invalid slots
  slots = np.array([1, 2, 5, 8])
  padded[:, :, slots] = compact
  padded[:, :, 0] = np.inf
  valid = np.zeros((50, 9), bool)
  valid[:, slots] = True
  got = _solve(jnp.asarray(padded), jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got.query_for_target)[:, slots],
                                np.asarray(base.query_for_target))
  np.testing.assert_array_equal(np.asarray(got.query_matched), np.asarray(base.query_matched))


def test_no_valid_target_matches_nothing():
  got = _solve(jnp.ones((3, 10, 4)), jnp.zeros((3, 4), bool))
  assert not np.asarray(got.query_matched).any()
  assert (np.asarray(got.query_for_target) == -1).all()
  assert (np.asarray(got.target_for_query) == -1).all()


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match=r"target_valid has shape \(2,\)"):
    matching.linear_sum_assignment(jnp.zeros((4, 3)), jnp.ones((2,), bool))
  with pytest.raises(ValueError, match="cost must be"):
    matching.linear_sum_assignment(jnp.zeros((4,)))


def test_nan_costs_still_give_a_one_to_one_matching():
  """A diverged model (NaN costs) must not hang the bounded loops or break the matching."""
  cost = np.random.default_rng(5).normal(size=(4, 10, 3)).astype(np.float32)
  cost[0, :, 1] = np.nan
  cost[1] = np.nan
  cost[2, 3, 0] = np.inf
  valid = np.ones((4, 3), bool)
  got = _solve(jnp.asarray(cost), jnp.asarray(valid))
  for b in range(4):
    _check_consistent(_unbatch(got, b), valid[b])


# ----------------------------------------------------------------------------------------------
# More target slots than queries (gRefCOCO: N = 20 queries, K = 32 slots)


def _valid_counts(num_targets, batch, rng):
  """(batch, K) validity masks whose counts run over 0..K, with holes anywhere."""
  valid = np.zeros((batch, num_targets), bool)
  for b in range(batch):
    valid[b, rng.choice(num_targets, b % (num_targets + 1), replace=False)] = True
  return valid


@pytest.mark.parametrize("num_queries,num_targets", [(1, 3), (5, 9), (20, 32)])
def test_more_slots_than_queries_match_scipy(num_queries, num_targets):
  """Static K > N; V < N, V == N, N < V < K, V == K and V == 0 all occur, garbage in the
  invalid slots; tie-free costs, so the assignment itself must equal scipy's."""
  rng = np.random.default_rng(10 * num_queries + num_targets)
  batch = 3 * (num_targets + 1)
  valid = _valid_counts(num_targets, batch, rng)
  counts = valid.sum(1)
  assert {0, num_queries, num_targets} <= set(counts)
  assert ((counts > 0) & (counts < num_queries)).any() or num_queries == 1
  assert ((counts > num_queries) & (counts < num_targets)).any()
  cost = rng.normal(size=(batch, num_queries, num_targets)).astype(np.float32)
  cost = np.where(valid[:, None, :], cost, np.nan)  # invalid slots hold garbage
  _assert_equals_scipy(cost, valid)


def test_more_slots_than_queries_unbatched_jit():
  """Without vmap the orientation is a real lax.cond: both branches, one compiled program."""
  solve_one = jax.jit(matching.linear_sum_assignment)
  rng = np.random.default_rng(11)
  for count in (0, 3, 6, 7, 11):  # N = 6 queries, K = 11 slots
    valid = np.zeros(11, bool)
    valid[rng.choice(11, count, replace=False)] = True
    cost = rng.random((6, 11)).astype(np.float32) * 10.0 ** rng.integers(-2, 3)
    one = solve_one(jnp.asarray(cost), jnp.asarray(valid))
    one = matching.Assignment(*(np.asarray(field) for field in one))
    _check_consistent(one, valid)
    want_total, want_query = _scipy_reference(cost, valid)
    np.testing.assert_array_equal(one.query_for_target, want_query, err_msg=f"V={count}")
    np.testing.assert_allclose(float(matching.assignment_cost(cost, one)), want_total,
                               rtol=1e-5)


def test_more_slots_than_queries_ignore_invalid_slots():
  """Very attractive garbage (and inf) in the invalid slots changes nothing, V > N and V < N."""
  rng = np.random.default_rng(13)
  for count in (3, 7):  # N = 5 queries
    compact = rng.normal(size=(40, 5, count)).astype(np.float32)
    slots = np.sort(rng.choice(12, count, replace=False))
    padded = np.full((40, 5, 12), -1e6, np.float32)
    padded[:, :, slots] = compact
    padded[:, 0, [s for s in range(12) if s not in slots][0]] = np.inf
    valid = np.zeros((40, 12), bool)
    valid[:, slots] = True
    got = _solve(jnp.asarray(padded), jnp.asarray(valid))
    for b in range(40):
      _, want_query = _scipy_reference(compact[b], np.ones(count, bool))
      np.testing.assert_array_equal(np.asarray(got.query_for_target)[b, slots], want_query)
      assert (np.asarray(got.query_for_target)[b, ~valid[b]] == -1).all()


def test_more_slots_than_queries_nan_costs_stay_one_to_one():
  cost = np.random.default_rng(14).normal(size=(4, 3, 8)).astype(np.float32)
  valid = np.ones((4, 8), bool)
  valid[2, 2:] = False  # V = 2 < N
  cost[0, :, 1] = np.nan
  cost[1] = np.nan
  cost[2, 0, 0] = np.nan
  cost[3, 1, 4] = np.inf
  got = _solve(jnp.asarray(cost), jnp.asarray(valid))
  for b in range(4):
    one = _unbatch(got, b)
    q = np.asarray(one.query_for_target)
    assert (q[~valid[b]] == -1).all()
    assert len(set(q[q >= 0])) == (q >= 0).sum()  # distinct queries
    target_of = np.asarray(one.target_for_query)
    for k in np.flatnonzero(q >= 0):
      assert target_of[q[k]] == k
    np.testing.assert_array_equal(np.asarray(one.query_matched), target_of >= 0)
  _check_consistent(_unbatch(got, 3), valid[3])  # inf is just a bad pair: full matching
