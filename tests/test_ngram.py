"""NgramProposer against a brute-force scan of the context."""

import numpy as np
import pytest

from specjax.ngram import NgramProposer
from specjax.suffix_index import Draft


def brute_force(ctx, max_ngram, min_ngram, k):
  """Continuation after the latest earlier occurrence of the longest trailing n-gram."""
  for n in range(max_ngram, min_ngram - 1, -1):
    if len(ctx) < n:
      continue
    tail = ctx[len(ctx) - n:]
    for end in range(len(ctx) - 1, n - 1, -1):  # Latest first; ctx[end] must exist.
      if ctx[end - n:end] == tail:
        return ctx[end:end + k], n
  return [], 0


def test_against_brute_force():
  rng = np.random.default_rng(0)
  for case in range(400):
    max_ngram = int(rng.integers(1, 5))
    min_ngram = int(rng.integers(1, max_ngram + 1))
    vocab = int(rng.integers(1, 6))
    prop = NgramProposer(max_ngram=max_ngram, min_ngram=min_ngram)
    ctx = rng.integers(0, vocab, int(rng.integers(0, 20))).tolist()
    prop.start(case, ctx)
    for _ in range(8):  # Incremental extension agrees with a fresh scan.
      k = int(rng.integers(1, 12))
      d = prop.propose(case, k)
      toks, n = brute_force(ctx, max_ngram, min_ngram, k)
      assert d.tokens == toks, (ctx, max_ngram, min_ngram, d, toks)
      if toks:
        assert d.match_len == n and d.source == "local"
        assert d.parents == list(range(-1, len(toks) - 1)) and d.probs == [1.0] * len(toks)
        assert d.score == len(toks)
      else:
        assert d == Draft.empty()
      new = rng.integers(0, vocab, int(rng.integers(1, 4))).tolist()
      prop.extend(case, np.array(new) if rng.random() < 0.5 else new)
      ctx += new
    prop.finish(case)


def test_latest_occurrence_and_caps():
  prop = NgramProposer(max_ngram=2, min_ngram=1)
  prop.start("r", [5, 6, 1, 5, 6, 2, 5, 6])
  assert prop.propose("r", 3).tokens == [2, 5, 6]  # After the latest "5 6", not the first.
  assert prop.propose("r", 3, max_depth=1).tokens == [2]
  assert prop.propose("r", 0) == Draft.empty()
  prop.extend("r", [9])
  assert prop.propose("r", 3) == Draft.empty()  # 9 never occurred before.
  with pytest.raises(ValueError, match="already active"):
    prop.start("r", [1])
  prop.finish("r")
  with pytest.raises(ValueError, match="not active"):
    prop.propose("r", 1)
  with pytest.raises(ValueError, match="min_ngram"):
    NgramProposer(max_ngram=1, min_ngram=2)
