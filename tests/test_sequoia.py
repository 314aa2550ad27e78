"""Sequoia's tree DP: exact against brute force, its objective against simulation."""

import itertools
import time

import numpy as np
import pytest

from specjax import sequoia
from specjax.tree import TokenTree

DOC = TokenTree((-1, 0, 0, 0, 1, 1, 3, 4))  # tree.py's docstring example


def _all_trees(n):
  """Every parents array of n nodes in topological order: every ordered tree (with
  siblings ranked by id) appears, most of them several times."""
  for tail in itertools.product(*[range(i) for i in range(1, n)]):
    yield TokenTree((-1,) + tail)


ACCEPT_VECTORS = [
    [0.7, 0.5, 0.3, 0.2],
    [0.9],  # only first children are ever accepted
    [0.2, 0.9, 0.9],  # m not decreasing: the second child beats the first
    [1.0, 0.5],  # a first child is always accepted: nothing else is reached
    [0.0, 0.0],
] + [list(np.random.default_rng(s).uniform(0, 1, size=s + 1)) for s in range(1, 5)]


@pytest.mark.parametrize("accept", ACCEPT_VECTORS)
def test_dp_equals_brute_force(accept):
  for n in range(1, 8):
    trees = list(_all_trees(n))
    values = np.array([sequoia.expected_accepted(t, accept) for t in trees])
    depths = np.array([t.max_depth for t in trees])
    table = sequoia.optimal_values(n, n - 1, accept)
    for d in range(1 if n > 1 else 0, n):
      best = values[depths <= d].max()
      tree = sequoia.optimal_tree(n, d, accept)
      assert tree.size == n and tree.max_depth <= d
      assert sequoia.expected_accepted(tree, accept) == pytest.approx(best, abs=1e-12)
      assert table[n, d] == pytest.approx(best, abs=1e-12)


def _simulate(tree, accept, runs, seed=0):
  """Accepted drafts per round under the positional model, by walking the tree."""
  accept = np.concatenate([accept, np.zeros(tree.size)])
  coins = np.random.default_rng(seed).uniform(size=(runs, tree.size))  # one per node
  reached = np.zeros((runs, tree.size), bool)
  reached[:, 0] = True
  for u, kids in enumerate(tree.children):
    taken = ~reached[:, u]  # a row not at u tries none of u's children
    for rank, c in enumerate(kids):
      reached[:, c] = ~taken & (coins[:, c] < accept[rank])
      taken |= reached[:, c]
  return reached[:, 1:].sum(1)


@pytest.mark.parametrize("tree, accept", [
    (DOC, [0.6, 0.5, 0.4]),
    (DOC, [0.9, 0.2]),  # rank 2 (node 3) is never accepted
    (sequoia.optimal_tree(20, 5, [0.5, 0.4, 0.3]), [0.5, 0.4, 0.3]),
])
def test_expected_accepted_matches_simulation(tree, accept):
  runs = 200_000
  sim = _simulate(tree, np.asarray(accept), runs)
  assert sim.mean() == pytest.approx(sequoia.expected_accepted(tree, accept),
                                     abs=5 * sim.std() / np.sqrt(runs))


def test_expected_accepted_by_hand():
  a0, a1, a2 = 0.6, 0.5, 0.4
  m0, m1, m2 = a0, (1 - a0) * a1, (1 - a0) * (1 - a1) * a2
  # Nodes 1..7 of DOC: m0, m1, m2, m0*m0, m0*m1, m2*m0, m0*m0*m0.
  want = m0 + m1 + m2 + m0 * m0 + m0 * m1 + m2 * m0 + m0 ** 3
  assert sequoia.expected_accepted(DOC, [a0, a1, a2]) == pytest.approx(want)
  np.testing.assert_allclose(sequoia.rank_probabilities([a0, a1, a2]), [m0, m1, m2])


@pytest.mark.parametrize("a, gamma", [(0.3, 1), (0.8, 4), (0.95, 10), (1.0, 6)])
def test_chain_value(a, gamma):
  """E[accepted] = a + ... + a^gamma = (1 - a^(gamma+1)) / (1 - a) - 1, and with only
  first children ever accepted the chain is the optimal tree."""
  closed = gamma if a == 1.0 else (1 - a ** (gamma + 1)) / (1 - a) - 1
  assert sequoia.expected_accepted(TokenTree.chain(gamma), [a]) == pytest.approx(closed)
  best = sequoia.optimal_tree(gamma + 1, gamma, [a])
  assert best == TokenTree.chain(gamma)
  assert sequoia.optimal_values(gamma + 1, gamma, [a])[gamma + 1, gamma] == pytest.approx(closed)


def test_depth_one_is_a_star_and_extra_nodes_are_leaves():
  accept = [0.5, 0.5]
  star = sequoia.optimal_tree(6, 1, accept)
  assert star == TokenTree((-1, 0, 0, 0, 0, 0))
  assert sequoia.expected_accepted(star, accept) == pytest.approx(0.75)
  # Depth 2 with ranks 0, 1 worth anything: 2 + 2 * 2 nodes earn value, the rest idle.
  assert sequoia.optimal_values(12, 2, accept)[12, 2] == pytest.approx(0.75 + 0.75 * 0.75)


def test_optimal_tree_is_level_ordered():
  tree = sequoia.optimal_tree(48, 7, [0.6, 0.3, 0.2, 0.1])
  assert np.all(np.diff(tree.depths) >= 0)  # levels contiguous
  assert np.all(np.diff(tree.parents[1:]) >= 0)  # each node's children contiguous
  assert sum(len(level) for level in tree.levels) == 48


def test_large_budget_is_fast():
  accept = np.random.default_rng(3).uniform(0.05, 0.9, size=16)
  sequoia._solve.cache_clear()  # pylint: disable=protected-access
  start = time.perf_counter()
  tree = sequoia.optimal_tree(64, 16, accept)
  assert time.perf_counter() - start < 1.0
  assert tree.size == 64 and tree.max_depth <= 16
  # More nodes or depth never hurt.
  table = sequoia.optimal_values(64, 16, accept)
  assert np.all(np.diff(table[1:, 1:], axis=0) >= -1e-12)
  assert np.all(np.diff(table[2:, 1:], axis=1) >= -1e-12)


def test_estimate_acceptance_vector():
  # Three one-level rounds of width 3: rank 0 accepted; rank 1 accepted; none.
  ranks = [0, 0, 1, 0, 1, 2]
  accepted = [True, False, True, False, False, False]
  np.testing.assert_allclose(sequoia.estimate_acceptance_vector(ranks, accepted, 4),
                             [1 / 3, 1 / 2, 0.0, 0.0])  # rank 3 never tried
  np.testing.assert_allclose(sequoia.estimate_acceptance_vector(ranks, accepted, 1), [1 / 3])


def test_estimate_recovers_simulated_vector():
  """One-level trees of width 3 under the positional model, as Sequoia measures."""
  accept = np.array([0.6, 0.4, 0.3])
  coins = np.random.default_rng(1).uniform(size=(20_000, 3)) < accept
  first = np.where(coins.any(1), np.argmax(coins, axis=1), 3)  # accepted rank, 3: none
  tried = np.minimum(first + 1, 3)
  ranks = np.concatenate([np.arange(t) for t in tried])
  accepted = np.concatenate([np.arange(t) == f for t, f in zip(tried, first)])
  est = sequoia.estimate_acceptance_vector(ranks, accepted, 3)
  np.testing.assert_allclose(est, accept, atol=0.03)


@pytest.mark.parametrize("n, depth, accept, match", [
    (0, 3, [0.5], "n=0"),
    (3, -1, [0.5], "max_depth=-1"),
    (3, 0, [0.5], "max_depth >= 1"),
    (3, 2, [], "non-empty"),
    (3, 2, [[0.5]], "1-D"),
    (3, 2, [1.5], r"\[0, 1\]"),
    (3, 2, [np.nan], r"\[0, 1\]"),
])
def test_validation(n, depth, accept, match):
  with pytest.raises(ValueError, match=match):
    sequoia.optimal_tree(n, depth, accept)


def test_estimate_validation():
  with pytest.raises(ValueError, match="one entry per event"):
    sequoia.estimate_acceptance_vector([0, 1], [True], 2)
  with pytest.raises(ValueError, match="ranks must be >= 0"):
    sequoia.estimate_acceptance_vector([-1], [True], 2)
  with pytest.raises(ValueError, match="width=0"):
    sequoia.estimate_acceptance_vector([0], [True], 0)


def test_acceptance_events_measure_the_rank_of_the_target_choice():
  """Greedy: the draft's rank of the target's argmax decides; sampled: the verifier's
  acceptance of a draft that equals the target is 1 at rank 0."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from specjax import sampling  # pylint: disable=g-import-not-at-top
  V, R = 7, 60
  draft = jax.random.normal(jax.random.key(0), (R, V))
  order = jnp.argsort(-draft, axis=-1)
  rank_of_target = jnp.arange(R) % 4  # the target picks the draft's rank-(r % 4) token
  target = jax.nn.one_hot(jnp.take_along_axis(order, rank_of_target[:, None], 1)[:, 0], V)
  greedy = sampling.SamplingParams()
  ranks, accepted = sequoia.acceptance_events(jax.random.key(1), target * 10, draft, 3,
                                              greedy)
  est = sequoia.estimate_acceptance_vector(ranks, accepted, 3)
  np.testing.assert_allclose(est, [0.25, 1 / 3, 0.5])  # rank 3: never inside width 3
  ranks, accepted = sequoia.acceptance_events(jax.random.key(2), draft, draft, 3,
                                              sampling.SamplingParams(temperature=1.0))
  np.testing.assert_array_equal(ranks, 0)
  assert accepted.all()
