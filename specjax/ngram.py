"""N-gram prompt lookup (HF ``PromptLookupCandidateGenerator``, vLLM ``NgramProposer``).

The baseline host draft: find the longest trailing n-gram of the request's own
context (``max_ngram`` down to ``min_ngram`` tokens) that occurred earlier, and
propose the tokens that followed its **most recent** earlier occurrence (HF and vLLM
take the first occurrence; the latest one is the better guess in edited or
repetitive text), up to ``max_tokens``. Incremental: one dict per n maps each n-gram
that has a continuation to the end of its latest occurrence, so a proposal costs
O(max_ngram + draft length) and an appended token O(max_ngram) dict writes.

Same interface and :class:`specjax.suffix_index.Draft` as
:class:`specjax.suffix_index.SuffixDecoder`, path drafts only. Prompt lookup has no
probability model: every drafted token gets probability 1.0, so a draft's score is
its length.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence

import numpy as np

from specjax.suffix_index import Draft


class _Context:
  __slots__ = ("tokens", "tables")

  def __init__(self, n_values):
    self.tokens: list[int] = []
    self.tables = {n: {} for n in n_values}  # n -> {n-gram: end of latest occurrence}


class NgramProposer:
  """Prompt-lookup drafts from each request's own context.

  Args:
    max_ngram: Longest trailing n-gram tried.
    min_ngram: Shortest trailing n-gram tried.
  """

  def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
    if not 1 <= min_ngram <= max_ngram:
      raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}.")
    self.max_ngram = max_ngram
    self.min_ngram = min_ngram
    self._n_values = tuple(range(max_ngram, min_ngram - 1, -1))  # Longest first.
    self._contexts: dict[Hashable, _Context] = {}

  def _context(self, rid) -> _Context:
    try:
      return self._contexts[rid]
    except KeyError:
      raise ValueError(f"Request {rid!r} is not active; call start() first.") from None

  def start(self, rid: Hashable, prompt: Sequence[int]) -> None:
    """A new request whose context is the prompt."""
    if rid in self._contexts:
      raise ValueError(f"Request {rid!r} is already active; finish() it first.")
    self._contexts[rid] = _Context(self._n_values)
    self.extend(rid, prompt)

  def extend(self, rid: Hashable, tokens: Sequence[int]) -> None:
    """Tokens appended to the request's context."""
    ctx = self._context(rid)
    if isinstance(tokens, np.ndarray):
      tokens = tokens.tolist()
    toks = ctx.tokens
    tables = ctx.tables
    for t in map(operator.index, tokens):
      p = len(toks)  # The n-grams ending at p now have a continuation (t).
      for n, table in tables.items():
        if p >= n:
          table[tuple(toks[p - n:p])] = p
      toks.append(t)

  def finish(self, rid: Hashable) -> None:
    """The request is done; its context is dropped."""
    if self._contexts.pop(rid, None) is None:
      raise ValueError(f"Request {rid!r} is not active.")

  def propose(self, rid: Hashable, max_tokens: int, max_depth: int | None = None,
              max_children: int | None = None) -> Draft:
    """The continuation of the latest earlier occurrence of the longest trailing n-gram.

    Args:
      rid: The request.
      max_tokens: Most drafted tokens.
      max_depth: Also caps the length (a path's depth is its length).
      max_children: Ignored (paths only); accepted for interface parity.

    Returns:
      A path draft, empty when no trailing n-gram occurred before.
    """
    del max_children
    ctx = self._context(rid)
    k = max_tokens if max_depth is None else min(max_tokens, max_depth)
    toks = ctx.tokens
    n_ctx = len(toks)
    if k <= 0:
      return Draft.empty()
    for n in self._n_values:
      if n_ctx < n:
        continue
      end = ctx.tables[n].get(tuple(toks[n_ctx - n:]))
      if end is not None:
        draft = toks[end:end + k]
        return Draft(draft, list(range(-1, len(draft) - 1)), [1.0] * len(draft), n, "local")
    return Draft.empty()


__all__ = ["NgramProposer"]
