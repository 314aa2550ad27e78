"""TokenTree: the structure arrays and the attention mask, on hand-written trees."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.tree import TokenTree

# The module docstring's example.
DOC = TokenTree((-1, 0, 0, 0, 1, 1, 3, 4))
DOC_MASK = """
1 . . . . . . .
1 1 . . . . . .
1 . 1 . . . . .
1 . . 1 . . . .
1 1 . . 1 . . .
1 1 . . . 1 . .
1 . . 1 . . 1 .
1 1 . . 1 . . 1
"""


def _mask(picture):
  return np.array([[c == "1" for c in line.split()] for line in picture.strip().splitlines()])


def test_docstring_example():
  assert DOC.size == 8 and DOC.max_depth == 3 and DOC.max_children == 3
  np.testing.assert_array_equal(DOC.depths, [0, 1, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(DOC.child_rank, [0, 0, 1, 2, 0, 1, 0, 0])
  np.testing.assert_array_equal(DOC.num_children, [3, 2, 0, 1, 1, 0, 0, 0])
  assert DOC.children == ((1, 2, 3), (4, 5), (), (6,), (7,), (), (), ())
  assert DOC.levels == ((0,), (1, 2, 3), (4, 5, 6), (7,))
  np.testing.assert_array_equal(DOC.ancestor_mask, _mask(DOC_MASK))
  np.testing.assert_array_equal(DOC.child_table[:4], [[1, 2, 3], [4, 5, -1], [-1] * 3,
                                                      [6, -1, -1]])
  assert DOC.path_to(7) == [0, 1, 4, 7] and DOC.path_to(6) == [0, 3, 6]
  assert DOC.path_to(0) == [0]
  # Drafting levels: the nodes that have children, per depth, padded to the widest.
  np.testing.assert_array_equal(DOC.expand_table, [[0, -1], [1, 3], [4, -1]])
  np.testing.assert_array_equal(TokenTree.chain(3).expand_table, [[0], [1], [2]])
  assert TokenTree.chain(0).expand_table.shape == (0, 0)


def test_mask_rows_are_paths():
  """Row i of the mask is exactly path_to(i); depth = row sum - 1; in a
  non-breadth-first order too (node 2 is deeper than node 3)."""
  tree = TokenTree((-1, 0, 1, 0, 2, 3, 2, 4))
  for i in range(tree.size):
    np.testing.assert_array_equal(np.flatnonzero(tree.ancestor_mask[i]), tree.path_to(i))
  np.testing.assert_array_equal(tree.ancestor_mask.sum(1) - 1, tree.depths)
  np.testing.assert_array_equal(tree.depths, [0, 1, 2, 1, 3, 2, 3, 4])
  np.testing.assert_array_equal(tree.child_rank, [0, 0, 0, 1, 0, 0, 1, 0])
  assert tree.levels == ((0,), (1, 3), (2, 5), (4, 6), (7,))


@pytest.mark.parametrize("gamma", [0, 1, 4])
def test_chain(gamma):
  chain = TokenTree.chain(gamma)
  assert chain.size == gamma + 1 and chain.max_depth == gamma
  np.testing.assert_array_equal(chain.depths, np.arange(gamma + 1))
  np.testing.assert_array_equal(chain.ancestor_mask, np.tri(gamma + 1, dtype=bool))
  np.testing.assert_array_equal(chain.child_rank, np.zeros(gamma + 1))
  assert chain.max_children == (1 if gamma else 0)
  assert chain.path_to(gamma) == list(range(gamma + 1))


def test_hashable_static_argument():
  assert TokenTree([-1, 0, 0]) == TokenTree((-1, 0, 0))  # lists are normalised
  assert hash(TokenTree(np.array([-1, 0, 0]))) == hash(TokenTree((-1, 0, 0)))
  assert TokenTree((-1, 0, 0)) != TokenTree((-1, 0, 1))
  traces = []

  @functools.partial(jax.jit, static_argnames="tree")
  def mask_sum(x, tree):
    traces.append(tree)
    return x + jnp.asarray(tree.ancestor_mask).sum()

  assert int(mask_sum(0, tree=DOC)) == 20
  assert int(mask_sum(0, tree=TokenTree(DOC.parents))) == 20  # equal tree: cached
  assert int(mask_sum(0, tree=TokenTree.chain(2))) == 6
  assert len(traces) == 2


def test_arrays_are_read_only():
  with pytest.raises(ValueError):
    DOC.depths[0] = 5
  with pytest.raises(dataclasses.FrozenInstanceError):
    DOC.parents = (-1,)


@pytest.mark.parametrize("parents, match", [
    ((), "at least the root"),
    ((0, 0), r"parents\[0\]=0 must be -1"),
    ((-1, 0, 2), r"parents\[2\]=2 must be in \[0, 2\)"),
    ((-1, 0, 3, 1), r"parents\[2\]=3"),
    ((-1, -1), r"parents\[1\]=-1"),
    ((-1, 0.5), "sequence of ints"),
])
def test_validation(parents, match):
  with pytest.raises(ValueError, match=match):
    TokenTree(parents)


def test_bad_arguments():
  with pytest.raises(ValueError, match="gamma=-1"):
    TokenTree.chain(-1)
  with pytest.raises(ValueError, match="node=8"):
    DOC.path_to(8)
