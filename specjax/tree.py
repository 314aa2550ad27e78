r"""Token trees for tree speculation (SpecInfer, Sequoia).

A round of tree speculation drafts several continuations at once: each node of a
:class:`TokenTree` holds one token, and a node's children are alternative next tokens
after the path from the root to it. The root is the last accepted token, whose KV is
not yet in the cache (the chain's "pending" token), so a tree of ``n`` nodes holds
``n - 1`` drafted tokens; a chain of gamma drafts is the tree of gamma + 1 nodes with
one child per node (:meth:`TokenTree.chain`).

A tree is its ``parents`` tuple, in topological order (every parent before its
children), and the order of a node's children is their *rank*: the first child is the
one the draft proposes first (its most likely token when greedy, its first sample
without replacement when stochastic). For example::

              0               depth 0: the root (pending token)
           /  |  \
          1   2   3           depth 1: the root's children, ranks 0, 1, 2
         / \      |
        4   5     6           depth 2
        |
        7                     depth 3

    parents    = (-1, 0, 0, 0, 1, 1, 3, 4)
    depths     = ( 0, 1, 1, 1, 2, 2, 2, 3)
    child_rank = ( 0, 0, 1, 2, 0, 1, 0, 0)
    levels     = ((0,), (1, 2, 3), (4, 5, 6), (7,))

    ancestor_mask[i, j]: node i attends to node j (j is i or an ancestor of i)
          j  0 1 2 3 4 5 6 7
        i 0  1 . . . . . . .
          1  1 1 . . . . . .
          2  1 . 1 . . . . .
          3  1 . . 1 . . . .
          4  1 1 . . 1 . . .
          5  1 1 . . . 1 . .
          6  1 . . 1 . . 1 .
          7  1 1 . . 1 . . 1

The verify forward runs all ``n`` node tokens at once: node ``i`` sits at position
``cache_len + depths[i]`` and attends to the whole cache plus ``ancestor_mask[i]`` of
the new tokens, so each node sees exactly the sequence root..node, as if the path had
been decoded one token at a time.

Everything in a ``TokenTree`` is static (numpy, computed from ``parents``); it is
frozen and hashable, so it can be a static argument of a jitted function. Drafts built
on the host between device steps (SuffixDecoding, n-gram lookup) differ in shape from
row to row and round to round: :class:`RowTrees` holds one tree per row as arrays,
padded to a compiled size, and the verify forward, :func:`specjax.verify.verify_tree`
and the KV commit take it wherever they take a ``TokenTree``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np


def _frozen(a: np.ndarray) -> np.ndarray:
  """Read-only, so that a cached property cannot be changed behind the tree's back."""
  a.flags.writeable = False
  return a


@dataclasses.dataclass(frozen=True)
class TokenTree:
  """The shape of a drafted token tree (static under jit).

  Attributes:
    parents: ``parents[i]`` is the node id of node i's parent; ``parents[0] == -1``
      (the root) and ``0 <= parents[i] < i`` for ``i >= 1``. Siblings are ranked by
      node id: a node's children, in increasing id, are its draft's first, second, ...
      proposal.
  """

  parents: tuple[int, ...]

  def __post_init__(self):
    try:
      parents = tuple(operator.index(x) for x in self.parents)
    except TypeError:
      raise ValueError(
          f"TokenTree parents must be a sequence of ints, got {self.parents!r}.") from None
    object.__setattr__(self, "parents", parents)  # Normalise lists / numpy ints.
    if not parents:
      raise ValueError("TokenTree needs at least the root: parents=(-1,).")
    if parents[0] != -1:
      raise ValueError(f"parents[0]={parents[0]} must be -1: node 0 is the root.")
    for i, parent in enumerate(parents[1:], start=1):
      if not 0 <= parent < i:
        raise ValueError(
            f"parents[{i}]={parent} must be in [0, {i}): nodes are in topological"
            " order (every parent before its children) and only node 0 is a root.")

  @classmethod
  def chain(cls, gamma: int) -> TokenTree:
    """A chain of ``gamma`` drafts: ``gamma + 1`` nodes, node i the parent of i + 1."""
    if gamma < 0:
      raise ValueError(f"gamma={gamma} must be >= 0.")
    return cls(parents=(-1,) + tuple(range(gamma)))

  @property
  def size(self) -> int:
    """Number of nodes, the root included (drafted tokens = size - 1)."""
    return len(self.parents)

  @functools.cached_property
  def depths(self) -> np.ndarray:
    """i32[n]: edges from the root (root 0); the position offset of each node."""
    d = np.zeros(self.size, np.int32)
    for i, parent in enumerate(self.parents[1:], start=1):
      d[i] = d[parent] + 1
    return _frozen(d)

  @property
  def max_depth(self) -> int:
    """Depth of the deepest node: the most drafts one round can accept."""
    return int(self.depths.max())

  @functools.cached_property
  def children(self) -> tuple[tuple[int, ...], ...]:
    """``children[u]``: node u's children in rank order."""
    kids = [[] for _ in range(self.size)]
    for i, parent in enumerate(self.parents[1:], start=1):
      kids[parent].append(i)
    return tuple(tuple(k) for k in kids)

  @functools.cached_property
  def num_children(self) -> np.ndarray:
    """i32[n]: number of children of each node."""
    return _frozen(np.array([len(k) for k in self.children], np.int32))

  @property
  def max_children(self) -> int:
    """The widest node's number of children (0 for a lone root)."""
    return int(self.num_children.max())

  @functools.cached_property
  def child_rank(self) -> np.ndarray:
    """i32[n]: a node's index among its siblings (0 = first proposed; root 0)."""
    rank = np.zeros(self.size, np.int32)
    for kids in self.children:
      rank[list(kids)] = np.arange(len(kids))
    return _frozen(rank)

  @functools.cached_property
  def child_table(self) -> np.ndarray:
    """i32[n, max_children]: ``children`` padded with -1, for gathers under jit."""
    table = np.full((self.size, self.max_children), -1, np.int32)
    for u, kids in enumerate(self.children):
      table[u, :len(kids)] = kids
    return _frozen(table)

  @functools.cached_property
  def levels(self) -> tuple[tuple[int, ...], ...]:
    """``levels[d]``: the nodes at depth d, in increasing id (for level-wise drafting)."""
    out = [[] for _ in range(self.max_depth + 1)]
    for i, d in enumerate(self.depths):
      out[d].append(i)
    return tuple(tuple(level) for level in out)

  @functools.cached_property
  def expand_table(self) -> np.ndarray:
    """i32[max_depth, W]: row d lists the nodes at depth d that have children (the
    ones a draft must run to propose them), padded with -1 to the widest row W.

    Drafting runs one forward per row over W tokens: equal shapes, so a ``lax.scan``
    over depth serves every tree, and a chain (W = 1) costs what it always did.
    """
    rows = [[u for u in level if self.num_children[u]] for level in self.levels[:-1]]
    table = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int32)
    for d, row in enumerate(rows):
      table[d, :len(row)] = row
    return _frozen(table)

  @functools.cached_property
  def ancestor_mask(self) -> np.ndarray:
    """bool[n, n]: ``[i, j]`` is True iff j is i or an ancestor of i.

    The attention mask among the tree's own tokens in the verify forward (row = query
    node, column = key node); lower triangular because parents come first.
    """
    mask = np.zeros((self.size, self.size), bool)
    for i, parent in enumerate(self.parents):
      if parent >= 0:
        mask[i] = mask[parent]
      mask[i, i] = True
    return _frozen(mask)

  def path_to(self, node: int) -> list[int]:
    """Node ids from the root to ``node``, both included."""
    if not 0 <= node < self.size:
      raise ValueError(f"node={node} is not in a tree of {self.size} nodes.")
    path = [node]
    while self.parents[path[-1]] >= 0:
      path.append(self.parents[path[-1]])
    return path[::-1]


PAD = -2  # the parent of a padding node in RowTrees: it matches no node, so is never tried


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowTrees:
  """One token tree per row, padded to ``size`` nodes (a traced value under jit).

  Row b's tree is nodes ``0..k_b - 1`` (node 0 the root, parents first as in
  ``TokenTree``); nodes ``k_b..size - 1`` are padding: parent ``PAD``, seen by no
  other node, never verified and so never committed. ``max_depth`` is static: the
  compiled bound on any row's depth (the accepted path's length).
  """

  parents: jax.Array  # i32[B, n]; -1 at the root, PAD at padding (NumPy on the host)
  depths: jax.Array  # i32[B, n]; position offsets (padding: 1)
  ancestor_mask: jax.Array  # bool[B, n, n]
  max_depth: int = dataclasses.field(metadata=dict(static=True))

  @property
  def size(self) -> int:
    return self.parents.shape[-1]

  @classmethod
  def from_parents(cls, rows, size: int, max_depth: int) -> RowTrees:
    """Pack per-row parents tuples (root included, each a valid ``TokenTree``) on
    the host.

    Raises:
      ValueError: a row with more than ``size`` nodes or deeper than ``max_depth``,
        or parents out of topological order.
    """
    B = len(rows)
    parents = np.full((B, size), PAD, np.int32)
    for b, row in enumerate(rows):
      if not 1 <= len(row) <= size:
        raise ValueError(f"row {b} has {len(row)} nodes; RowTrees of size {size} hold"
                         f" 1..{size}.")
      parents[b, :len(row)] = row
    pad = parents == PAD
    idx = np.arange(size)
    if (parents[:, 0] != -1).any() or ((parents[:, 1:] >= idx[1:]) |
                                       ((parents[:, 1:] < 0) & ~pad[:, 1:])).any():
      raise ValueError("every row's parents must be (-1, p_1, ...) with 0 <= p_i < i.")
    depths = np.ones((B, size), np.int32)
    depths[:, 0] = 0
    mask = np.zeros((B, size, size), bool)
    mask[:, idx, idx] = True
    mask[:, :, 0] = True
    rows_b = np.arange(B)
    for i in range(1, size):
      live = ~pad[:, i]
      par = np.maximum(parents[:, i], 0)
      depths[live, i] = depths[rows_b, par][live] + 1
      mask[live, i] |= mask[rows_b, par][live]
    if depths.max(initial=0) > max_depth:
      raise ValueError(f"a row's tree has depth {int(depths.max())} > max_depth={max_depth}.")
    # NumPy leaves: the jitted step takes them as they are (jnp.asarray would run a
    # conversion compiled once per new shape, ~50 ms on the host loop's clock).
    return cls(parents=parents, depths=depths, ancestor_mask=mask, max_depth=max_depth)

  def where(self, use: jax.Array, tree: TokenTree) -> RowTrees:
    """Rows where ``use`` (bool[B]) take the static ``tree`` (padded to this size),
    the others keep their own: the hybrid round's per-row choice, under jit."""
    n = self.size
    if tree.size > n or tree.max_depth > self.max_depth:
      raise ValueError(f"a tree of {tree.size} nodes and depth {tree.max_depth} does not"
                       f" fit RowTrees of size {n} and max_depth {self.max_depth}.")
    parents = np.full(n, PAD, np.int32)
    parents[:tree.size] = tree.parents
    depths = np.ones(n, np.int32)
    depths[:tree.size] = tree.depths
    mask = np.eye(n, dtype=bool)
    mask[:, 0] = True
    mask[:tree.size, :tree.size] = tree.ancestor_mask
    pick = lambda static, mine: jnp.where(
        use.reshape((-1,) + (1,) * (mine.ndim - 1)), jnp.asarray(static), mine)
    return RowTrees(parents=pick(parents, self.parents), depths=pick(depths, self.depths),
                    ancestor_mask=pick(mask, self.ancestor_mask), max_depth=self.max_depth)
