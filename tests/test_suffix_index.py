"""SuffixIndex / SuffixDecoder against brute force on random token sequences.

The brute-force reference below works on plain lists: every occurrence of a string is
found by scanning every sequence. Sequences are numbered in insertion order, which is
the index's recency order (ties between equally frequent children go to the one seen
most recently: the larger (sequence, start) of its latest occurrence).
"""

import gc
import math
import time
import tracemalloc

import numpy as np
import pytest

from specjax.suffix_index import Draft, SuffixConfig, SuffixDecoder, SuffixIndex

# ----------------------------------------------------------------------------------------
# Brute force.


def occurrences(seqs, s):
  """(sequence, start) of every occurrence of s."""
  n = len(s)
  return [(a, i) for a, q in enumerate(seqs) for i in range(len(q) - n + 1)
          if q[i:i + n] == s]


def continued(seqs, s):
  """Occurrences of s followed by at least one token."""
  return [(a, i) for a, i in occurrences(seqs, s) if i + len(s) < len(seqs[a])]


def longest_match(seqs, ctx, depth):
  best = 0
  for m in range(1, min(depth, len(ctx)) + 1):
    if not continued(seqs, ctx[len(ctx) - m:]):
      break
    best = m
  return best


def next_tokens(seqs, s):
  """[(token, count)] of the tokens after s, best first (count, then recency); total."""
  stats = {}
  for a, i in continued(seqs, s):
    x = seqs[a][i + len(s)]
    c = stats.setdefault(x, [0, (-1, -1)])
    c[0] += 1
    c[1] = max(c[1], (a, i))
  ranked = sorted(stats.items(), key=lambda kv: (kv[1][0], kv[1][1]), reverse=True)
  return [(x, v[0]) for x, v in ranked], sum(v[0] for v in stats.values())


def match_and_budget(seqs, ctx, depth, max_tokens, alpha, offset):
  """(trie match m, reported match_len, draft budget) as the index defines them."""
  m = longest_match(seqs, ctx, depth)
  match_len = m
  if m == depth and alpha > 0:  # Beyond the trie: compare with the copied occurrence.
    need = math.ceil((max_tokens - offset) / alpha) - depth
    a, i = max(continued(seqs, ctx[len(ctx) - depth:]))
    q, k = seqs[a], 0
    while (k < need and k < len(ctx) - depth and k < i
           and ctx[len(ctx) - depth - k - 1] == q[i - k - 1]):
      k += 1
    match_len += k
  return m, match_len, min(max_tokens, math.floor(alpha * match_len + offset + 1e-9))


def successors(seqs, path, depth, p, min_prob, max_children):
  """[(token, prob)] that may follow the path string (matched suffix + drafted)."""
  if len(path) >= depth:  # Copy the latest continued occurrence of the depth-D prefix.
    occ = continued(seqs, path[:depth])
    if not occ:
      return []
    a, i = max(occ)
    j = i + len(path)
    return [(seqs[a][j], p)] if j < len(seqs[a]) else []
  ranked, total = next_tokens(seqs, path)
  out = []
  for x, c in ranked[:max_children]:
    q = p * c / total
    if q < min_prob:
      break
    out.append((x, q))
  return out


def path_draft(seqs, ctx, depth, max_tokens, alpha=1.0, offset=1.0, min_prob=0.1):
  m, match_len, budget = match_and_budget(seqs, ctx, depth, max_tokens, alpha, offset)
  if m == 0:
    return [], [], 0
  path, toks, probs, p = list(ctx[len(ctx) - m:]), [], [], 1.0
  while len(toks) < budget:
    nxt = successors(seqs, path, depth, p, min_prob, 1)
    if not nxt:
      break
    x, p = nxt[0]
    toks.append(x)
    probs.append(p)
    path.append(x)
  return toks, probs, match_len


def check_tree(seqs, ctx, depth, d: Draft, max_tokens, *, alpha=1.0, offset=1.0,
               min_prob=0.1, max_depth=None, max_children=4):
  """Every property of a best-first tree draft, against brute force."""
  m, match_len, budget = match_and_budget(seqs, ctx, depth, max_tokens, alpha, offset)
  max_depth = max_depth or budget
  if m == 0 or budget <= 0:
    assert d.tokens == [] and d.source == ""
    return
  assert len(d.tokens) == len(d.parents) == len(d.probs) <= budget
  assert math.isclose(d.score, sum(d.probs))
  if not d.tokens:
    assert not successors(seqs, list(ctx[len(ctx) - m:]), depth, 1.0, min_prob,
                          max_children)
    return
  assert d.match_len == match_len
  paths, depths, kids = [], [], {-1: []}
  for i, (t, par) in enumerate(zip(d.tokens, d.parents)):
    assert -1 <= par < i  # Parents first.
    base = list(ctx[len(ctx) - m:]) if par == -1 else paths[par]
    cands = dict(successors(seqs, base, depth, 1.0 if par == -1 else d.probs[par],
                            min_prob, max_children))
    assert t in cands, (i, t, cands)
    assert math.isclose(d.probs[i], cands[t], rel_tol=1e-9)
    assert d.probs[i] >= min_prob
    paths.append(base + [t])
    depths.append(1 if par == -1 else depths[par] + 1)
    assert depths[-1] <= max_depth
    assert t not in [d.tokens[k] for k in kids[par]]  # Siblings are distinct tokens.
    kids[par].append(i)
    kids[i] = []
  assert all(len(v) <= max_children for v in kids.values())
  # Best first: nothing left out is likelier than anything taken.
  left_out = []
  for node in [-1] + list(range(len(d.tokens))):
    if node >= 0 and depths[node] >= max_depth:
      continue
    base = list(ctx[len(ctx) - m:]) if node == -1 else paths[node]
    taken = {d.tokens[k] for k in kids[node]}
    left_out += [q for x, q in successors(seqs, base, depth,
                                          1.0 if node == -1 else d.probs[node],
                                          min_prob, max_children) if x not in taken]
  if len(d.tokens) < budget:
    assert not left_out  # Ran out of candidates, so none was left.
  else:
    assert max(left_out, default=0.0) <= min(d.probs) * (1 + 1e-12)


def test_docstring_example():
  a, b, c, d = 1, 2, 3, 4
  index = SuffixIndex(max_depth=3)
  index.add([a, b, c, a, b, d])
  assert [index.count(s) for s in ([a], [a, b], [b], [b, c, a], [c, a, b], [d])] == [
      2, 2, 2, 1, 1, 1]
  assert index.num_nodes == 9  # The root, "a b", "b" and six leaves.
  index.check_invariants()


# ----------------------------------------------------------------------------------------
# Random cases.


def random_case(rng):
  depth = int(rng.choice([1, 2, 3, 4, 6, 8]))
  vocab = int(rng.integers(1, 5))
  seqs = [rng.integers(0, vocab, int(rng.integers(0, 30))).tolist()
          for _ in range(int(rng.integers(1, 4)))]
  index = SuffixIndex(depth, top_k=int(rng.integers(1, 5)))
  for q in seqs:  # Appended in random chunks.
    sid, pos = index.add(), 0
    while pos < len(q):
      k = int(rng.integers(1, 5))
      index.extend(sid, q[pos:pos + k])
      pos += k
  return depth, vocab, seqs, index


def random_context(rng, vocab, seqs):
  ctx = rng.integers(0, vocab, int(rng.integers(1, 10))).tolist()
  if rng.random() < 0.6:  # Mostly contexts that end in indexed text.
    q = seqs[int(rng.integers(len(seqs)))]
    ctx = ctx[:int(rng.integers(0, 3))] + q[:int(rng.integers(0, len(q) + 1))]
  return ctx or [0]


def all_substrings(seqs, depth):
  return {tuple(q[i:i + n]) for q in seqs for n in range(1, depth + 1)
          for i in range(len(q) - n + 1)}


def assert_counts(index, seqs, depth, rng, vocab):
  for s in all_substrings(seqs, depth):
    assert index.count(s) == len(occurrences(seqs, list(s))), s
  for _ in range(5):  # Strings that may be absent.
    s = rng.integers(0, vocab + 1, int(rng.integers(1, depth + 1))).tolist()
    assert index.count(s) == len(occurrences(seqs, s)), s
  assert index.count([]) == index.num_tokens == sum(map(len, seqs))


def test_counts_and_matches_against_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(300):
    depth, vocab, seqs, index = random_case(rng)
    index.check_invariants()
    assert_counts(index, seqs, depth, rng, vocab)
    for _ in range(5):
      ctx = random_context(rng, vocab, seqs)
      assert index.longest_match(ctx) == longest_match(seqs, ctx, depth), ctx


def test_path_draft_against_brute_force():
  rng = np.random.default_rng(1)
  for _ in range(300):
    depth, vocab, seqs, index = random_case(rng)
    for _ in range(5):
      ctx = random_context(rng, vocab, seqs)
      max_tokens = int(rng.integers(1, 40))
      alpha = float(rng.choice([0.5, 1.0, 3.0]))
      offset = float(rng.choice([0.0, 1.0, -1.0]))
      min_prob = float(rng.choice([0.0, 0.1, 0.4]))
      d = index.draft(ctx, max_tokens, alpha=alpha, offset=offset,
                      min_token_prob=min_prob, source="local")
      toks, probs, match_len = path_draft(seqs, ctx, depth, max_tokens, alpha, offset,
                                          min_prob)
      assert d.tokens == toks, (seqs, ctx, d, toks)
      np.testing.assert_allclose(d.probs, probs, rtol=1e-12)
      assert d.parents == list(range(-1, len(toks) - 1))
      if toks:
        assert d.match_len == match_len and d.source == "local"
      else:
        assert d == Draft.empty()


def test_tree_draft_against_brute_force():
  rng = np.random.default_rng(2)
  for _ in range(300):
    depth, vocab, seqs, index = random_case(rng)
    for _ in range(4):
      ctx = random_context(rng, vocab, seqs)
      kw = dict(alpha=float(rng.choice([1.0, 4.0])), offset=float(rng.choice([0.0, 2.0])),
                min_prob=float(rng.choice([0.0, 0.1, 0.3])),
                max_depth=int(rng.integers(1, 8)) if rng.random() < 0.5 else None,
                max_children=int(rng.integers(2, 5)))
      max_tokens = int(rng.integers(1, 30))
      d = index.draft(ctx, max_tokens, tree=True, alpha=kw["alpha"], offset=kw["offset"],
                      min_token_prob=kw["min_prob"], max_depth=kw["max_depth"],
                      max_children=kw["max_children"])
      check_tree(seqs, ctx, depth, d, max_tokens, **kw)


def test_tree_with_one_child_is_the_path():
  rng = np.random.default_rng(3)
  for _ in range(100):
    depth, vocab, seqs, index = random_case(rng)
    ctx = random_context(rng, vocab, seqs)
    path = index.draft(ctx, 12, tree=False, min_token_prob=0.0)
    tree = index.draft(ctx, 12, tree=True, max_children=1, min_token_prob=0.0)
    assert tree == path


def test_remove_restores_counts_exactly():
  """Add then remove == never added, for FIFO and arbitrary removal orders."""
  rng = np.random.default_rng(4)
  for case in range(150):
    depth = int(rng.choice([1, 2, 3, 5, 8]))
    vocab = int(rng.integers(1, 4))
    seqs = [rng.integers(0, vocab, int(rng.integers(0, 25))).tolist()
            for _ in range(int(rng.integers(1, 6)))]
    index = SuffixIndex(depth, top_k=int(rng.integers(1, 4)))
    sids = [index.add() for _ in seqs]
    pos = [0] * len(seqs)
    while any(p < len(q) for p, q in zip(pos, seqs)):  # Interleaved growth.
      k = int(rng.integers(len(seqs)))
      step = int(rng.integers(1, 4))
      index.extend(sids[k], seqs[k][pos[k]:pos[k] + step])
      pos[k] += step
      if rng.random() < 0.1:
        index.close(sids[k])
    live = list(range(len(seqs)))
    while live:
      k = live.pop(0 if case % 2 else int(rng.integers(len(live))))
      index.remove(sids[k])
      kept = [seqs[j] for j in live]
      index.check_invariants()
      assert_counts(index, kept, depth, rng, vocab)
      for _ in range(3):
        ctx = random_context(rng, vocab, kept or [[0]])
        assert index.longest_match(ctx) == longest_match(kept, ctx, depth)
      if live and rng.random() < 0.3:  # Survivors keep growing correctly.
        k = live[int(rng.integers(len(live)))]
        extra = rng.integers(0, vocab, int(rng.integers(1, 6))).tolist()
        index.extend(sids[k], extra)
        seqs[k] = seqs[k] + extra
        index.check_invariants()
    assert index.num_tokens == 0 and index.num_nodes == 1


def test_add_then_remove_equals_never_added():
  rng = np.random.default_rng(5)
  for _ in range(60):
    depth = int(rng.choice([2, 4, 8]))
    a, b, c = (rng.integers(0, 3, int(rng.integers(5, 30))).tolist() for _ in range(3))
    with_b, without_b = SuffixIndex(depth), SuffixIndex(depth)
    for q in (a, b, c):
      with_b.add(q)
    for q in (a, c):
      without_b.add(q)
    with_b.remove(with_b.sequence_ids()[1])
    for s in all_substrings([a, b, c], depth):
      assert with_b.count(s) == without_b.count(s)
    assert with_b.num_nodes == without_b.num_nodes
    for _ in range(5):
      ctx = rng.integers(0, 3, 12).tolist()
      x, y = with_b.draft(ctx, 10, tree=True), without_b.draft(ctx, 10, tree=True)
      assert x.match_len == y.match_len and math.isclose(x.score, y.score)


def test_long_copy_is_not_capped_by_max_depth():
  rng = np.random.default_rng(6)
  passage = rng.integers(0, 1000, 100).tolist()
  ctx = rng.integers(0, 1000, 30).tolist() + passage + passage[:50]
  index = SuffixIndex(max_depth=8)
  index.add(ctx)
  d = index.draft(ctx, 50, offset=0.0)  # alpha * 50 + 0 tokens: needs the whole match.
  assert d.tokens == passage[50:100]
  assert d.match_len == 50 and d.probs == [1.0] * 50
  d = index.draft(ctx, 50, tree=True, offset=0.0)
  assert d.tokens == passage[50:100] and d.parents == list(range(-1, 49))
  # Through the decoder too, local and global.
  dec = SuffixDecoder(SuffixConfig(max_depth=8, offset=0.0, tree=False))
  dec.start("a", ctx)
  d = dec.propose("a", 50)
  assert d.tokens == passage[50:100] and d.source == "local"
  dec.start("b", [7, 7])
  dec.extend("b", passage)
  dec.finish("b")
  dec.start("c", passage[:60])
  d = dec.propose("c", 40)
  assert d.tokens == passage[60:100] and d.source == "global"


def test_update_cost_is_bounded_by_depth():
  """Node updates per appended token stay <= max_depth however long the history."""
  depth = 16
  index = SuffixIndex(depth)
  rng = np.random.default_rng(7)
  block = rng.integers(0, 50, 200).tolist()
  seq = index.add()
  worst = 0
  for rep in range(30):  # Repeats make every open suffix non-unique (the worst case).
    for chunk in (block[:100], block[100:]):
      before = index.update_steps
      index.extend(seq, chunk)
      worst = max(worst, (index.update_steps - before) / len(chunk))
      for t in chunk[:20]:
        before = index.update_steps
        index.extend(seq, [t])
        assert index.update_steps - before <= depth
  assert depth / 2 < worst <= depth  # The repeats did exercise long open suffixes.
  g = SuffixIndex(depth)  # Many sequences: the cost does not grow with the index.
  for _ in range(200):
    g.add(block[:rng.integers(10, 200)])
  before = g.update_steps
  g.add(block)
  assert g.update_steps - before <= depth * len(block)


def test_decoder_picks_the_higher_score_and_ties_go_local():
  dec = SuffixDecoder(SuffixConfig(max_depth=8, tree=False))
  dec.start("old", [1])
  dec.extend("old", [2, 3, 4, 5, 6, 7])
  dec.finish("old")
  assert dec.stats()["global_tokens"] == 6  # Outputs only, not the prompt.
  # Local: "2 3" was followed by 9 once and by 4 once (p = 0.5); global: by 4 (p = 1).
  dec.start("new", [2, 3, 9, 2, 3, 4, 2, 3])
  d = dec.propose("new", 4)
  assert d.source == "global" and d.tokens[:2] == [4, 5] and d.probs[0] == 1.0
  dec.finish("new", cache=False)
  dec.start("tie", [2, 3, 4, 5, 6, 7, 0, 2, 3])  # Same continuation in both: local.
  d = dec.propose("tie", 2)
  assert d.source == "local" and d.tokens == [4, 5]
  dec.start("none", [100, 101])
  assert dec.propose("none", 5) == Draft.empty()
  with pytest.raises(ValueError, match="already active"):
    dec.start("none", [1])
  with pytest.raises(ValueError, match="not active"):
    dec.propose("missing", 3)


def test_global_budget_evicts_oldest_first():
  dec = SuffixDecoder(SuffixConfig(max_depth=4, max_tokens_global=100))
  for r in range(20):
    dec.start(r, [0])
    dec.extend(r, [r] * 30)
    dec.finish(r)
    assert dec.stats()["global_tokens"] <= 100
  g = dec.global_index
  assert [g.tokens(s)[0] for s in g.sequence_ids()] == [17, 18, 19]
  dec.start("big", [0])
  dec.extend("big", list(range(1000, 1250)))
  dec.finish("big")  # Longer than the budget: its last 100 tokens.
  assert g.tokens(g.sequence_ids()[0]) == list(range(1150, 1250))


def test_soak_10k_requests():
  """The global budget holds at every step; nodes stay bounded; it is fast."""
  rng = np.random.default_rng(8)
  budget = 20_000
  dec = SuffixDecoder(SuffixConfig(max_depth=8, max_tokens_global=budget))
  phrases = [rng.integers(0, 500, int(rng.integers(3, 20))).tolist() for _ in range(200)]

  def text(n):  # Recurring phrases and noise, like structured outputs.
    out = []
    while len(out) < n:
      out += phrases[int(rng.zipf(1.5)) % 200] if rng.random() < 0.5 else [
          int(rng.integers(0, 5000))]
    return out[:n]

  t0 = time.perf_counter()
  active, max_nodes, proposed = [], 0, 0
  for r in range(10_000):
    n = int(rng.integers(20, 201))
    p = int(rng.integers(1, n))
    body = text(n)
    dec.start(r, body[:p])
    active.append((r, body[p:]))
    if len(active) > 8 or r == 9_999:  # Eight requests in flight, decoded in rounds.
      while active:
        for rid, rest in list(active):
          d = dec.propose(rid, 8, max_depth=8)
          proposed += len(d.tokens)
          k = int(rng.integers(1, 6))
          dec.extend(rid, rest[:k])
          if len(rest) <= k:
            dec.finish(rid)
            active.remove((rid, rest))
            s = dec.stats()
            assert s["global_tokens"] <= budget
            max_nodes = max(max_nodes, s["global_nodes"])
          else:
            active[active.index((rid, rest))] = (rid, rest[k:])
  elapsed = time.perf_counter() - t0
  s = dec.stats()
  assert s["local_requests"] == 0 and s["global_tokens"] <= budget
  assert max_nodes <= 2 * budget + 1  # A compressed trie: < 2 nodes per token.
  assert proposed > 10_000  # The recurring phrases were drafted.
  assert elapsed < 60, elapsed


def test_memory_estimate_matches_tracemalloc():
  rng = np.random.default_rng(9)
  words = rng.integers(0, 20_000, 300).tolist()
  tokens = [words[int(i) % 300] for i in rng.zipf(1.3, 60_000)]  # Text-like stream.
  intern = {t: t for t in tokens}  # Token ints exist outside the index already.
  gc.collect()
  tracked = len(gc.get_objects())
  tracemalloc.start()
  before = tracemalloc.get_traced_memory()[0]
  index = SuffixIndex(32, intern=intern)
  for i in range(0, len(tokens), 200):
    index.add(tokens[i:i + 200])
  measured = tracemalloc.get_traced_memory()[0] - before
  tracemalloc.stop()
  estimate = index.memory_bytes()
  assert 0.75 < estimate / measured < 1.33, (estimate, measured)
  assert measured / index.num_tokens < 300  # Bytes per cached token.
  # Nodes are ids into lists, not objects: the cyclic GC has almost nothing to track.
  gc.collect()
  assert len(gc.get_objects()) - tracked < index.num_nodes / 10


def test_numpy_and_bad_inputs():
  index = SuffixIndex(4)
  sid = index.add(np.array([1, 2, 3, 1, 2], np.int32))
  assert index.count([1, 2]) == 2 and index.draft([1, 2], 3).tokens == [3, 1, 2]
  with pytest.raises(ValueError, match="integer"):
    index.extend(sid, np.array([1.5]))
  with pytest.raises(ValueError, match="integers"):
    index.extend(sid, [1.5])
  with pytest.raises(ValueError, match="No sequence"):
    index.extend(99, [1])
  with pytest.raises(ValueError, match="longer than max_depth"):
    index.count([1] * 5)
  with pytest.raises(ValueError, match="max_depth"):
    SuffixConfig(max_depth=0)
