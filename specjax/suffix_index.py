r"""SuffixDecoding's draft proposer on the host: a depth-limited suffix trie over tokens.

SuffixDecoding (Oliaro et al. 2024, arXiv 2411.04975) drafts from text already seen:
the prompt and output of the request itself (a *local* index) and the outputs of
earlier requests (one *global* index). Pure Python + NumPy, no JAX: it runs between
device steps, once per batch row.

**The index.** :class:`SuffixIndex` is the trie of every substring of length <=
``max_depth`` of its sequences, path-compressed (a node stores a run of tokens by
reference into a sequence), so it holds O(total tokens) nodes. For the sequences
``a b c a b d`` (one sequence, ``max_depth`` 3)::

      root (6)                        count(node) = occurrences of its string
      ├── "a b" (2)                   a leaf (count 1) is implicit: it is just one
      │   ├── "c" (1)  -> "a b c"     occurrence (sequence, start); its string is
      │   └── "d" (1)  -> "a b d"     seq[start : min(start + max_depth, len(seq))],
      ├── "b" (2)                     so it grows with its sequence for free
      │   ├── "c a" (1)
      │   └── "d" (1)
      ├── "c a b" (1)
      └── "d" (1)

Every explicit node keeps its count, its depth (the length of its string) and one
occurrence ``(sid, start)``: its string is ``seq[sid][start : start + depth]`` and its
edge is the part below its parent. The occurrence is the most recent one that is
followed by a token, when there is one, so a draft that runs out of trie depth can go
on copying from the real sequence.

**Appending** one token to a sequence extends its *open* suffixes (those that started
in the last ``max_depth`` positions) by one token each. An open suffix whose string
occurs nowhere else is a leaf and never needs work again (once unique, always unique:
its extensions are unique too), so only the open suffixes that still occur elsewhere
are touched: a contiguous run of the shortest ones, at most ``max_depth`` (plus one
O(1) occurrence refresh). Each touched suffix sits at the end of an explicit node and
does O(1) work (a child lookup, a count increment, at most one split or fuse, and an
O(top_k) re-rank of the parent's children), as in the reference's six cases.

**Probabilities.** ``p(child) = count(child) / sum of the counts of the children``:
the denominator counts only occurrences that are followed by a token. The context's
own trailing occurrence (in the local index) therefore no longer dilutes the first
draft token to 1/2 (the reference divides by ``count(parent)``; see the research
brief, weakness 3), and a suffix only *matches* if one of its occurrences has a
continuation. A draft token's probability is the product along its path.

**Drafting** (:meth:`SuffixIndex.draft`): find the longest suffix of the context, up to
``max_depth``, that occurs with a continuation (binary search over its length: the
property is monotone; O(log depth) walks, not the reference's O(depth^2)). Then
either follow the most frequent child (path mode) or grow a best-first tree (expand
the most probable frontier token until the budget), pruning tokens whose path
probability is below ``min_token_prob``. Budget: ``floor(alpha * match_len + offset)``
tokens, capped by the caller's ``max_tokens``. When the path reaches depth
``max_depth`` the draft keeps copying the occurrence's continuation from its sequence
(same probability), and ``match_len`` itself counts the context's match against that
occurrence beyond ``max_depth``; the reference caps drafts at ``max_depth -
match_len`` and loses long copies.

Children ties (equal counts) go to the child seen most recently (after a removal,
ranked from scratch: the child whose recorded occurrence is the latest). Between the
local and the global draft :class:`SuffixDecoder` keeps the higher score (expected
accepted tokens = sum of probabilities); ties go to the local draft, as in the
reference: it is the request's own text, and an equal score is usually two empty
drafts.

**Storage and cost.** Nodes are int ids into flat lists (struct of arrays), not
objects: a 1M-token index is ~1.3M nodes but only a few thousand GC-tracked objects,
so CPython's cyclic collector (which walks every tracked object on a full pass) does
not stall the engine for a second. Measured on a loaded 2-core x86 box, SmolLM2
tokens of standard-library source, ``max_depth`` 64: ~186 bytes per cached token
(tracemalloc; ``memory_bytes()`` estimates it within a few %), ~13 us per token to
insert into the global index; a 2k-token context plus a 1M-token global index cost
27-38 us (p50) / 170-240 us (p99) per row for ``propose`` + ``extend`` (tree mode,
16 tokens); when the output copies its context (9 tokens per step) ``extend`` does
close to ``max_depth`` steps per token: 160-200 us / 860-980 us.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import operator
import sys
from collections.abc import Hashable, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------
# Public value types.


@dataclasses.dataclass(frozen=True)
class SuffixConfig:
  """Parameters of :class:`SuffixDecoder`.

  The defaults follow the reference deployments (research brief §2.2) except
  ``offset``. ``alpha = 1`` keeps the reference's acceptance rate (``alpha = 2``
  measured a few % more tokens per step at a clearly lower acceptance rate, which
  pays only when verification is free), and the reason the reference needed a larger
  ``alpha`` for long copies (drafts capped at ``max_depth - match_len``) is gone here.
  ``offset = 1`` (reference: 0) lets a match of m tokens draft m + 1: an exact repeat
  of an earlier output then ramps 2, 5, 11, 23 drafted tokens per round instead of
  1, 3, 7, 15 (one round fewer per 32 tokens), for at most one more drafted token per
  round, still pruned by ``min_token_prob`` and truncated by the engine's cost model
  when it does not pay.

  Attributes:
    max_depth: Longest substring the tries index (and longest suffix matched there);
      64 as in the paper and the Arctic plugin (vLLM's 24 measurably loses on
      copy-heavy work). Drafts are not limited by it.
    max_tokens_global: Token budget of the global index. Adding a finished request
      beyond it evicts whole oldest sequences first (FIFO), so the index never holds
      more; 0 disables the global index. 1M tokens is about 10k requests of 100 tokens
      (vLLM's default of 10k cached requests) and about 0.4 GB of host memory here.
    alpha: Draft length is at most ``floor(alpha * match_len + offset)``.
    offset: See ``alpha``; negative values dampen short matches.
    min_token_prob: Drafted tokens whose estimated path probability is below this are
      pruned (0.1, as everywhere in the reference).
    max_children: Most children of one draft-tree node (tree mode), unless
      :meth:`SuffixDecoder.propose` is given another value.
    tree: Best-first draft trees (True) or a single most-frequent path (False).
    global_prompts: Also cache each finished request's prompt in the global index
      (as one sequence, prompt + output). The reference caches outputs only: the
      prompt is the request's own local index, and other requests rarely repeat it.
  """

  max_depth: int = 64
  max_tokens_global: int = 1_000_000
  alpha: float = 1.0
  offset: float = 1.0
  min_token_prob: float = 0.1
  max_children: int = 4
  tree: bool = True
  global_prompts: bool = False

  def __post_init__(self):
    if self.max_depth < 1:
      raise ValueError(f"max_depth must be >= 1, got {self.max_depth}.")
    if self.max_tokens_global < 0:
      raise ValueError(f"max_tokens_global must be >= 0, got {self.max_tokens_global}.")
    if not self.alpha >= 0:
      raise ValueError(f"alpha must be >= 0, got {self.alpha}.")
    if not 0.0 <= self.min_token_prob <= 1.0:
      raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}.")
    if self.max_children < 1:
      raise ValueError(f"max_children must be >= 1, got {self.max_children}.")


@dataclasses.dataclass
class Draft:
  """A drafted token tree (a path when every parent is the previous token).

  Attributes:
    tokens: Drafted tokens, parents listed before their children.
    parents: ``parents[i]`` is the index in ``tokens`` of token i's parent, or -1 for
      the root (the context's last token).
    probs: Estimated probability that each token is accepted (its path product).
    match_len: Length of the matched suffix of the context (may exceed the index's
      ``max_depth``: beyond it the match is measured against the copied occurrence).
    source: ``"local"``, ``"global"``, or ``""`` for an empty draft.
  """

  tokens: list[int]
  parents: list[int]
  probs: list[float]
  match_len: int
  source: str

  @property
  def score(self) -> float:
    """Expected number of accepted tokens: the sum of the probabilities."""
    return float(sum(self.probs))

  @classmethod
  def empty(cls) -> Draft:
    return cls([], [], [], 0, "")


# ----------------------------------------------------------------------------------------
# Trie storage: struct of arrays. A node is an int id into parallel Python lists, so the
# trie is a handful of lists of ints (plus tuples of ints and int-only dicts, which the
# cyclic GC does not track) instead of millions of objects: a full collection with a
# 1M-token index in memory takes milliseconds, not the seconds an object per node costs.
#
#   _cnt[x]  occurrences of x's string (leaves: 1)
#   _dep[x]  length of x's string; -1 for a leaf, whose string grows with its
#            sequence: min(max_depth, len(seqs[_sid[x]]) - _st[x])
#   _sid[x], _st[x]  one occurrence: the string is seqs[_sid[x]][_st[x]:_st[x] + depth]
#            (the most recent one followed by a token, when there is one)
#   _tok[x]  first token of x's edge (its key in the parent)
#   _par[x]  parent id (-1 for the root, id 0)
#   _top[x]  children ranked best first (count, then recency), a tuple; all of them
#            for a small node, the best top_k for a big one (None: stale); None for
#            a node without children
#   _kid[x]  None for a small node (<= top_k children, all in _top); for a big one
#            [dict token -> child, sum of the children's counts, floor], floor being
#            an upper bound on the counts of the children outside _top


class _SeqState:
  """Per-sequence update state.

  Attributes:
    window: Ids of the nodes where the open non-unique suffixes end, longest first;
      they started at positions ``len(seq) - len(window) ... len(seq) - 1``.
    pending: ``(node, start)`` of the suffix that reached ``max_depth`` on the last
      token: once one more token arrives, it is an occurrence with a continuation.
    dirty: The window must be recomputed before the next append (another sequence
      caught up with one of this sequence's leaves, or the sequence was closed).
  """

  __slots__ = ("window", "pending", "dirty")

  def __init__(self):
    self.window = []
    self.pending = None
    self.dirty = False


def _common_suffix(x, xe: int, y, ye: int, limit: int) -> int:
  """Largest k <= limit with ``x[xe-k:xe] == y[ye-k:ye]`` (slice compares, galloping)."""
  limit = min(limit, xe, ye)
  k, step = 0, 16
  while k < limit:
    s = min(step, limit - k)
    if x[xe - k - s:xe - k] == y[ye - k - s:ye - k]:
      k += s
      step *= 2
    elif s == 1:
      break
    else:
      step = max(1, s // 2)
  return k


# Memory model for memory_bytes() (tests/test_suffix_index.py checks it against
# tracemalloc): per node id one slot in each of the 8 lists, plus the int object its
# start position usually is; per explicit node with children a tuple; per child one
# tuple slot; per child of a big node a dict entry; per token one list slot (token
# ints are interned, so shared).
_INT_BYTES = sys.getsizeof(1 << 40)
_SLOT_BYTES = 8 * 8
_TUPLE_BYTES = sys.getsizeof(())
_KID_BYTES = 8
_BIG_KID_BYTES = 40  # Key + value + hash + index slot, at 2/3 load.
_TOKEN_BYTES = 8


# ----------------------------------------------------------------------------------------
# The index.


class SuffixIndex:
  """A depth-limited, path-compressed suffix trie over many token sequences.

  Sequences get increasing integer ids (:meth:`add`); they can be extended at any
  time, closed, and removed. See the module docstring for the algorithms.

  Args:
    max_depth: Longest indexed substring.
    top_k: How many best children each node keeps ranked (>= the largest
      ``max_children`` you will ask for, or those requests rank all children).
    intern: Optional dict used to share token int objects (saves ~28 bytes per token
      id >= 256); pass one dict to several indices to share it.
  """

  def __init__(self, max_depth: int = 64, *, top_k: int = 8,
               intern: dict[int, int] | None = None):
    if max_depth < 1:
      raise ValueError(f"max_depth must be >= 1, got {max_depth}.")
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}.")
    self._D = max_depth
    self._K = top_k
    # The root: id 0, depth 0; its count is the number of indexed tokens.
    self._cnt, self._dep, self._sid, self._st = [0], [0], [-1], [0]
    self._tok, self._par, self._top, self._kid = [None], [-1], [None], [None]
    self._free: list[int] = []  # Ids of removed nodes, reused first.
    self._seqs: dict[int, list[int]] = {}  # Insertion order = age (FIFO order).
    self._states: dict[int, _SeqState] = {}
    self._next_sid = 0
    self._num_tokens = 0
    self._num_nodes = 1  # Explicit nodes, the root included.
    self._num_leaves = 0
    self._big: set[int] = set()  # Nodes with a children dict.
    self._intern = {} if intern is None else intern
    self.version = 0  # Changes whenever the indexed text changes.
    self.update_steps = 0  # Open-suffix extensions done so far (the update cost).

  # --- sizes -------------------------------------------------------------------------

  @property
  def max_depth(self) -> int:
    return self._D

  @property
  def num_tokens(self) -> int:
    return self._num_tokens

  @property
  def num_sequences(self) -> int:
    return len(self._seqs)

  @property
  def num_nodes(self) -> int:
    """Explicit nodes (the root included) plus leaves."""
    return self._num_nodes + self._num_leaves

  def sequence_ids(self) -> list[int]:
    """Ids of the indexed sequences, oldest first."""
    return list(self._seqs)

  def tokens(self, seq_id: int) -> list[int]:
    """A copy of a sequence's tokens."""
    return list(self._seq(seq_id))

  def memory_bytes(self) -> int:
    """Estimated host memory of the index (the model is above ``_INT_BYTES``)."""
    live = self._num_nodes + self._num_leaves
    big = sum(len(self._kid[x][0]) for x in self._big)
    return (len(self._cnt) * _SLOT_BYTES + live * _INT_BYTES
            + self._num_nodes * _TUPLE_BYTES + (live - 1) * _KID_BYTES
            + big * _BIG_KID_BYTES + len(self._big) * sys.getsizeof({})
            + self._num_tokens * _TOKEN_BYTES)

  # --- updates -----------------------------------------------------------------------

  def _seq(self, seq_id: int) -> list[int]:
    try:
      return self._seqs[seq_id]
    except (KeyError, TypeError):
      raise ValueError(f"No sequence {seq_id!r} in this index.") from None

  def _convert(self, tokens) -> list[int]:
    if isinstance(tokens, np.ndarray):
      if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype}"
                         f"{list(tokens.shape)}.")
      tokens = tokens.tolist()
    intern = self._intern
    try:
      return [intern.setdefault(t, t) for t in map(operator.index, tokens)]
    except TypeError:
      raise ValueError("tokens must be integers.") from None

  def _alloc(self, count, depth, sid, start, tok, parent, top) -> int:
    if self._free:
      x = self._free.pop()
      self._cnt[x], self._dep[x], self._sid[x], self._st[x] = count, depth, sid, start
      self._tok[x], self._par[x], self._top[x], self._kid[x] = tok, parent, top, None
      return x
    x = len(self._cnt)
    self._cnt.append(count)
    self._dep.append(depth)
    self._sid.append(sid)
    self._st.append(start)
    self._tok.append(tok)
    self._par.append(parent)
    self._top.append(top)
    self._kid.append(None)
    return x

  def _release(self, x: int) -> None:
    self._top[x] = self._kid[x] = None
    self._free.append(x)

  def add(self, tokens: Sequence[int] = ()) -> int:
    """Starts a new sequence (newer than all others) and returns its id."""
    sid = self._next_sid
    self._next_sid += 1
    self._seqs[sid] = []
    self._states[sid] = _SeqState()
    self.extend(sid, tokens)
    return sid

  def close(self, seq_id: int) -> None:
    """Frees a sequence's update state; extending it later costs one O(depth^2) rebuild."""
    self._seq(seq_id)
    st = self._states[seq_id]
    st.window = []
    st.pending = None
    st.dirty = True

  def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
    """Appends tokens to a sequence: at most max_depth open-suffix steps per token."""
    seq = self._seq(seq_id)
    toks = self._convert(tokens)
    if not toks:
      return
    st = self._states[seq_id]
    if st.dirty:
      self._rebuild_window(seq_id, st)
    self.version += 1
    self._num_tokens += len(toks)
    seqs, states = self._seqs, self._states
    cnt, dep, sids, sts = self._cnt, self._dep, self._sid, self._st
    tok, par, tops, kid = self._tok, self._par, self._top, self._kid
    D, K = self._D, self._K  # pylint: disable=invalid-name
    alloc, replace, bump, insert = self._alloc, self._replace, self._bump, self._insert
    sid = seq_id
    window = st.window
    pending = st.pending
    steps = nodes = leaves = 0
    for t in toks:
      n = len(seq)
      seq.append(t)
      if pending is not None:  # Its occurrence is now followed by t.
        z, i = pending
        zs = sids[z]
        if zs < sid or (zs == sid and sts[z] < i) or sts[z] + D >= len(seqs[zs]):
          sids[z] = sid
          sts[z] = i
        pending = None
      cnt[0] += 1
      window.append(0)  # The suffix starting at n, at the root.
      steps += len(window)
      new_window = []
      for i, nd in enumerate(window, n + 1 - len(window)):
        # Suffix seq[i:n] ends at nd's end; it now grows by t.
        kd = kid[nd]
        tp = tops[nd]
        if kd is not None:
          c = kd[0].get(t)
        elif tp is not None:
          ix = 0  # c's rank among nd's children.
          for c in tp:
            if tok[c] == t:
              break
            ix += 1
          else:
            c = None
        else:
          c = None
        if c is None:  # seq[i:n+1] is new: suffix i becomes a leaf.
          if cnt[nd] == 1 and nd:  # nd was this suffix only: it becomes the leaf.
            dep[nd] = -1
            sids[nd] = sid
            sts[nd] = i
            nodes -= 1
          else:
            leaf = alloc(1, -1, sid, i, t, nd, None)
            if tp is None and kd is None:
              tops[nd] = (leaf,)
              sids[nd] = sid
              sts[nd] = i
            else:
              if kd is None and len(tp) < K:
                p = len(tp)  # After the children seen more than once.
                while p and cnt[tp[p - 1]] <= 1:
                  p -= 1
                tops[nd] = tp[:p] + (leaf,) + tp[p:]
              else:
                insert(nd, leaf)
              ns = sids[nd]
              if ns < sid or (ns == sid and sts[nd] < i):
                sids[nd] = sid
                sts[nd] = i
          leaves += 1
          continue
        dn = dep[nd]
        cd = dep[c]
        is_leaf = cd < 0
        if is_leaf:
          cs = seqs[sids[c]]
          cd = len(cs) - sts[c]
          if cd > D:
            cd = D
        if cd == dn + 1:  # Our suffix reaches the end of c.
          fuse = nd and cnt[nd] == cnt[c] + 1  # nd's only other occurrences go on to c.
          if is_leaf:  # Caught up with a leaf: it becomes an explicit node.
            dep[c] = cd
            cnt[c] = 2
            if cd < D or sts[c] + D >= len(cs):
              cs = sids[c]
              if cs != sid:
                # The leaf's sequence ends at c: its suffix there is open (or, at
                # depth D, due an occurrence refresh) once that sequence grows.
                states[cs].dirty = True
              sids[c] = sid  # Neither occurrence goes on yet: keep the newest.
              sts[c] = i
            nodes += 1
            leaves -= 1
          else:
            cnt[c] += 1
            if tops[c] is None and kid[c] is None and (
                cd < D or sts[c] + D >= len(seqs[sids[c]])):
              sids[c] = sid  # No occurrence has a continuation: keep the newest.
              sts[c] = i
          if kd is None:  # Re-rank c among nd's children (it is the newest).
            cc = cnt[c]
            if ix and cnt[tp[ix - 1]] <= cc:
              lst = list(tp)
              while ix and cnt[lst[ix - 1]] <= cc:
                lst[ix] = lst[ix - 1]
                ix -= 1
              lst[ix] = c
              tops[nd] = tuple(lst)
          else:
            bump(nd, c)
          if fuse:  # nd is now redundant: c absorbs its edge.
            p = par[nd]
            tok[c] = tok[nd]
            par[c] = p
            replace(p, nd, c)
            self._release(nd)
            nodes -= 1
          else:
            ns = sids[nd]
            if ns < sid or (ns == sid and sts[nd] < i):
              sids[nd] = sid
              sts[nd] = i
          node, depth = c, cd
        elif nd and cnt[nd] == cnt[c] + 1:  # nd absorbs c's first token.
          dep[nd] = dn + 1
          sids[nd] = cs = sids[c]
          sts[nd] = s0 = sts[c]
          tok[c] = seqs[cs][s0 + dn + 1]
          node, depth = nd, dn + 1
        else:  # Split c's edge after its first token.
          cs, s0 = sids[c], sts[c]
          m = alloc(cnt[c] + 1, dn + 1, cs, s0, t, nd, (c,))
          par[c] = m
          tok[c] = seqs[cs][s0 + dn + 1]
          if kd is None:
            lst = list(tp)
            cc = cnt[m]
            while ix and cnt[lst[ix - 1]] <= cc:
              lst[ix] = lst[ix - 1]
              ix -= 1
            lst[ix] = m
            tops[nd] = tuple(lst)
          else:
            replace(nd, c, m)
            bump(nd, m)
          ns = sids[nd]
          if ns < sid or (ns == sid and sts[nd] < i):
            sids[nd] = sid
            sts[nd] = i
          nodes += 1
          node, depth = m, dn + 1
        if depth == D:
          pending = (node, i)
        else:
          new_window.append(node)
      window = new_window
    st.window = window
    st.pending = pending
    self.update_steps += steps
    self._num_nodes += nodes
    self._num_leaves += leaves

  def _rebuild_window(self, seq_id: int, st: _SeqState) -> None:
    """Recomputes a sequence's open suffixes by walking them from the root."""
    seq = self._seqs[seq_id]
    dep = self._dep
    n = len(seq)
    window, pending = [], None
    for i in range(max(0, n - self._D), n):
      node, d = 0, 0
      while d < n - i:
        node = self._child(node, seq[i + d])
        if dep[node] < 0:
          break  # Inside its own leaf: unique.
        d = dep[node]
      else:
        if d != n - i:
          raise AssertionError("suffix trie invariant broken: a suffix ends mid-edge")
        if d == self._D:
          pending = (node, i)
        else:
          window.append(node)
        continue
      if window:
        raise AssertionError("suffix trie invariant broken: open suffixes not contiguous")
    st.window, st.pending, st.dirty = window, pending, False

  def remove(self, seq_id: int) -> None:
    """Removes a sequence: its counts, its leaves and nodes left empty or redundant.

    Occurrence references into the sequence are re-pointed: to a child's occurrence,
    else (a node only ending sequences) to another sequence's tail. Removing the
    oldest sequence (FIFO eviction) never needs more; removing another one may search
    the other sequences for a node's string.
    """
    seq = self._seq(seq_id)
    oldest = next(iter(self._seqs)) == seq_id
    del self._states[seq_id]
    D = self._D  # pylint: disable=invalid-name
    cnt, dep, tok, par, tops, kid = (self._cnt, self._dep, self._tok, self._par,
                                     self._top, self._kid)
    n = len(seq)
    cnt[0] -= n
    touched = {}
    sink = self._sink
    for i in range(n):
      ln = min(D, n - i)
      node, d = 0, 0
      while d < ln:  # Down suffix i's path, one node at a time.
        t = seq[i + d]
        kd = kid[node]
        if kd is not None:
          c = kd[0][t]
        else:
          for c in tops[node]:
            if tok[c] == t:
              break
        touched[c] = None
        d = dep[c]
        if d < 0:
          break  # The suffix's own leaf.
        cnt[c] -= 1
        if kd is not None or c != tops[node][-1]:  # (Ranked last: stays last.)
          sink(node, c)
        node = c
    nodes = leaves = 0
    for x in sorted(touched, key=lambda x: dep[x] if dep[x] >= 0 else D + 1,
                    reverse=True):
      p = par[x]
      if dep[x] < 0 or cnt[x] == 0:
        self._unlink(p, x)
        if dep[x] < 0:
          leaves -= 1
        else:
          nodes -= 1
        self._release(x)
        continue
      tp = tops[x]
      if kid[x] is None and tp is not None and len(tp) == 1 and cnt[tp[0]] == cnt[x]:
        c = tp[0]  # x has one child and ends nothing: merge it into the child.
        tok[c] = tok[x]
        par[c] = p
        self._replace(p, x, c)
        self._release(x)
        nodes -= 1
        continue
      if self._sid[x] == seq_id:
        self._repoint(x, seq, seq_id, oldest)
    self._num_nodes += nodes
    self._num_leaves += leaves
    self._num_tokens -= n
    del self._seqs[seq_id]
    self.version += 1

  def _repoint(self, x: int, seq: list[int], seq_id: int, oldest: bool) -> None:
    """Gives x an occurrence outside the sequence being removed."""
    if self._top[x] is not None or self._kid[x] is not None:
      kids = self._kid[x][0].values() if self._kid[x] is not None else self._top[x]
      best = max(kids, key=lambda c: (self._sid[c], self._st[c]))  # Done (deeper).
      self._sid[x], self._st[x] = self._sid[best], self._st[best]
      return
    d = self._dep[x]
    pattern = seq[self._st[x]:self._st[x] + d]
    found = None
    if d == self._D and not oldest:
      found = self._search(pattern, seq_id, continued=True)
    if found is None:  # Every other occurrence ends a sequence.
      for s in reversed(self._seqs):
        tk = self._seqs[s]
        if s != seq_id and len(tk) >= d and tk[len(tk) - d:] == pattern:
          found = (s, len(tk) - d)
          break
    if found is None:
      found = self._search(pattern, seq_id, continued=False)
    if found is None:
      raise AssertionError("suffix trie invariant broken: a live node has no occurrence")
    self._sid[x], self._st[x] = found

  def _search(self, pattern, seq_id, continued):
    """Latest occurrence of pattern outside seq_id (followed by a token if continued)."""
    d = len(pattern)
    first = pattern[0]
    for s in reversed(self._seqs):
      if s == seq_id:
        continue
      tk = self._seqs[s]
      end = len(tk) - d - (1 if continued else 0)
      best, pos = None, 0
      while True:
        try:
          pos = tk.index(first, pos, end + 1)
        except ValueError:
          break
        if tk[pos:pos + d] == pattern:
          best = pos
        pos += 1
      if best is not None:
        return s, best
    return None

  # --- children bookkeeping ----------------------------------------------------------

  def _rank(self, c: int) -> tuple[int, int, int]:
    """Sort key of children when ranking from scratch: count, then recency."""
    return (self._cnt[c], self._sid[c], self._st[c])

  def _child(self, node: int, t: int) -> int | None:
    kd = self._kid[node]
    if kd is not None:
      return kd[0].get(t)
    tp = self._top[node]
    if tp is not None:
      for c in tp:
        if self._tok[c] == t:
          return c
    return None

  def _replace(self, p: int, old: int, new: int) -> None:
    """Puts new (same first token) where old was among p's children."""
    kd = self._kid[p]
    if kd is not None:
      kd[0][self._tok[new]] = new
    tp = self._top[p]
    if tp is not None and old in tp:
      ix = tp.index(old)
      self._top[p] = tp[:ix] + (new,) + tp[ix + 1:]

  def _bump(self, p: int, c: int) -> None:
    """Re-ranks child c of big node p after its count went up (c is the newest)."""
    kd = self._kid[p]
    kd[1] += 1
    tp = self._top[p]
    if tp is None:
      return
    cnt = self._cnt
    cc = cnt[c]
    if c in tp:
      lst = list(tp)
      ix = lst.index(c)
    elif cc >= cnt[tp[-1]]:
      if cnt[tp[-1]] > kd[2]:
        kd[2] = cnt[tp[-1]]
      lst = list(tp)
      ix = len(lst) - 1
    else:
      if cc > kd[2]:
        kd[2] = cc
      return
    while ix and cnt[lst[ix - 1]] <= cc:
      lst[ix] = lst[ix - 1]
      ix -= 1
    lst[ix] = c
    self._top[p] = tuple(lst)

  def _insert(self, p: int, c: int) -> None:
    """Adds a new leaf child c (count 1, the newest) to p."""
    cnt = self._cnt
    kd = self._kid[p]
    tp = self._top[p]
    if kd is None:  # A small node that is full: it becomes big.
      kd = self._kid[p] = [{self._tok[x]: x for x in tp}, sum(cnt[x] for x in tp), 0]
      self._big.add(p)
    kd[0][self._tok[c]] = c
    kd[1] += 1
    if tp is None:
      return
    if cnt[tp[-1]] <= 1:  # c displaces the last of the top children.
      if cnt[tp[-1]] > kd[2]:
        kd[2] = cnt[tp[-1]]
      ix = len(tp) - 1
      while ix and cnt[tp[ix - 1]] <= 1:
        ix -= 1
      self._top[p] = tp[:ix] + (c,) + tp[ix:-1]
    elif kd[2] < 1:
      kd[2] = 1

  def _sink(self, p: int, c: int) -> None:
    """Re-ranks child c of p after its count went down by one."""
    kd = self._kid[p]
    tp = self._top[p]
    cnt = self._cnt
    if kd is not None:
      kd[1] -= 1
      if tp is None or c not in tp:
        return
      if cnt[c] <= kd[2]:
        self._top[p] = None  # A child outside top may now beat c: rank again when needed.
        return
    ix = tp.index(c)
    last = len(tp) - 1
    if ix == last or cnt[tp[ix + 1]] < cnt[c]:
      return  # Still in place.
    rank = self._rank
    key = rank(c)
    lst = list(tp)
    while ix < last and rank(lst[ix + 1]) > key:
      lst[ix] = lst[ix + 1]
      ix += 1
    lst[ix] = c
    self._top[p] = tuple(lst)

  def _unlink(self, p: int, c: int) -> None:
    """Removes child c (count 0) from p."""
    kd = self._kid[p]
    tp = self._top[p]
    if kd is None:
      ix = tp.index(c)
      self._top[p] = tp[:ix] + tp[ix + 1:] or None
      return
    del kd[0][self._tok[c]]
    if self._dep[c] < 0:
      kd[1] -= 1  # Leaves are not decremented before they go.
    if tp is not None and c in tp:
      self._top[p] = None
    if len(kd[0]) <= self._K:  # Small again: all children ranked in top.
      self._top[p] = tuple(sorted(kd[0].values(), key=self._rank, reverse=True)) or None
      self._kid[p] = None
      self._big.discard(p)

  def _ranked(self, node: int, want: int):
    """node's best children (at least ``want`` if it has them) and their count sum."""
    kd = self._kid[node]
    cnt = self._cnt
    tp = self._top[node]
    if kd is None:
      return tp, sum(cnt[x] for x in tp)
    if tp is None:
      best = heapq.nlargest(self._K + 1, kd[0].values(), key=self._rank)
      tp = self._top[node] = tuple(best[:self._K])
      kd[2] = cnt[best[self._K]] if len(best) > self._K else 0
    if want > len(tp):
      return sorted(kd[0].values(), key=self._rank, reverse=True)[:want], kd[1]
    return tp, kd[1]

  # --- queries -----------------------------------------------------------------------

  def _locate(self, ctx, n: int, m: int):
    """Where ``ctx[n-m:n]`` ends: ``(node, node's depth)``, or None if it is absent."""
    seqs = self._seqs
    dep, sids, sts, tok, tops, kid = (self._dep, self._sid, self._st, self._tok,
                                      self._top, self._kid)
    D = self._D  # pylint: disable=invalid-name
    node, d, a, cd = 0, 0, n - m, 0
    while d < m:
      t = ctx[a + d]
      kd = kid[node]
      if kd is not None:
        c = kd[0].get(t)
        if c is None:
          return None
      else:
        tp = tops[node]
        if tp is None:
          return None
        for c in tp:
          if tok[c] == t:
            break
        else:
          return None
      s = seqs[sids[c]]
      s0 = sts[c]
      cd = dep[c]
      if cd < 0:
        cd = len(s) - s0
        if cd > D:
          cd = D
      e = cd if cd < m else m
      if e - d > 1 and s[s0 + d + 1:s0 + e] != ctx[a + d + 1:a + e]:
        return None
      node, d = c, e
    return node, cd

  def _probe(self, ctx, n: int, m: int):
    """_locate, and only if some occurrence of ``ctx[n-m:n]`` is followed by a token."""
    r = self._locate(ctx, n, m)
    if r is None:
      return None
    node, cd = r
    if m < cd:
      return r
    if m >= self._D:
      return r if self._st[node] + m < len(self._seqs[self._sid[node]]) else None
    return r if self._top[node] is not None or self._kid[node] is not None else None

  def _longest(self, ctx, n: int, ub: int):
    """The longest m <= ub with a continued occurrence of ``ctx[n-m:n]``: (m, node, cd)."""
    ub = min(ub, n, self._D)
    if ub <= 0:
      return 0, 0, 0
    r = self._probe(ctx, n, ub)
    if r is not None:
      return ub, r[0], r[1]
    lo, hi, best = 0, ub - 1, (0, 0)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      r = self._probe(ctx, n, mid)
      if r is not None:
        lo, best = mid, r
      else:
        hi = mid - 1
    return lo, best[0], best[1]

  def count(self, pattern: Sequence[int]) -> int:
    """Occurrences of pattern (at most ``max_depth`` tokens) in the indexed sequences."""
    pattern = list(map(operator.index, pattern))
    if len(pattern) > self._D:
      raise ValueError(f"pattern of {len(pattern)} tokens is longer than max_depth "
                       f"{self._D}; the index does not count longer strings.")
    if not pattern:
      return self._num_tokens
    r = self._locate(pattern, len(pattern), len(pattern))
    return 0 if r is None else self._cnt[r[0]]

  def longest_match(self, context: Sequence[int]) -> int:
    """Length (<= max_depth) of the longest suffix of context that occurs followed by a token."""
    ctx = list(map(operator.index, context))
    return self._longest(ctx, len(ctx), self._D)[0]

  def draft(self, context: Sequence[int], max_tokens: int, *, alpha: float = 1.0,
            offset: float = 1.0, min_token_prob: float = 0.1, tree: bool = False,
            max_depth: int | None = None, max_children: int = 4,
            source: str = "") -> Draft:
    """Drafts a continuation of context from this index (see the module docstring).

    Args:
      context: The tokens so far; the draft's root is the last one.
      max_tokens: Most drafted tokens.
      alpha, offset: Draft length <= ``floor(alpha * match_len + offset)``.
      min_token_prob: Tokens with a lower path probability are pruned.
      tree: Best-first tree (True) or the most frequent path (False).
      max_depth: Most tokens on one root-to-leaf path (None: no limit).
      max_children: Most children per tree node (tree mode).
      source: The returned draft's ``source`` when it is not empty.

    Returns:
      The draft; empty when no suffix of the context matches.
    """
    ctx = context if isinstance(context, list) else list(map(operator.index, context))
    return self._draft(ctx, max_tokens, alpha, offset, min_token_prob, tree, max_depth,
                       max_children, self._D, source)[0]

  def _draft(self, ctx, max_tokens, alpha, offset, min_prob, tree, max_depth,
             max_children, ub, source):
    """draft(), given a bound ub on the match length; returns (Draft, trie match)."""
    n = len(ctx)
    D = self._D  # pylint: disable=invalid-name
    m, node, cd = self._longest(ctx, n, ub)
    if m == 0 or max_tokens <= 0 or (max_depth is not None and max_depth <= 0):
      return Draft.empty(), m
    match_len = m
    if m == D and alpha > 0:  # Measure the match against the occurrence beyond depth D.
      need = math.ceil((max_tokens - offset) / alpha) - D
      if need > 0:
        match_len += _common_suffix(ctx, n - D, self._seqs[self._sid[node]],
                                    self._st[node], need)
    budget = min(max_tokens, math.floor(alpha * match_len + offset + 1e-9))
    if budget <= 0:
      return Draft.empty(), m
    if not tree or max_children == 1:
      if max_depth is not None:
        budget = min(budget, max_depth)
      toks, probs = self._path(node, cd, m, budget, min_prob)
      parents = list(range(-1, len(toks) - 1))
    else:
      toks, parents, probs = self._tree(node, cd, m, budget, min_prob, max_depth,
                                        max_children)
    if not toks:
      return Draft.empty(), m
    return Draft(toks, parents, probs, match_len, source), m

  def _path(self, node, cd, d, budget, min_prob):
    """Most frequent path from (node, depth d); copies past max_depth."""
    seqs, dep, sids, sts, cnt = self._seqs, self._dep, self._sid, self._st, self._cnt
    D = self._D  # pylint: disable=invalid-name
    toks, probs, p = [], [], 1.0
    while len(toks) < budget:
      room = budget - len(toks)
      if d < cd or d >= D:  # Inside an edge (or past the trie): no choice to make.
        k = min(cd - d, room) if d < cd else room
        a = sts[node] + d
        chunk = seqs[sids[node]][a:a + k]
        toks += chunk
        probs += [p] * len(chunk)
        d += len(chunk)
        if len(chunk) < k:
          break
        continue
      if self._top[node] is None and self._kid[node] is None:
        break  # Every occurrence ends here.
      top, total = self._ranked(node, 1)
      c = top[0]
      p = p * cnt[c] / total
      if p < min_prob:
        break
      node = c
      cd = dep[c]
      if cd < 0:
        cd = min(D, len(seqs[sids[c]]) - sts[c])
    return toks, probs

  def _tree(self, node, cd, m, budget, min_prob, max_depth, max_children):
    """Best-first draft tree from (node, depth m): expand the likeliest token first."""
    seqs, dep, sids, sts, cnt = self._seqs, self._dep, self._sid, self._st, self._cnt
    D = self._D  # pylint: disable=invalid-name
    depth_cap = m + (max_depth if max_depth is not None else budget)
    toks, parents, probs = [], [], []
    heap = []  # (-prob, order, node, depth index of the token, parent index)
    order = 0

    def successors(nd, ncd, d, p, par):
      # Tokens that can follow the path ending at depth d of nd's string.
      nonlocal order
      if d >= depth_cap:
        return
      if d < ncd or d >= D:
        if sts[nd] + d < len(seqs[sids[nd]]):
          heapq.heappush(heap, (-p, order, nd, d, par))
          order += 1
        return
      if self._top[nd] is None and self._kid[nd] is None:
        return
      top, total = self._ranked(nd, max_children)
      for c in top[:max_children]:
        q = p * cnt[c] / total
        if q < min_prob:
          break
        heapq.heappush(heap, (-q, order, c, d, par))
        order += 1

    successors(node, cd, m, 1.0, -1)
    while heap and len(toks) < budget:
      negp, _, nd, d, par = heapq.heappop(heap)
      p = -negp
      ncd = dep[nd]
      s = seqs[sids[nd]]
      s0 = sts[nd]
      if ncd < 0:
        ncd = min(D, len(s) - s0)
      # Emit, and keep emitting down a chain while it stays the likeliest candidate.
      while True:
        toks.append(s[s0 + d])
        parents.append(par)
        probs.append(p)
        par = len(toks) - 1
        d += 1
        if (len(toks) >= budget or d >= depth_cap or not (d < ncd or d >= D)
            or s0 + d >= len(s) or (heap and -heap[0][0] > p)):
          break
      if len(toks) < budget:
        successors(nd, ncd, d, p, par)
    return toks, parents, probs

  # --- debugging ---------------------------------------------------------------------

  def check_invariants(self) -> None:
    """Raises AssertionError if the trie's bookkeeping is inconsistent (for tests)."""
    seqs, D, K = self._seqs, self._D, self._K  # pylint: disable=invalid-name
    cnt, dep, sids, sts, tok, par = (self._cnt, self._dep, self._sid, self._st,
                                     self._tok, self._par)
    nodes = leaves = 0
    stack = [(0, [])]
    assert cnt[0] == self._num_tokens, (cnt[0], self._num_tokens)
    while stack:
      x, s = stack.pop()
      if dep[x] < 0:
        leaves += 1
        seq = seqs[sids[x]]
        d = min(D, len(seq) - sts[x])
        assert seq[sts[x]:sts[x] + d][:len(s)] == s and cnt[x] == 1
        continue
      nodes += 1
      if x:
        seq = seqs[sids[x]]
        string = seq[sts[x]:sts[x] + dep[x]]
        assert len(string) == dep[x] and string[:len(s)] == s and dep[x] <= D
        assert cnt[x] >= 1
      else:
        string = []
      kd, tp = self._kid[x], self._top[x]
      kids = list(kd[0].values()) if kd is not None else list(tp or ())
      if kd is not None:
        assert len(kd[0]) > K and x in self._big
        assert kd[1] == sum(cnt[c] for c in kids)
        if tp is not None:
          assert len(tp) == K and all(c in kids for c in tp)
          rest = [cnt[c] for c in kids if c not in tp]
          assert max(rest) <= kd[2] and min(cnt[c] for c in tp) >= max(rest)
      else:
        assert len(kids) <= K and x not in self._big and tp != ()
      if tp is not None:
        cs = [cnt[c] for c in tp]
        assert cs == sorted(cs, reverse=True), cs
      assert sum(cnt[c] for c in kids) <= cnt[x]
      for c in kids:
        assert par[c] == x
        cseq = seqs[sids[c]]
        assert cseq[sts[c] + len(string)] == tok[c]
        assert cseq[sts[c]:sts[c] + len(string)] == string
        stack.append((c, string + [tok[c]]))
    assert nodes == self._num_nodes and leaves == self._num_leaves, (
        nodes, self._num_nodes, leaves, self._num_leaves)
    assert nodes + leaves + len(self._free) == len(cnt)


# ----------------------------------------------------------------------------------------
# The proposer: one local index per request and one global index.


class _Request:
  __slots__ = ("index", "sid", "prompt_len", "local_m", "local_n", "global_m",
               "global_n", "global_version")

  def __init__(self, index, sid, prompt_len):
    self.index = index
    self.sid = sid
    self.prompt_len = prompt_len
    self.local_m = self.local_n = self.global_m = self.global_n = 0
    self.global_version = -1


class SuffixDecoder:
  """SuffixDecoding's proposer: per-request local indices plus one global index.

  A request's local index holds its context (prompt + tokens extended so far); the
  global index holds finished requests' outputs (see ``SuffixConfig.global_prompts``)
  within ``max_tokens_global`` tokens, oldest evicted first. :meth:`propose` drafts
  from both and keeps the higher score (ties: local).

  Args:
    config: The parameters.
  """

  def __init__(self, config: SuffixConfig = SuffixConfig()):
    self.config = config
    self._intern: dict[int, int] = {}
    self._top_k = max(8, config.max_children)
    self._global = SuffixIndex(config.max_depth, top_k=self._top_k, intern=self._intern)
    self._requests: dict[Hashable, _Request] = {}

  @property
  def global_index(self) -> SuffixIndex:
    return self._global

  def _request(self, rid) -> _Request:
    try:
      return self._requests[rid]
    except KeyError:
      raise ValueError(f"Request {rid!r} is not active; call start() first.") from None

  def start(self, rid: Hashable, prompt: Sequence[int]) -> None:
    """A new request: its local index over the prompt."""
    if rid in self._requests:
      raise ValueError(f"Request {rid!r} is already active; finish() it first.")
    index = SuffixIndex(self.config.max_depth, top_k=self._top_k, intern=self._intern)
    sid = index.add(prompt)
    self._requests[rid] = _Request(index, sid, index.num_tokens)

  def extend(self, rid: Hashable, tokens: Sequence[int]) -> None:
    """Tokens appended to the request's context (generated, accepted)."""
    req = self._request(rid)
    req.index.extend(req.sid, tokens)

  def finish(self, rid: Hashable, cache: bool = True) -> None:
    """The request is done: its output goes into the global index (if cache)."""
    req = self._requests.pop(rid, None)
    if req is None:
      raise ValueError(f"Request {rid!r} is not active.")
    seq = req.index._seqs[req.sid]  # pylint: disable=protected-access
    tokens = seq if self.config.global_prompts else seq[req.prompt_len:]
    if cache:
      self._cache(tokens)

  def _cache(self, tokens: list[int]) -> None:
    budget = self.config.max_tokens_global
    if budget <= 0 or not tokens:
      return
    if len(tokens) > budget:  # Longer than the whole cache: keep its most recent part.
      tokens = tokens[len(tokens) - budget:]
    g = self._global
    ids = iter(g.sequence_ids())
    while g.num_tokens + len(tokens) > budget:
      g.remove(next(ids))
    g.close(g.add(tokens))

  def propose(self, rid: Hashable, max_tokens: int, max_depth: int | None = None,
              max_children: int | None = None) -> Draft:
    """Drafts a continuation of the request's context.

    Args:
      rid: The request.
      max_tokens: Most drafted tokens (the tree's node count, root excluded).
      max_depth: Most tokens on one path of the tree (root excluded); None: no limit.
      max_children: Most children per node (tree mode); None: the config's.

    Returns:
      The local or the global draft, whichever has the higher score (ties: local).
    """
    req = self._request(rid)
    cfg = self.config
    mc = cfg.max_children if max_children is None else max_children
    if mc < 1:
      raise ValueError(f"max_children must be >= 1, got {mc}.")
    index = req.index
    ctx = index._seqs[req.sid]  # pylint: disable=protected-access
    n = len(ctx)
    args = (max_tokens, cfg.alpha, cfg.offset, cfg.min_token_prob, cfg.tree, max_depth, mc)
    # The local index only grows with this context: a match can grow by at most the
    # tokens added since the last call.
    ub = req.local_m + n - req.local_n if req.local_n else n
    local, req.local_m = index._draft(ctx, *args, ub, "local")  # pylint: disable=protected-access
    req.local_n = n
    best = local
    g = self._global
    if g.num_tokens:
      ub = (req.global_m + n - req.global_n if req.global_version == g.version else n)
      glob, req.global_m = g._draft(ctx, *args, ub, "global")  # pylint: disable=protected-access
      req.global_n, req.global_version = n, g.version
      if glob.score > local.score:
        best = glob
    return best

  def stats(self) -> dict:
    """Token, sequence and node counts and estimated bytes of the global and local indices."""
    g = self._global
    local = [r.index for r in self._requests.values()]
    out = {
        "global_tokens": g.num_tokens,
        "global_sequences": g.num_sequences,
        "global_nodes": g.num_nodes,
        "global_bytes": g.memory_bytes(),
        "local_requests": len(local),
        "local_tokens": sum(x.num_tokens for x in local),
        "local_nodes": sum(x.num_nodes for x in local),
        "local_bytes": sum(x.memory_bytes() for x in local),
        "intern_bytes": sys.getsizeof(self._intern) + len(self._intern) * _INT_BYTES,
    }
    tokens = out["global_tokens"] + out["local_tokens"]
    out["bytes_per_token"] = ((out["global_bytes"] + out["local_bytes"]) / tokens
                              if tokens else 0.0)
    return out


__all__ = ["Draft", "SuffixConfig", "SuffixDecoder", "SuffixIndex"]
