"""Host-built drafts (SuffixDecoding, n-gram lookup, hybrid) are lossless.

Drafts built on the host between device rounds go through the same verify + commit
path as every other method, as per-row trees (``RowTrees``) padded to a compiled size.
Greedy output must equal autoregressive output token for token, and sampled output
must have the target's distribution, whatever the drafts are: the oracle proposer
below drafts random trees that contain the true continuation on some branch, which
exercises acceptance deep in branching trees of every shape.
"""

import hashlib

import jax
import numpy as np
import pytest

import specjax
from specjax import engine, ngram, sampling, suffix_index, verify
from specjax.config import tiny_config
from specjax.params import init_params
from specjax.suffix_index import Draft
from tests.test_engine import RAGGED_BUDGETS, RAGGED_PROMPTS
from tests.test_speculative import (PROMPT, PROMPTS, _broken_verify, _chi2, _chi2_critical,
                                    small_vocab, tiny)  # noqa: F401 (fixtures)


class RandomTreeProposer:
  """Drafts a random tree per call: one branch follows ``truth`` (each row's greedy
  continuation, when known) for a random number of tokens, the other nodes are random
  tokens. Deterministic given the context, like a real index."""

  def __init__(self, vocab: int, truth=None, max_nodes: int = 12):
    self.vocab, self.truth, self.max_nodes = vocab, truth or {}, max_nodes
    self.ctx, self.prompt_of = {}, {}
    self.finished = []

  def start(self, rid, prompt):
    self.ctx[rid] = list(prompt)
    self.prompt_of[rid] = tuple(prompt)

  def extend(self, rid, tokens):
    self.ctx[rid].extend(tokens)

  def finish(self, rid):
    self.finished.append(rid)
    del self.ctx[rid]

  def propose(self, rid, max_tokens, max_depth=None):
    ctx = self.ctx[rid]
    seed = int.from_bytes(hashlib.sha256(np.asarray(ctx, np.int64).tobytes()).digest()[:4],
                          "little")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, min(max_tokens, self.max_nodes) + 1))
    truth = self.truth.get(self.prompt_of[rid])
    done = len(ctx) - len(self.prompt_of[rid])  # generated so far (the root included)
    good = [] if truth is None else list(truth[done:done + int(rng.integers(0, n + 1))])
    tokens, parents, depth = [], [], []
    true_ids = []
    for i, t in enumerate(good[:max_depth or len(good)]):
      parent = true_ids[-1] if true_ids else -1
      if rng.random() < 0.5:
        tokens.append(int(rng.integers(self.vocab)))
        parents.append(parent)
        depth.append(i + 1)
      tokens.append(int(t))
      parents.append(parent)
      depth.append(i + 1)
      true_ids.append(len(tokens) - 1)
    while len(tokens) < n:  # random extra nodes anywhere
      p = int(rng.integers(-1, len(tokens)))
      d = 1 if p < 0 else depth[p] + 1
      if max_depth is not None and d > max_depth:
        continue
      tokens.append(int(rng.integers(self.vocab)))
      parents.append(p)
      depth.append(d)
    tokens, parents = tokens[:max_tokens], parents[:max_tokens]
    probs = [0.5 ** d for d in depth[:len(tokens)]]
    return Draft(tokens=tokens, parents=parents, probs=probs, match_len=0,
                 source="local" if tokens else "")


@pytest.mark.parametrize("sizing", ["longest", "auto"])
def test_greedy_random_host_trees_equal_autoregressive(tiny, sizing):
  budgets = [20, 13, 30]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  truth = {tuple(p): t for p, t in zip(PROMPTS, ar.tokens)}
  proposer = RandomTreeProposer(tiny.config.vocab_size, truth)
  out = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="suffix",
                         proposer=proposer, host_sizing=sizing, max_draft=15)
  assert out.tokens == ar.tokens
  if sizing == "longest":  # every draft verified whole: the true branches are accepted
    assert out.stats.tokens_per_round > 1.2
  assert len(proposer.finished) == 3 and not proposer.ctx  # every row finished
  host = out.stats.host
  assert len(host.host_s_per_row) == out.stats.decode_steps
  assert set(host.sizes) <= set(engine.HOST_TREE_SIZES)


def test_greedy_suffix_and_ngram_equal_autoregressive(tiny):
  # Repetitive prompts: the suffix index and prompt lookup both find long matches.
  prompts = [[5, 6, 7, 8, 9, 10, 11] * 6, [3, 4, 3, 4, 3, 4, 9], list(range(20, 61)) * 2]
  budgets = [24, 17, 40]
  ar = specjax.generate(tiny, prompts, max_new_tokens=budgets)
  for method in ("suffix", "ngram"):
    out = specjax.generate(tiny, prompts, max_new_tokens=budgets, method=method,
                           host_sizing="longest")
    assert out.tokens == ar.tokens, method
    assert out.stats.decode_steps < sum(budgets)


@pytest.mark.parametrize("threshold", [None, 0.0, 1e9])
def test_greedy_hybrid_equals_autoregressive(tiny, threshold):
  """threshold 0: host drafts whenever there is one; 1e9: always the model draft; None:
  the cost model's bar (calibrated timings, ``host_sizing="auto"``)."""
  budgets = [24, 17, 40]
  prompts = [[5, 6, 7, 8, 9, 10, 11] * 6, [3, 4], list(range(20, 61)) * 2]
  ar = specjax.generate(tiny, prompts, max_new_tokens=budgets)
  out = specjax.generate(tiny, prompts, max_new_tokens=budgets, method="hybrid", gamma=3,
                         sinks=2, window=8, hybrid_threshold=threshold,
                         host_sizing="auto" if threshold is None else "longest")
  assert out.tokens == ar.tokens
  host = out.stats.host
  if threshold == 1e9:  # host drafts only in a row's last rounds, where a chain won't fit
    assert host.model_rows > 0 and host.host_rows <= len(prompts) * 3
  if threshold == 0.0:
    assert host.host_rows > 0


def test_global_index_learns_from_earlier_requests(tiny):
  """A second identical request drafts from the first one's output (global index)."""
  prompt = [[17, 3, 29, 41, 8]]
  decoder = suffix_index.SuffixDecoder()
  first = specjax.generate(tiny, prompt, max_new_tokens=32, method="suffix",
                           proposer=decoder, host_sizing="longest")
  again = specjax.generate(tiny, prompt, max_new_tokens=32, method="suffix",
                           proposer=decoder, host_sizing="longest")
  assert again.tokens == first.tokens
  assert again.stats.decode_steps < first.stats.decode_steps
  assert again.stats.decode_steps <= 4


def test_host_methods_reject_bad_arguments(tiny):
  with pytest.raises(ValueError, match="proposer"):
    specjax.generate(tiny, PROMPTS, method="magicdec", proposer=ngram.NgramProposer())
  with pytest.raises(ValueError, match="int gamma"):
    specjax.generate(tiny, PROMPTS, method="hybrid", gamma="auto")
  with pytest.raises(ValueError, match="sizing"):
    specjax.generate(tiny, PROMPTS, method="suffix", host_sizing="widest")


HOST_STOCHASTIC = {
    "suffix": dict(method="suffix"),
    "ngram": dict(method="ngram"),
    "hybrid": dict(method="hybrid", gamma=2, sinks=1, window=3, hybrid_threshold=0.3),
}


@pytest.mark.parametrize("kind", sorted(HOST_STOCHASTIC))
def test_stochastic_host_drafts_preserve_target_distribution(small_vocab, kind):
  sp = sampling.SamplingParams(temperature=1.0)
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, host_sizing="longest",
                   **HOST_STOCHASTIC[kind])
  assert chi2 < _chi2_critical(df), (chi2, df)


def test_stochastic_random_host_trees_preserve_target_distribution(small_vocab):
  sp = sampling.SamplingParams(temperature=0.9, top_k=5)
  proposer = RandomTreeProposer(small_vocab.config.vocab_size, max_nodes=6)
  # 9000 rows, not 12000: about 13% of the rows finish in the first round, which takes
  # 9000 (not 12000) rows under the 8192-row bucket, so the batch is compacted.
  chi2, df = _chi2(small_vocab, PROMPT, sp, 9000, method="suffix", proposer=proposer,
                   host_sizing="longest", compact_batch=True)
  assert chi2 < _chi2_critical(df), (chi2, df)


def test_distribution_test_detects_broken_host_verification(small_vocab, monkeypatch):
  sp = sampling.SamplingParams(temperature=1.0)
  monkeypatch.setattr(verify, "verify_tree", _broken_verify)
  monkeypatch.setattr(engine, "_COMPILED", {})  # recompile with the broken rule
  proposer = RandomTreeProposer(small_vocab.config.vocab_size, max_nodes=6)
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, method="suffix", proposer=proposer,
                   host_sizing="longest")
  assert chi2 > _chi2_critical(df), (chi2, df)


def test_sharded_host_drafts_equal_single_device(tiny):
  """suffix and hybrid on a (2, 4) mesh of fake CPU devices: the same tokens."""
  from specjax import sharding  # pylint: disable=g-import-not-at-top
  prompts = [[5, 6, 7, 8, 9, 10, 11] * 6, [3, 4, 3, 4, 3, 4, 9], list(range(20, 61)), [7, 7]]
  mesh = sharding.make_mesh(2, 4)
  for kw in (dict(method="suffix"), dict(method="hybrid", gamma=2, sinks=2, window=8)):
    one = specjax.generate(tiny, prompts, max_new_tokens=12, host_sizing="longest", **kw)
    many = specjax.generate(tiny, prompts, max_new_tokens=12, host_sizing="longest",
                            mesh=mesh, **kw)
    assert many.tokens == one.tokens, kw


def test_depth_calibration_learns_where_drafts_stop_being_accepted():
  cal = engine._DepthCalibration(max_depth=8)
  path = np.arange(1, 9)
  for _ in range(60):  # drafts of 8 tokens scored 1.0 each; the first 2 are accepted
    cal.observe(path, np.ones(8), accepted=2)
  f = cal.factors()
  assert f[1] > 0.9 and f[2] > 0.9 and f[3:].max() < 0.1
  assert np.all(np.diff(f) <= 0)  # deeper never above shallower
  # With verify time growing in the size, the calibrated gains pick size 4, not 8/16.
  gains = lambda n: 1.0 + np.cumsum(f[path])[min(n - 1, 8) - 1] if n > 1 else 1.0
  assert engine._choose_host_size([1, 2, 4, 8, 16], gains, lambda n: 1.0 + 0.05 * n) == 4
  # A tree: two nodes at depth 1 share the depth's prediction; one accepted path.
  cal.observe(np.array([1, 1, 2]), np.array([0.5, 0.5, 0.5]), accepted=1)
  assert cal.predicted[1] == pytest.approx(8 + 60 + 1.0)


def test_draft_depths_follow_parents():
  assert engine._draft_depths([-1, 0, 1, -1, 3, 0]).tolist() == [1, 2, 3, 1, 2, 2]
  assert engine._draft_depths([]).tolist() == []


def test_hybrid_round_drops_the_self_draft_when_it_does_not_pay():
  """The hybrid's self-draft costs gamma draft forwards a round: the round plan keeps
  it only where its expected tokens per second beat a round without it."""
  from specjax import cost_model  # pylint: disable=g-import-not-at-top

  spec = engine.spec_config("hybrid", gamma=3)
  sizes = (1, 2, 4, 8)
  active, model = np.ones(2, bool), np.ones(2, bool)
  host_draft = Draft(tokens=[7, 8, 9], parents=[-1, 0, 1], probs=[1.0] * 3, match_len=4,
                     source="local")
  expect = {1: np.array([0.9, 1.7, 2.4])}  # row 1 has a host draft; row 0 none

  def plan(draft_s, use_model, measured=None):
    t = cost_model.Timings(batch=2, context=1024, target={1: 1.0, 2: 1.0, 4: 1.1, 8: 1.3},
                           draft={spec.shape: draft_s})
    return engine._plan_host_round(use_model, active, [None, host_draft], expect, sizes,
                                   spec, t, (measured or {}).get, 1024, 2.0)

  none = np.zeros(2, bool)
  rows, size, whole, rate = plan(0.5, none)
  assert rows == [1] and whole == 4 and size == 4 and rate == pytest.approx((2 + 2.4) / 1.1)
  # Cheap draft forwards: both rows self-drafting (2 accepted each) is the better round.
  assert plan(0.01, model)[3] > plan(0.01, none)[3]
  # Expensive ones (0.5 s each, three a round): the round without them is better.
  assert plan(0.5, model)[3] < plan(0.5, none)[3]
  # A measured round time replaces the calibrated one.
  assert plan(0.5, none, {(1024, 4, False): [4.0, 4.4, 4.2]})[1] == 2
  slow = {(1024, 4, False): [4.2], (1024, 2, False): [3.0]}
  assert plan(0.5, none, slow)[1] == 1  # verifying the host draft now costs too much


@pytest.mark.parametrize("kw", [dict(method="suffix"), dict(method="ngram"),
                                dict(method="hybrid", gamma=2, sinks=2, window=8),
                                dict(method="random")], ids=lambda kw: kw["method"])
def test_greedy_host_drafts_with_batch_compaction_equal_autoregressive(tiny, kw):
  """Rows leave the batch as they finish; their proposer requests keep their rows."""
  ar = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS,
                        compact_batch=False)
  if kw["method"] == "random":  # deep true branches: rows finish at very different rounds
    truth = {tuple(p): t for p, t in zip(RAGGED_PROMPTS, ar.tokens)}
    kw = dict(method="suffix", proposer=RandomTreeProposer(tiny.config.vocab_size, truth))
  out = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS, **kw)
  assert out.tokens == ar.tokens
  batches = out.stats.compactions
  assert batches and batches == sorted(set(batches), reverse=True) and batches[0] < 8
