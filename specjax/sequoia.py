"""Sequoia's optimal token trees (Chen et al. 2024, arXiv 2402.12374).

**The acceptance model.** At a node the verifier tries the node's children in rank
order (:func:`specjax.verify.verify_tree`) and accepts at most one. Sequoia's
*positional acceptance* assumption is that whether the rank-r child is accepted depends
only on r::

  accept[r] = P(rank-r child accepted | the children of ranks < r were rejected)

independently at every node and level. The probability that the rank-r child is *the*
accepted one (given its parent was reached) is then::

  m[r] = accept[r] * prod_{s < r} (1 - accept[s])          (rank_probabilities)

which does not depend on how many siblings come after it. A node is reached iff every
edge on its path was taken, so the expected number of accepted drafts of a tree is::

  F(tree) = sum_{v != root} prod_{edges (u, w) on root..v} m[rank(w)]

(tokens per round = 1 + F: the verifier always adds one target token). Ranks at or
beyond ``len(accept)`` are never accepted (m = 0).

Sequoia ships ``m`` itself (its measured vector is "fraction of steps where the k-th
child was the accepted one"); ``accept`` is its conditional form, the one that
:func:`estimate_acceptance_vector` measures from verification events and that stays
meaningful for any number of children.

**The DP.** With ``c(n, d)`` the best F over trees of exactly n nodes (root included)
and depth <= d::

  c(1, d) = 0
  c(n, d) = max over child sizes a_0, a_1, ... >= 1 with sum a_r = n - 1 of
            sum_r m[r] * (1 + c(a_r, d - 1))

solved rank by rank (a (max, +) convolution per rank and depth), O(N^2 * D * K) for N
nodes, depth D and K = len(accept). Nodes beyond what can earn value (ranks >= K)
still count towards n; the tree puts them as extra zero-value leaves of the root.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from specjax import drafts, sampling, verify
from specjax.tree import TokenTree

# Positional acceptance of SmolLM2-135M's streaming self-draft (16 sinks, 512-position
# budget) on standard-library source, greedy, measured by ``python -m
# experiments.acceptance`` (experiments/results/acceptance_smollm2.json, 2026-11-22:
# 512 / 24 / 6 tries at ranks 0 / 1 / 2; ranks tried fewer than 5 times dropped).
# The default for optimal trees when no vector is given.
DEFAULT_ACCEPTANCE = (0.953, 0.75, 0.333)


def _check_accept(accept) -> np.ndarray:
  a = np.asarray(accept, np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"accept must be a non-empty 1-D vector, got shape {a.shape}.")
  if not np.all((a >= 0.0) & (a <= 1.0)):
    raise ValueError(f"accept entries must be probabilities in [0, 1], got {a}.")
  return a


def rank_probabilities(accept) -> np.ndarray:
  """f64[K]: m[r], the probability that the rank-r child is the accepted one.

  Args:
    accept: f[K], the positional acceptance vector (conditional, see the module doc).
  """
  a = _check_accept(accept)
  rejected_before = np.concatenate([[1.0], np.cumprod(1.0 - a)[:-1]])
  return a * rejected_before


def expected_accepted(tree: TokenTree, accept) -> float:
  """Expected number of accepted drafts in one round: F(tree) in the module doc.

  Exact under the positional acceptance model: each child of a reached node is tried
  in rank order, the rank-r one accepted with probability ``accept[r]`` given that all
  earlier siblings were rejected, at most one child per node accepted. Children of
  rank >= len(accept) are never accepted.

  Args:
    tree: the token tree; its root is not a draft and is not counted.
    accept: f[K], the positional acceptance vector.

  Returns:
    E[accepted drafts], in [0, tree.max_depth].
  """
  m = np.concatenate([rank_probabilities(accept), np.zeros(tree.size)])
  reach = np.ones(tree.size)
  for i, parent in enumerate(tree.parents[1:], start=1):
    reach[i] = reach[parent] * m[tree.child_rank[i]]
  return float(reach[1:].sum())


@functools.lru_cache(maxsize=64)
def _solve(n_max: int, max_depth: int, accept: tuple[float, ...]):
  """The DP tables for sizes <= n_max and depths <= max_depth (read-only).

  Returns:
    value: f64[n_max + 1, max_depth + 1], c(n, d) (-inf where no tree exists);
    choice: i64[max_depth + 1, K, n_max + 1], at depth limit d, rank r with n nodes
      still to place under the current root: the size of the rank-r child's subtree.
  """
  m = rank_probabilities(accept)
  K = len(m)
  N = n_max
  value = np.full((N + 1, max_depth + 1), -np.inf)
  value[1, :] = 0.0
  choice = np.zeros((max_depth + 1, K, N + 1), np.int64)
  sizes = np.arange(N + 1)
  a = sizes[None, :]  # child subtree size
  rest = sizes[:, None] - a  # nodes left for the later ranks
  for d in range(1, max_depth + 1):
    sub = value[:, d - 1]  # c(a, d - 1)
    feasible = np.isfinite(sub)
    # g[n]: best value of n nodes placed as children of ranks r, r + 1, ...; from rank K
    # on nothing is accepted, so any number of nodes goes there as zero-value leaves.
    g = np.zeros(N + 1)
    for r in range(K - 1, -1, -1):
      gain = np.where(feasible, m[r] * (1.0 + np.where(feasible, sub, 0.0)), -np.inf)
      total = np.where((a >= 1) & (rest >= 0),
                       gain[None, :] + g[np.clip(rest, 0, N)], -np.inf)  # [n, a]
      best = np.argmax(total, axis=1)
      choice[d, r] = best
      g = np.where(sizes == 0, 0.0, total[sizes, best])
    value[1:, d] = g[:-1]  # n nodes = the root + n - 1 below it
  value.flags.writeable = False
  choice.flags.writeable = False
  return value, choice


def _check_budget(n: int, max_depth: int):
  if n < 1:
    raise ValueError(f"n={n} must be >= 1 (the tree size counts the root).")
  if max_depth < 0:
    raise ValueError(f"max_depth={max_depth} must be >= 0.")
  if n > 1 and max_depth == 0:
    raise ValueError(f"A tree of n={n} nodes needs max_depth >= 1; depth 0 holds only"
                     " the root.")


def optimal_values(n_max: int, max_depth: int, accept) -> np.ndarray:
  """The best expected accepted drafts for every tree budget up to (n_max, max_depth).

  Args:
    n_max: the largest tree size, root included.
    max_depth: the largest depth limit.
    accept: f[K], the positional acceptance vector.

  Returns:
    f64[n_max + 1, max_depth + 1]: ``[n, d]`` = max F over trees of exactly n nodes
    and depth <= d, -inf where there is none (n = 0, or n > 1 with d = 0). For a
    hardware-aware choice of (n, d) by the cost of verifying n tokens and drafting d
    levels.
  """
  _check_budget(n_max, max_depth)
  a = tuple(float(x) for x in _check_accept(accept))
  depth = min(max_depth, n_max - 1)
  value, _ = _solve(n_max, depth, a)
  out = np.empty((n_max + 1, max_depth + 1))
  out[:, :depth + 1] = value
  out[:, depth + 1:] = value[:, depth:]  # deeper limits cannot help past n - 1
  return out


def optimal_tree(n: int, max_depth: int, accept) -> TokenTree:
  """The tree of exactly ``n`` nodes (root included) and depth <= ``max_depth`` that
  maximises :func:`expected_accepted`.

  Nodes come out level by level (every depth's nodes contiguous, each node's children
  contiguous and in rank order), the order level-wise drafting wants.

  Args:
    n: tree size, root included (n - 1 drafted tokens per round).
    max_depth: the deepest draft level (the number of draft forwards per round).
    accept: f[K], the positional acceptance vector.

  Returns:
    The optimal TokenTree; ties are broken deterministically.
  """
  _check_budget(n, max_depth)
  a = tuple(float(x) for x in _check_accept(accept))
  depth = min(max_depth, n - 1)
  _, choice = _solve(n, depth, a)
  K = len(a)

  def subtree_sizes(size, d):  # children's subtree sizes, in rank order
    sizes, left = [], size - 1
    for r in range(K):
      if left == 0:
        break
      sizes.append(int(choice[d, r, left]))
      left -= sizes[-1]
    return sizes + [1] * left  # zero-value leaves at ranks >= K

  parents = [-1]
  frontier = [(0, n, depth)]  # (node id, subtree size, depth budget), one level
  while frontier:
    next_frontier = []
    for node, size, d in frontier:
      for s in subtree_sizes(size, d):
        parents.append(node)
        next_frontier.append((len(parents) - 1, s, d - 1))
    frontier = next_frontier
  return TokenTree(tuple(parents))


def estimate_acceptance_vector(ranks, accepted, width: int) -> np.ndarray:
  """The positional acceptance vector from verification events.

  One event is one child tried by the verifier: its rank and whether it was accepted.
  A node whose rank-b child was accepted gives events (0, False) .. (b - 1, False),
  (b, True); a node whose W children were all rejected gives (0, False) ..
  (W - 1, False) (Sequoia measures with one-level trees of width W).

  Args:
    ranks: int[E], the rank of each tried child.
    accepted: bool[E], whether it was accepted.
    width: K, the length of the vector; events of rank >= K are ignored.

  Returns:
    f64[K]: accepted / tried per rank; 0 for a rank never tried (never worth a node).
  """
  ranks = np.asarray(ranks).reshape(-1)
  accepted = np.asarray(accepted, bool).reshape(-1)
  if ranks.shape != accepted.shape:
    raise ValueError(f"ranks and accepted must have one entry per event, got"
                     f" {ranks.size} and {accepted.size}.")
  if width < 1:
    raise ValueError(f"width={width} must be >= 1.")
  if ranks.size and ranks.min() < 0:
    raise ValueError(f"ranks must be >= 0, got {ranks.min()}.")
  keep = ranks < width
  tried = np.bincount(ranks[keep], minlength=width)
  hits = np.bincount(ranks[keep], weights=accepted[keep], minlength=width)
  return np.where(tried > 0, hits / np.maximum(tried, 1), 0.0)


def acceptance_events(key: jax.Array,
                      target_logits: jax.Array,  # f32[R, V]
                      draft_logits: jax.Array,  # f32[R, V]
                      width: int,
                      sp: sampling.SamplingParams,
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Verification events of one-level trees, the way Sequoia measures acceptance.

  At each of R positions the draft proposes ``width`` ranked children (its top tokens
  when greedy, samples without replacement otherwise: ``drafts.rank_children``) and
  the engine's own verifier (``verify.verify_tree`` on a star tree) accepts one of
  them or none.

  Returns:
    (ranks, accepted) for :func:`estimate_acceptance_vector`.
  """
  R = target_logits.shape[0]
  star = TokenTree((-1,) + (0,) * width)
  key_draft, key_verify = jax.random.split(key)
  q = sampling.probabilities(draft_logits, sp)
  kids = drafts.rank_children(key_draft, draft_logits[:, None], q[:, None], width, sp)[:, 0]
  tokens = jnp.concatenate([jnp.zeros((R, 1), jnp.int32), kids], axis=1)
  zeros = jnp.zeros((R, width) + q.shape[1:], q.dtype)
  p = sampling.probabilities(target_logits, sp)
  path, _, _ = jax.jit(verify.verify_tree, static_argnums=1)(
      key_verify, star, tokens, jnp.concatenate([q[:, None], zeros], 1),
      jnp.concatenate([p[:, None], zeros], 1))
  winner = np.asarray(path[:, 1]) - 1  # the accepted child's rank, or -2 for none
  tried = np.where(winner >= 0, winner + 1, width)  # children tried per position
  ranks = np.concatenate([np.arange(t) for t in tried])
  accepted = np.concatenate([np.arange(t) == w for t, w in zip(tried, winner)])
  return ranks, accepted
