"""Lossless verification of drafted token trees; a chain is a tree with one branch.

**Chains** (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
2302.01318): draft token d_i, drawn from the draft distribution q_i, is accepted with
probability ``min(1, p_i(d_i) / q_i(d_i))`` where p_i is the target's distribution at
the same position; at the first rejection the replacement is drawn from the residual
``norm(max(p_i - q_i, 0))``, and if every draft is accepted a bonus token is drawn from
the target's next distribution. The output then has exactly the target's distribution.

**Trees** (SpecInfer, Miao et al. 2023, arXiv 2305.09781; Sequoia, Chen et al. 2024,
arXiv 2402.12374): the children of a node u were drawn from the draft distribution q_u
*without replacement*. Starting at the root with P = p_u, Q = q_u, the verifier tries
u's children in rank order; child x is accepted with probability ``min(1, P(x) / Q(x))``,
and on rejection::

  P <- norm(max(P - Q, 0))      the target mass the rejected proposal did not cover
  Q <- norm(Q with x removed)   the next sibling was drawn without x

If a child is accepted the walk moves to it (P, Q = its p, q); if every child is
rejected, or u is a leaf, the next token is drawn from the current P. Each step emits
P exactly: accepting contributes min(P, Q) and rejection (total mass sum max(Q - P, 0)
= sum max(P - Q, 0)) hands over to a process that emits the new P, which does not
depend on which x was rejected, so the mixture is min(P, Q) + max(P - Q, 0) = P.

Edge cases, each kept lossless:

* Q exhausted (a node has more children than its draft distribution has support, e.g.
  a top-k filtered draft, or greedy top-k children under one-hot q): such a child was
  not drawn from Q but chosen by some rule independent of this round's coins, so it is
  verified as a draw from the point mass on x: accepted with probability P(x), and on
  rejection P <- norm(P with x removed). That emits P for any such x. The same rule
  applies to any child with Q(x) = 0 (possible only if drafts and q disagree).
* Residual mass 0: max(P - Q, 0) sums to 0 only when P == Q, where a rejection has
  probability 0; float rounding can still get there, and P is then kept.

Greedy decoding is the same rule with one-hot p and q (``sampling.probabilities`` at
temperature 0): a child is accepted iff it equals the target's argmax (the first child
by ``Q(x) = 1``, later ones as point masses), and the replacement/bonus is the target's
argmax. One code path serves greedy and sampling, chains and trees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.tree import RowTrees, TokenTree


def _take(x: jax.Array, i: jax.Array) -> jax.Array:
  """x[b, i[b]] for x [B, m, ...] and i i32[B]."""
  i = i.reshape(i.shape + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, i, axis=1)[:, 0]


def _proposal(q: jax.Array,  # f32[B, V] current draft distribution (after removals)
              x: jax.Array,  # i32[B] the child being verified
              ) -> jax.Array:
  """f32[B, V]: the distribution x was drawn from: q, or the point mass on x if q(x) = 0."""
  q_x = _take(q, x)[:, None]
  return jnp.where(q_x > 0, q, jax.nn.one_hot(x, q.shape[-1], dtype=q.dtype))


def _after_rejection(p: jax.Array,  # f32[B, V] current target (residual) distribution
                     q: jax.Array,  # f32[B, V] current draft distribution
                     proposal: jax.Array,  # f32[B, V] what x was drawn from (_proposal)
                     x: jax.Array,  # i32[B] the rejected child
                     ) -> tuple[jax.Array, jax.Array]:
  """(P, Q) for the next sibling, after child x was rejected."""
  residual = jnp.maximum(p - proposal, 0.0)
  mass = residual.sum(-1, keepdims=True)
  p = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)
  q = jnp.where(jax.nn.one_hot(x, q.shape[-1], dtype=bool), 0.0, q)
  q_mass = q.sum(-1, keepdims=True)
  q = q / jnp.where(q_mass > 0, q_mass, 1.0)  # all zero once the support is exhausted
  return p, q


def verify_tree(key: jax.Array,
                tree: TokenTree | RowTrees,  # static TokenTree, or per-row trees
                tokens: jax.Array,  # i32[B, n] node tokens; tokens[:, 0] is the root
                q: jax.Array,  # f32[B, n, V] draft distribution u's children came from
                p: jax.Array,  # f32[B, n, V] target distribution after node u
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Accept one root-to-node path of each row's token tree and pick the next token.

  The walk visits nodes in increasing id, which is exactly the order the rule above
  tries them: children come after their parent and siblings in rank order, and once a
  child is accepted its own children (larger ids still) are tried next while its
  later siblings never are. So one pass over the ``n - 1`` drafted nodes, trying node
  i iff its parent is the walk's current node, verifies any tree, static or per row.

  Args:
    key: PRNG key.
    tree: the drafted trees' shape: one static ``TokenTree`` for every row, or
      ``RowTrees`` (a tree per row, padded to n nodes; padding nodes are never tried).
    tokens: the token at each node. The root's (the pending token) is not verified.
    q: ``q[b, u]`` is the draft distribution the children of node u were drawn from,
      without replacement, in rank order (unused at leaves). Zero where the children
      were chosen by a deterministic rule (host-built drafts): each is then verified
      as a point mass (see the module docstring).
    p: ``p[b, u]`` is the target distribution of the token after the path root..u
      (the verify forward's output at node u).

  Returns:
    path: i32[B, tree.max_depth + 1], the accepted path's node ids: ``path[:, 0] = 0``
      (the root), ``path[b, i]`` the accepted node at depth i for i <= n_accepted[b],
      -1 after that;
    n_accepted: i32[B] in [0, tree.max_depth], accepted drafts (path length - 1);
    next_token: i32[B], the target-distributed token after the accepted path (the
      residual sample where all children were rejected, or the bonus token at a leaf).
  """
  if tokens.ndim != 2 or tokens.shape[1] != tree.size:
    raise ValueError(f"tokens has shape {tokens.shape}; expected [B, {tree.size}] for a"
                     f" tree of {tree.size} nodes.")
  B, n = tokens.shape
  if p.ndim != 3 or p.shape[:2] != (B, n) or q.shape != p.shape:
    raise ValueError(f"q {q.shape} and p {p.shape} must both be [B={B}, n={n}, V].")
  D = tree.max_depth
  parents = jnp.broadcast_to(jnp.asarray(tree.parents, jnp.int32), (B, n))
  depths = jnp.broadcast_to(jnp.asarray(tree.depths, jnp.int32), (B, n))
  key_accept, key_next = jax.random.split(key)
  coins = jax.random.uniform(key_accept, (B, n))  # one per node tried
  rows = jnp.arange(B)

  def try_node(i, carry):
    node, p_res, q_res, path = carry  # i32[B] current node, f32[B, V] x 2, path
    live = parents[:, i] == node
    x = tokens[:, i]
    proposal = _proposal(q_res, x)
    p_x, q_x = _take(p_res, x), _take(proposal, x)
    accepted = live & (coins[:, i] * q_x < p_x)  # u < P/Q, no division
    p_rej, q_rej = _after_rejection(p_res, q_res, proposal, x)
    rejected = (live & ~accepted)[:, None]
    moved = accepted[:, None]
    p_res = jnp.where(moved, p[:, i], jnp.where(rejected, p_rej, p_res))
    q_res = jnp.where(moved, q[:, i], jnp.where(rejected, q_rej, q_res))
    path = path.at[rows, jnp.where(accepted, depths[:, i], D + 1)].set(i, mode="drop")
    return jnp.where(accepted, i, node), p_res, q_res, path

  path = jnp.full((B, D + 1), -1, jnp.int32).at[:, 0].set(0)
  init = (jnp.zeros((B,), jnp.int32), p[:, 0], q[:, 0], path)
  _, p_res, _, path = jax.lax.fori_loop(1, n, try_node, init)
  n_accepted = jnp.sum(path[:, 1:] >= 0, axis=1).astype(jnp.int32)
  next_token = jax.random.categorical(key_next, jnp.log(p_res), axis=-1)
  return path, n_accepted, next_token.astype(jnp.int32)


def verify_chain(key: jax.Array,
                 drafts: jax.Array,  # i32[B, G]
                 q: jax.Array,  # f32[B, G, V] draft distributions the drafts came from
                 p: jax.Array,  # f32[B, G + 1, V] target distributions
                 ) -> tuple[jax.Array, jax.Array]:
  """Accept a prefix of each row's drafts and pick the token that follows it.

  :func:`verify_tree` on ``TokenTree.chain(G)``: node i + 1 holds draft i, drawn from
  q[:, i] at node i.

  Returns:
    n_accepted: i32[B] in [0, G], the accepted prefix length;
    next_token: i32[B], the target-distributed token after the accepted prefix
      (the residual sample at the first rejection, or the bonus token).
  """
  B, G = drafts.shape
  tokens = jnp.concatenate([jnp.zeros((B, 1), drafts.dtype), drafts], axis=1)
  q_nodes = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)  # the leaf's: unused
  _, n, next_token = verify_tree(key, TokenTree.chain(G), tokens, q_nodes, p)
  return n, next_token
