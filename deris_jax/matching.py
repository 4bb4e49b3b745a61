"""Exact linear-sum assignment (Hungarian matching) in pure JAX, usable under `jit` and `vmap`.

The official DeRIS matches queries to targets with `scipy.optimize.linear_sum_assignment` on
the host, one image at a time. Here the same optimum is found on the device with the
shortest-augmenting-path Hungarian algorithm (Kuhn-Munkres with Jonker-Volgenant potentials,
O(K * N^2)): one target row is inserted per outer step, and the Dijkstra-like search over the
N query columns is vectorised, so every step is a few length-N vector ops inside `lax` loops.

Shapes are static: targets are padded to a fixed `Kmax <= N` and carry a validity mask. An
invalid target row is skipped entirely (never inserted, never on an augmenting path), so the
assignment of the valid targets is exactly the one the algorithm computes on the valid rows
alone; with 0 valid targets nothing is matched.

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
      slot (mask it with `target_valid` before using it as an index).
    target_valid: (K,) bool, the target slots that took part (= the input validity).
    query_matched: (N,) bool, whether each query got a target.
    target_for_query: (N,) int32, the target slot of each query, -1 if unmatched.
  """
  query_for_target: jax.Array
  target_valid: jax.Array
  query_matched: jax.Array
  target_for_query: jax.Array


def _insert_row(row, state, cost, inf):
  """One Hungarian phase: insert target `row` (1-based) along a shortest augmenting path.

  Column 0 is a virtual column holding the row being inserted; `owner[j]` is the 1-based row
  that owns column j (0 = free); `u`, `v` are the row / column potentials.
  """
  u, v, owner = state
  n_cols = v.shape[0]  # N + 1
  owner = owner.at[0].set(row)

  def search_cond(carry):
    _, _, owner, _, _, _, col, steps = carry
    return (owner[col] != 0) & (steps < n_cols)  # stop at a free column (bounded for safety)

  def search_step(carry):
    u, v, owner, way, min_slack, used, col, steps = carry
    used = used.at[col].set(True)
    r = owner[col]  # the row whose edges are scanned now (1-based)
    slack = cost[r - 1] - u[r] - v[1:]  # (N,) reduced costs of row r
    slack = jnp.concatenate([jnp.full((1,), inf, slack.dtype), slack])  # (N+1,)
    better = (~used) & (slack < min_slack)
    min_slack = jnp.where(better, slack, min_slack)
    way = jnp.where(better, col, way)
    candidate = jnp.where(used, inf, min_slack)  # (N+1,)
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


def linear_sum_assignment(cost: jax.Array, target_valid: Optional[jax.Array] = None) -> Assignment:
  """Minimum-cost matching of every valid target to a distinct query.

  Same optimum as `scipy.optimize.linear_sum_assignment(cost[:, valid])` (rows = queries).
  Jit- and vmap-friendly; no host callback.

  Args:
    cost: (N, K) float cost of matching query n to target slot k, K <= N. Entries of invalid
      target slots are ignored (they may be anything, NaN included).
    target_valid: (K,) bool, which target slots are real; default all.
  Returns:
    An `Assignment`.
  """
  if cost.ndim != 2:
    raise ValueError(f"linear_sum_assignment: cost must be (N queries, K targets), got shape "
                     f"{cost.shape}")
  num_queries, num_targets = cost.shape
  if num_targets > num_queries:
    raise ValueError(f"linear_sum_assignment: K={num_targets} target slots exceed "
                     f"N={num_queries} queries; every target must get its own query")
  if target_valid is None:
    target_valid = jnp.ones((num_targets,), bool)
  if target_valid.shape != (num_targets,):
    raise ValueError(f"linear_sum_assignment: target_valid has shape {target_valid.shape}, "
                     f"expected ({num_targets},) to match cost {cost.shape}")
  target_valid = target_valid.astype(bool)
  if num_targets == 0:
    return Assignment(jnp.zeros((0,), jnp.int32), target_valid, jnp.zeros((num_queries,), bool),
                      jnp.full((num_queries,), -1, jnp.int32))

  cost = cost.astype(jnp.float32)
  rows = jnp.where(target_valid[:, None], cost.T, 0.0)  # (K, N): rows = targets
  inf = jnp.float32(jnp.inf)
  state = (jnp.zeros((num_targets + 1,), jnp.float32),  # u: row potentials, 1-based
           jnp.zeros((num_queries + 1,), jnp.float32),  # v: column potentials, 1-based
           jnp.zeros((num_queries + 1,), jnp.int32))  # owner: row of each column, 0 = free

  def outer(k, state):
    return jax.lax.cond(target_valid[k], lambda s: _insert_row(k + 1, s, rows, inf),
                        lambda s: s, state)

  _, _, owner = jax.lax.fori_loop(0, num_targets, outer, state)
  owner = owner[1:]  # (N,) 1-based target row per query, 0 = unmatched
  query_matched = owner > 0
  target_for_query = jnp.where(query_matched, owner - 1, -1).astype(jnp.int32)
  query_for_target = jnp.full((num_targets,), -1, jnp.int32).at[
      jnp.where(query_matched, owner - 1, num_targets)].set(
          jnp.arange(num_queries, dtype=jnp.int32), mode="drop")
  return Assignment(query_for_target, target_valid, query_matched, target_for_query)


def assignment_cost(cost: jax.Array, assignment: Assignment) -> jax.Array:
  """Total cost of the valid (query, target) pairs of `assignment`; () float32."""
  query = jnp.maximum(assignment.query_for_target, 0)  # (K,)
  picked = jnp.take_along_axis(cost.astype(jnp.float32), query[None, :], axis=0)[0]  # (K,)
  return jnp.sum(jnp.where(assignment.target_valid, picked, 0.0))
