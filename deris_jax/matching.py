"""Exact linear-sum assignment (Hungarian matching) in pure JAX, usable under `jit` and `vmap`.

The official DeRIS matches queries to targets with `scipy.optimize.linear_sum_assignment` on
the host, one image at a time, on the N queries x K_valid targets cost matrix: with
K_valid <= N every target gets its own query, with K_valid > N (gRefCOCO expressions with many
instances) every query gets a target and K_valid - N targets stay unmatched. Here the same
optimum (a matching of size min(N, K_valid) of minimum total cost) is found on the device with
the shortest-augmenting-path Hungarian algorithm (Kuhn-Munkres with Jonker-Volgenant
potentials): one row of the smaller side is inserted per outer step, and the Dijkstra-like
search over the columns is vectorised, so every step is a few vector ops inside `lax` loops.

Shapes are static: targets are padded to a fixed K slots and carry a validity mask V (dynamic).
- Static K <= N (RefCOCO): target rows are inserted into the N query columns, O(K * N^2). An
  invalid target row is skipped entirely (never inserted, never on an augmenting path), so
  the assignment of the valid targets is exactly the one computed on the valid rows alone.
- Static K > N: two orientations, chosen per matrix by the number of valid targets V (under
  `vmap` both run and a select keeps one; each is a few hundred tiny vector ops):
  V <= N: the valid target rows are moved to the front (stable) and the first N slots are
    solved as above; V > N: the N query rows are inserted into the K target columns, the
    invalid columns masked out of the search (infinite reduced cost, never reached).
With 0 valid targets nothing is matched.

Ties: any optimal assignment is correct, and which one is returned among equal-cost optima
may differ from scipy's; on tie-free cost matrices the assignment is the unique optimum.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Assignment(NamedTuple):
  """The result of `linear_sum_assignment` for one (N queries, K targets) cost matrix.

  Attributes:
    query_for_target: (K,) int32, the query matched to each target slot; -1 for an invalid
      slot and for a valid target left unmatched (only possible when more than N targets are
      valid). Mask it with `target_matched` before using it as an index.
    target_valid: (K,) bool, the target slots that took part (= the input validity).
    query_matched: (N,) bool, whether each query got a target.
    target_for_query: (N,) int32, the target slot of each query, -1 if unmatched.
    target_matched: (K,) bool, whether each target slot got a query (= query_for_target >= 0;
      implies target_valid; equals it whenever at most N targets are valid).
  """
  query_for_target: jax.Array
  target_valid: jax.Array
  query_matched: jax.Array
  target_for_query: jax.Array
  target_matched: jax.Array


def _insert_row(row, state, cost, inf, col_valid=None):
  """One Hungarian phase: insert row `row` (1-based) along a shortest augmenting path.

  Column 0 is a virtual column holding the row being inserted; `owner[j]` is the 1-based row
  that owns column j (0 = free); `u`, `v` are the row / column potentials. Columns with
  `col_valid` False (if given) have infinite reduced cost: never scanned, never reached.
  """
  u, v, owner = state
  n_cols = v.shape[0]  # columns + 1
  owner = owner.at[0].set(row)

  def search_cond(carry):
    _, _, owner, _, _, _, col, steps = carry
    return (owner[col] != 0) & (steps < n_cols)  # stop at a free column (bounded for safety)

  def search_step(carry):
    u, v, owner, way, min_slack, used, col, steps = carry
    used = used.at[col].set(True)
    r = owner[col]  # the row whose edges are scanned now (1-based)
    slack = cost[r - 1] - u[r] - v[1:]  # (C,) reduced costs of row r
    if col_valid is not None:
      slack = jnp.where(col_valid, slack, inf)  # (C,)
    slack = jnp.concatenate([jnp.full((1,), inf, slack.dtype), slack])  # (C+1,)
    better = (~used) & (slack < min_slack)
    min_slack = jnp.where(better, slack, min_slack)
    way = jnp.where(better, col, way)
    candidate = jnp.where(used, inf, min_slack)  # (C+1,)
    next_col = jnp.argmin(candidate).astype(jnp.int32)
    delta = candidate[next_col]
    # Rows in the search tree (the owners of used columns, distinct) gain delta; used columns
    # lose it; the tentative distances of the other columns shrink by it.
    u = u.at[owner].add(jnp.where(used, delta, 0.0))
    v = jnp.where(used, v - delta, v)
    min_slack = jnp.where(used, min_slack, min_slack - delta)
    return u, v, owner, way, min_slack, used, next_col, steps + 1

  init = (u, v, owner, jnp.zeros((n_cols,), jnp.int32), jnp.full((n_cols,), inf, cost.dtype),
          jnp.zeros((n_cols,), bool), jnp.int32(0), jnp.int32(0))
  u, v, owner, way, _, _, free_col, _ = jax.lax.while_loop(search_cond, search_step, init)

  # Flip the alternating path from the free column back to the virtual column 0.
  def flip_cond(carry):
    _, col, steps = carry
    return (col != 0) & (steps < n_cols)

  def flip_step(carry):
    owner, col, steps = carry
    prev = way[col]
    return owner.at[col].set(owner[prev]), prev, steps + 1

  owner, _, _ = jax.lax.while_loop(flip_cond, flip_step, (owner, free_col, jnp.int32(0)))
  return u, v, owner


def _assign_rows(rows: jax.Array, row_valid: jax.Array, col_valid=None) -> jax.Array:
  """Inserts every valid row of `rows` (R, C) (needs #valid rows <= #valid columns).

  Returns owner (C,) int32: the 1-based row owning each column, 0 = free.
  """
  num_rows, num_cols = rows.shape
  inf = jnp.float32(jnp.inf)
  state = (jnp.zeros((num_rows + 1,), jnp.float32),  # u: row potentials, 1-based
           jnp.zeros((num_cols + 1,), jnp.float32),  # v: column potentials, 1-based
           jnp.zeros((num_cols + 1,), jnp.int32))  # owner: row of each column, 0 = free

  def outer(i, state):
    return jax.lax.cond(row_valid[i], lambda s: _insert_row(i + 1, s, rows, inf, col_valid),
                        lambda s: s, state)

  _, _, owner = jax.lax.fori_loop(0, num_rows, outer, state)
  return owner[1:]


def _more_targets_than_queries(cost: jax.Array, target_valid: jax.Array) -> Assignment:
  """The static K > N case: picks the orientation by the number of valid targets."""
  num_queries, num_targets = cost.shape

  def few_targets(_):  # V <= N: valid target rows first, the first N slots as rows
    slots = jnp.argsort(~target_valid, stable=True)[:num_queries].astype(jnp.int32)  # (N,)
    rows_valid = target_valid[slots]  # (N,)
    rows = jnp.where(rows_valid[:, None], cost.T[slots], 0.0)  # (N, N): rows = targets
    owner = _assign_rows(rows, rows_valid)  # (N,) per query: 1-based compact row, 0 = free
    return jnp.where(owner > 0, slots[jnp.maximum(owner - 1, 0)], -1)  # (N,) target slot

  def many_targets(_):  # V > N: query rows into the valid target columns
    rows = jnp.where(target_valid[None, :], cost, 0.0)  # (N, K): rows = queries
    owner = _assign_rows(rows, jnp.ones((num_queries,), bool), target_valid)  # (K,)
    query_for_target = jnp.where(target_valid & (owner > 0), owner - 1, -1)  # (K,)
    return jnp.full((num_queries,), -1, jnp.int32).at[
        jnp.where(query_for_target >= 0, query_for_target, num_queries)].set(
            jnp.arange(num_targets, dtype=jnp.int32), mode="drop")  # (N,) target slot

  num_valid = jnp.sum(target_valid.astype(jnp.int32))
  target_for_query = jax.lax.cond(num_valid > num_queries, many_targets, few_targets, None)
  # One-to-one by construction (a diverged, NaN-cost search cannot break it): each valid slot
  # keeps at most one query, then each query keeps the slot that kept it.
  target_ok = (target_for_query >= 0) & target_valid[jnp.maximum(target_for_query, 0)]  # (N,)
  query_for_target = jnp.full((num_targets,), -1, jnp.int32).at[
      jnp.where(target_ok, target_for_query, num_targets)].set(
          jnp.arange(num_queries, dtype=jnp.int32), mode="drop")  # (K,)
  target_for_query = jnp.full((num_queries,), -1, jnp.int32).at[
      jnp.where(query_for_target >= 0, query_for_target, num_queries)].set(
          jnp.arange(num_targets, dtype=jnp.int32), mode="drop")  # (N,)
  return Assignment(query_for_target, target_valid, target_for_query >= 0, target_for_query,
                    query_for_target >= 0)


def linear_sum_assignment(cost: jax.Array, target_valid: Optional[jax.Array] = None) -> Assignment:
  """Minimum-cost matching of size min(N, #valid targets) between queries and valid targets.

  Same optimum as `scipy.optimize.linear_sum_assignment(cost[:, valid])` (rows = queries):
  every valid target gets a distinct query when at most N are valid, otherwise every query
  gets a distinct valid target. Jit- and vmap-friendly; no host callback.

  Args:
    cost: (N, K) float cost of matching query n to target slot k, any static K (K > N
      included). Entries of invalid target slots are ignored (they may be anything, NaN
      included).
    target_valid: (K,) bool, which target slots are real; default all.
  Returns:
    An `Assignment`.
  """
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment: cost must be (N queries, K targets), got shape "
                     f"{cost.shape}")
  num_queries, num_targets = cost.shape
  if target_valid is None:
    target_valid = jnp.ones((num_targets,), bool)
  if target_valid.shape != (num_targets,):
    raise ValueError(f"linear_sum_assignment: target_valid has shape {target_valid.shape}, "
                     f"expected ({num_targets},) to match cost {cost.shape}")
  target_valid = target_valid.astype(bool)
  if num_targets == 0 or num_queries == 0:
    return Assignment(jnp.full((num_targets,), -1, jnp.int32), target_valid,
                      jnp.zeros((num_queries,), bool), jnp.full((num_queries,), -1, jnp.int32),
                      jnp.zeros((num_targets,), bool))

  cost = cost.astype(jnp.float32)
  if num_targets > num_queries:
    return _more_targets_than_queries(cost, target_valid)

  rows = jnp.where(target_valid[:, None], cost.T, 0.0)  # (K, N): rows = targets
  owner = _assign_rows(rows, target_valid)  # (N,) 1-based target row per query, 0 = unmatched
  query_matched = owner > 0
  target_for_query = jnp.where(query_matched, owner - 1, -1).astype(jnp.int32)
  query_for_target = jnp.full((num_targets,), -1, jnp.int32).at[
      jnp.where(query_matched, owner - 1, num_targets)].set(
          jnp.arange(num_queries, dtype=jnp.int32), mode="drop")
  return Assignment(query_for_target, target_valid, query_matched, target_for_query,
                    query_for_target >= 0)


def assignment_cost(cost: jax.Array, assignment: Assignment) -> jax.Array:
  """Total cost of the matched (query, target) pairs of `assignment`; () float32."""
  query = jnp.maximum(assignment.query_for_target, 0)  # (K,)
  picked = jnp.take_along_axis(cost.astype(jnp.float32), query[None, :], axis=0)[0]  # (K,)
  return jnp.sum(jnp.where(assignment.target_valid & assignment.target_matched, picked, 0.0))
