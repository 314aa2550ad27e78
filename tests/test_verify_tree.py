"""Tree verification: the greedy rule by hand, and losslessness by a chi-square test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import sampling, verify
from specjax.tree import TokenTree
from tests.test_speculative import _chi2_critical

DOC = TokenTree((-1, 0, 0, 0, 1, 1, 3, 4))  # tree.py's docstring example
X = 0  # a target argmax that the test does not look at
_verify = jax.jit(verify.verify_tree, static_argnames="tree")


def test_greedy_follows_the_target_argmax():
  V = 8
  onehot = lambda ids: jax.nn.one_hot(jnp.asarray(ids), V)
  tokens = jnp.tile(jnp.arange(8), (6, 1))  # node i holds token i (the root 0)
  # Greedy drafting: each node's draft argmax is its first child.
  first_child = [kids[0] if kids else 0 for kids in DOC.children]
  q = jnp.tile(onehot(first_child)[None], (6, 1, 1))
  argmax = [[1, 5, X, X, X, 3, X, X],  # rank-1 child at depth 2, bonus at leaf 5
            [3, X, X, 6, X, X, 2, X],  # rank-2 child at the root
            [7, X, X, X, X, X, X, X],  # no child matches: the correction is 7
            [1, 4, X, X, 7, X, X, 0],  # the deepest path, bonus at leaf 7
            [2, X, X, X, X, X, X, X],  # a leaf at depth 1
            [1, 6, X, X, X, X, X, X]]  # 6 is not a child of node 1
  for key in (jax.random.key(0), jax.random.key(1)):
    path, n, nxt = _verify(key, tree=DOC, tokens=tokens, q=q, p=onehot(argmax))
    np.testing.assert_array_equal(path, [[0, 1, 5, -1], [0, 3, 6, -1], [0, -1, -1, -1],
                                         [0, 1, 4, 7], [0, 2, -1, -1], [0, 1, -1, -1]])
    np.testing.assert_array_equal(n, [2, 2, 0, 3, 1, 1])
    np.testing.assert_array_equal(nxt, [3, 2, 7, 0, X, 6])


def test_draft_equal_to_target_accepts_every_first_child():
  B, V = 64, 5
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  p = jax.nn.softmax(jax.random.normal(k1, (B, DOC.size, V)), -1)
  tokens = jax.random.randint(k2, (B, DOC.size), 0, V)
  path, n, _ = _verify(k3, tree=DOC, tokens=tokens, q=p, p=p)
  np.testing.assert_array_equal(path, np.tile([0, 1, 4, 7], (B, 1)))
  np.testing.assert_array_equal(n, np.full(B, 3))


def test_lone_root_samples_the_target():
  p = jnp.array([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
  path, n, nxt = verify.verify_tree(jax.random.key(0), TokenTree((-1,)),
                                    jnp.zeros((2, 1), jnp.int32), p, p)
  np.testing.assert_array_equal(path, [[0], [0]])
  np.testing.assert_array_equal(n, [0, 0])
  np.testing.assert_array_equal(nxt, [1, 2])


def test_shape_validation():
  p = jnp.ones((2, 8, 4)) / 4
  with pytest.raises(ValueError, match=r"expected \[B, 8\]"):
    verify.verify_tree(jax.random.key(0), DOC, jnp.zeros((2, 7), jnp.int32), p, p)
  with pytest.raises(ValueError, match="must both be"):
    verify.verify_tree(jax.random.key(0), DOC, jnp.zeros((2, 8), jnp.int32), p[:, :, :3], p)


# ---------------------------------------------------------------------------------------
# Losslessness. The target is a Markov chain over V tokens (the distribution after a
# path depends on its last token), so each node's p and q follow from its own token. A
# round drafts a tree by sampling each node's children without replacement from the
# draft's row and verifies it. Its first two emitted tokens (the second, where the round
# emitted only one, drawn from the target itself) must have the target's joint
# distribution: this checks the first token, and the second given how the first came.

V = 6
ROWS = 20_000


def _markov(seed, sharpness):
  logits = sharpness * jax.random.normal(jax.random.key(seed), (V, V))
  return jax.nn.softmax(logits, -1)


TARGET = _markov(0, 1.5)  # f32[V, V]: TARGET[a] = p(next | last token a)
def _top2(probs):
  keep = jnp.argsort(jnp.argsort(-probs, -1), -1) < 2
  kept = jnp.where(keep, probs, 0.0)
  return kept / kept.sum(-1, keepdims=True)


DRAFTS = {
    "dense": _markov(1, 1.5),
    # Two tokens of support per row: a root's third child is a zero-probability token.
    "sparse": _top2(_markov(2, 1.0)),
    "greedy": jax.nn.one_hot(jnp.argmax(_markov(3, 1.0), -1), V),  # only points
}
ROOT = 2


def _round(key, tree, draft, root):
  """Draft a tree after the tokens root i32[B] and verify it; the emitted tokens."""
  B = root.shape[0]
  tokens = [root] + [None] * (tree.size - 1)
  keys = jax.random.split(key, tree.size + 1)
  for u, kids in enumerate(tree.children):
    if not kids:
      continue
    children = sampling.sample_without_replacement(keys[u], draft[tokens[u]], len(kids))
    for rank, c in enumerate(kids):
      tokens[c] = children[:, rank]
  tokens = jnp.stack(tokens, 1)  # i32[B, n]
  path, n, nxt = verify.verify_tree(keys[-1], tree, tokens, draft[tokens], TARGET[tokens])
  emitted = jnp.take_along_axis(tokens, jnp.maximum(path[:, 1:], 0), 1)
  emitted = jnp.concatenate([emitted, jnp.zeros((B, 1), jnp.int32)], 1)
  emitted = emitted.at[jnp.arange(B), n].set(nxt)
  return emitted, n, path  # emitted[:, :n + 1] are real


def _first_two(seed, tree, draft):
  """Jitted afresh per call, so that a monkeypatched verify rule is traced."""

  @jax.jit
  def run(key):
    k1, k2 = jax.random.split(key)
    emitted, n, path = _round(k1, tree, draft, jnp.full((ROWS,), ROOT, jnp.int32))
    fresh = jax.random.categorical(k2, jnp.log(TARGET[emitted[:, 0]]))
    return emitted[:, 0], jnp.where(n >= 1, emitted[:, 1], fresh), path, n

  return [np.asarray(x) for x in run(jax.random.key(seed))]


def _chi2(cells, probs):
  """Pearson's statistic and degrees of freedom; cells with < 5 expected are pooled."""
  n = len(cells)
  observed = np.bincount(cells, minlength=len(probs))
  expected = np.asarray(probs, np.float64) * n
  big = expected >= 5
  chi2 = np.sum((observed[big] - expected[big]) ** 2 / expected[big])
  rest_e, rest_o = n - expected[big].sum(), n - observed[big].sum()
  if rest_e >= 5:
    chi2 += (rest_o - rest_e) ** 2 / rest_e
  return chi2, int(big.sum()) - (0 if rest_e >= 5 else 1)


def _joint_chi2(seed, tree, draft):
  first, second, path, n = _first_two(seed, tree, draft)
  target = np.asarray(TARGET, np.float64)
  joint = target[ROOT][:, None] * target  # P(t1, t2) = T[root, t1] T[t1, t2]
  return _chi2(first * V + second, joint.reshape(-1) / joint.sum()), path, n


TREES = {"doc": DOC, "wide": TokenTree((-1, 0, 0, 0, 0, 1, 1, 2, 5)),
         "chain": TokenTree.chain(3)}


@pytest.mark.parametrize("tree_name, draft_name", [
    ("doc", "dense"), ("doc", "sparse"), ("doc", "greedy"), ("wide", "dense"),
    ("chain", "dense"),
])
def test_tree_verification_preserves_target_distribution(tree_name, draft_name):
  tree = TREES[tree_name]
  (chi2, df), path, n = _joint_chi2(7, tree, DRAFTS[draft_name])
  assert chi2 < _chi2_critical(df), (chi2, df)
  # The path is a root-to-node walk of n[b] edges, padded with -1.
  assert np.all(path[:, 0] == 0)
  depth = np.arange(tree.max_depth + 1)[None, :]
  np.testing.assert_array_equal(path >= 0, depth <= n[:, None])
  parents = np.asarray(tree.parents)
  inner = path[:, 1:] >= 0
  np.testing.assert_array_equal(parents[path[:, 1:]][inner], path[:, :-1][inner])
  assert 0 < n.mean() < tree.max_depth  # some rows accept, some reject


_AFTER_REJECTION = verify._after_rejection  # pylint: disable=protected-access


def _no_residual(p, q, proposal, x):
  """Wrong on purpose: after a rejection, keep the target instead of its residual."""
  _, q = _AFTER_REJECTION(p, q, proposal, x)
  return p, q


def _no_removal(p, q, proposal, x):
  """Wrong on purpose: verify later siblings as if drawn with replacement."""
  p, _ = _AFTER_REJECTION(p, q, proposal, x)
  return p, q


def _draft_as_is(q, x):
  """Wrong on purpose: no point-mass rule; a zero-probability child is always accepted
  where the target allows it."""
  del x
  return q


@pytest.mark.parametrize("name, broken, tree_name, draft_name", [
    ("_after_rejection", _no_residual, "wide", "dense"),
    ("_after_rejection", _no_removal, "wide", "dense"),
    ("_proposal", _draft_as_is, "doc", "sparse"),
])
def test_distribution_test_detects_broken_verification(name, broken, tree_name, draft_name,
                                                        monkeypatch):
  monkeypatch.setattr(verify, name, broken)
  (chi2, df), _, _ = _joint_chi2(7, TREES[tree_name], DRAFTS[draft_name])
  assert chi2 > _chi2_critical(df), (chi2, df)


# ---------------------------------------------------------------------------------------
# Sampling without replacement, the drafting side of the same contract.


def test_sample_without_replacement_distribution():
  q = jnp.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
  draws = np.asarray(sampling.sample_without_replacement(
      jax.random.key(5), jnp.tile(q, (ROWS, 1)), 2))
  assert np.all(draws[:, 0] != draws[:, 1])
  qn = np.asarray(q, np.float64)
  joint = qn[:, None] * qn[None, :] / (1 - qn[:, None])  # P(first i, then j)
  np.fill_diagonal(joint, 0.0)
  chi2, df = _chi2(draws[:, 0] * V + draws[:, 1], joint.reshape(-1))
  assert chi2 < _chi2_critical(df), (chi2, df)


def test_sample_without_replacement_beyond_the_support():
  q = jnp.array([[0.0, 0.3, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])
  draws = np.asarray(sampling.sample_without_replacement(jax.random.key(0), q, 5))
  assert sorted(draws[0, :2]) == [1, 3]  # the support first ...
  np.testing.assert_array_equal(draws[0, 2:], [0, 2, 4])  # ... then lowest id first
  np.testing.assert_array_equal(draws[1], [4, 0, 1, 2, 3])
  with pytest.raises(ValueError, match="k=6"):
    sampling.sample_without_replacement(jax.random.key(0), q, 6)
