"""Speculative decoding is lossless: greedy equality and the target distribution."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import cost_model, drafts, engine, sampling, verify
from specjax.tree import TokenTree
from specjax.config import tiny_config
from specjax.params import init_params
from tests.test_engine import RAGGED_BUDGETS, RAGGED_PROMPTS

PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 6, [3, 4], list(range(20, 61))]


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(eos_ids=())
  return specjax.Model(config=cfg, params=init_params(cfg, jax.random.key(0)), tokenizer=None)


@pytest.mark.parametrize("gamma, sinks, window", [(1, 2, 8), (3, 1, 4), (5, 4, 16), (4, 16, 512)])
def test_greedy_magicdec_equals_autoregressive(tiny, gamma, sinks, window):
  budgets = [20, 13, 30]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="magicdec", gamma=gamma,
                        sinks=sinks, window=window)
  assert sd.tokens == ar.tokens
  assert 1.0 <= sd.stats.tokens_per_round <= gamma + 1
  if window >= 512:  # the draft sees everything the target sees: every draft accepted
    assert sd.stats.tokens_per_round > gamma


def _all_accepted(budgets, gamma):
  """Tokens per row-round when every round accepts all gamma drafts (each row's first
  token comes from prefill, its last round may be cut by the budget)."""
  return sum(b - 1 for b in budgets) / sum(math.ceil((b - 1) / (gamma + 1)) for b in budgets)


@pytest.mark.parametrize("gamma, sinks, window, obs_window", [
    (2, 1, 8, 3), (3, 2, 20, 6),
    (4, 4, 96, 80),  # the recent part covers every row: the draft is the target
])
def test_greedy_snapkv_equals_autoregressive(tiny, gamma, sinks, window, obs_window):
  budgets = [20, 13, 30]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="magicdec",
                        draft_kv="snapkv", gamma=gamma, sinks=sinks, window=window,
                        obs_window=obs_window)
  assert sd.tokens == ar.tokens
  assert 1.0 <= sd.stats.tokens_per_round <= gamma + 1
  if obs_window >= 72:  # every prompt + its tokens fit the recent part: all accepted
    assert sd.stats.tokens_per_round == pytest.approx(_all_accepted(budgets, gamma))


@pytest.mark.parametrize("layers, sinks, window", [
    (1, 2, 8),  # a ring of 8 over 60+ positions: evicts many times
    (2, 2, 8),
    (2, 0, None),  # full draft cache; the 2-layer "draft" is the target itself
])
def test_greedy_draft_model_equals_autoregressive(tiny, layers, sinks, window):
  budgets = [60, 45, 52]
  gamma = 3
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="magicdec_draft",
                        draft_model=drafts.truncated_draft(tiny, layers), gamma=gamma,
                        sinks=sinks, window=window)
  assert sd.tokens == ar.tokens
  assert 1.0 <= sd.stats.tokens_per_round <= gamma + 1
  if window is None:  # exact draft KV for every accepted token: every draft accepted
    assert sd.stats.tokens_per_round == pytest.approx(_all_accepted(budgets, gamma))


def test_greedy_magicdec_stops_rows_at_eos_and_budget(tiny):
  free = specjax.generate(tiny, PROMPTS, max_new_tokens=24).tokens
  eos = free[2][5]
  kw = dict(max_new_tokens=[24, 7, 24], eos_ids=[eos])
  assert (specjax.generate(tiny, PROMPTS, method="magicdec", gamma=3, sinks=1, window=6,
                           **kw).tokens == specjax.generate(tiny, PROMPTS, **kw).tokens)


def _cycle_gammas(monkeypatch, order, every=2):
  """Make gamma="auto" switch to the next gamma of ``order`` every ``every`` rounds."""
  trees = itertools.cycle([TokenTree.chain(g) for g in order])
  monkeypatch.setattr(cost_model.ShapeSchedule, "choose",
                      lambda self, context: next(t for t in trees if t in self.trees))
  monkeypatch.setattr(engine, "AUTO_PROBE_ROUNDS", every)
  monkeypatch.setattr(engine, "AUTO_SEGMENT_ROUNDS", every)


AUTO_KINDS = {
    "streaming": lambda m: dict(method="magicdec", sinks=2, window=8),
    "snapkv": lambda m: dict(method="magicdec", draft_kv="snapkv", sinks=1, window=12,
                             obs_window=4),
    "draft_ring": lambda m: dict(method="magicdec_draft", sinks=2, window=10,
                                 draft_model=drafts.truncated_draft(m, 1)),
}


@pytest.mark.parametrize("kind", AUTO_KINDS)
def test_greedy_auto_gamma_switching_equals_autoregressive(tiny, monkeypatch, kind):
  """Switching gamma between segments (to 0 too, and back) changes no token."""
  budgets = [40, 23, 35]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  _cycle_gammas(monkeypatch, [3, 0, 1, 4, 2])
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, gamma="auto",
                        auto_gammas=(0, 1, 2, 3, 4), **AUTO_KINDS[kind](tiny))
  assert sd.tokens == ar.tokens
  used = [g for _, g, _ in sd.stats.segments]
  expected = [3, 1, 4, 2] if kind == "draft_ring" else [3, 0, 1, 4, 2]
  assert used[:len(expected)] == expected
  assert all(rounds <= 2 for _, _, rounds in sd.stats.segments)


def test_greedy_auto_gamma_with_the_calibrated_cost_model(tiny):
  budgets = [40, 23, 35]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="magicdec",
                        gamma="auto", auto_gammas=(0, 1, 2, 4), sinks=2, window=8)
  assert sd.tokens == ar.tokens
  assert sd.stats.calibrate_s > 0
  segments = sd.stats.segments
  assert segments[0][1] in (1, 2, 4)  # the first segment always measures acceptance
  assert all(g in (0, 1, 2, 4) for _, g, _ in segments)
  assert sum(r for _, _, r in segments) == sd.stats.decode_steps


def test_decoding_crosses_context_buckets_without_changing_tokens(tiny, monkeypatch):
  budgets = [40, 23, 35]
  whole = {m: specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method=m, gamma=3,
                               sinks=2, window=8) for m in ("autoregressive", "magicdec")}
  limits = lambda out: list(dict.fromkeys(s[0] for s in out.stats.segments))
  assert limits(whole["magicdec"]) == [128]
  monkeypatch.setattr(engine, "DECODE_BUCKET", 16)
  for m, ref in whole.items():
    out = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method=m, gamma=3, sinks=2,
                           window=8)
    assert out.tokens == ref.tokens
    # Longest prompt 42: the loop first reads 64 slots, then the whole (128) cache.
    assert limits(out) == [64, 128]  # (more segments: rows leave the batch)


# Ranks 0..2 at the root, a deep first branch: exercises width, depth and padding.
TREE = TokenTree((-1, 0, 0, 0, 1, 1, 3, 4, 7))

TREE_KINDS = {
    "streaming": lambda m: dict(sinks=2, window=8),
    "streaming_exact": lambda m: dict(sinks=2, window=512),  # the draft is the target
    "snapkv": lambda m: dict(draft_kv="snapkv", sinks=1, window=12, obs_window=4),
    "draft_ring": lambda m: dict(sinks=2, window=10, draft_model=drafts.truncated_draft(m, 1)),
    "draft_full": lambda m: dict(window=None, draft_model=drafts.truncated_draft(m, 2)),
}


@pytest.mark.parametrize("kind", TREE_KINDS)
def test_greedy_tree_speculation_equals_autoregressive(tiny, kind):
  budgets = [40, 23, 35]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="sequoia", tree=TREE,
                        **TREE_KINDS[kind](tiny))
  assert sd.tokens == ar.tokens
  assert 1.0 <= sd.stats.tokens_per_round <= TREE.max_depth + 1
  if kind in ("streaming_exact", "draft_full"):  # exact drafts: the first branch always
    assert sd.stats.tokens_per_round == pytest.approx(
        _all_accepted(budgets, TREE.max_depth))


def test_greedy_optimal_tree_from_acceptance_vector(tiny):
  budgets = [30, 12, 25]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="sequoia", tree=12,
                        tree_depth=4, acceptance=(0.6, 0.3, 0.2), sinks=2, window=8)
  assert sd.tokens == ar.tokens


def test_greedy_auto_tree_with_the_calibrated_cost_model(tiny):
  budgets = [30, 12, 25]
  ar = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets)
  sd = specjax.generate(tiny, PROMPTS, max_new_tokens=budgets, method="sequoia", tree="auto",
                        tree_depth=4, acceptance=(0.6, 0.3), sinks=2, window=8)
  assert sd.tokens == ar.tokens
  choices = {t.size - 1 for t in engine.auto_trees((0.6, 0.3), max_depth=4)}
  assert sd.stats.segments[0][1] > 0  # the first segment measures acceptance
  assert all(drafted in choices for _, drafted, _ in sd.stats.segments)


def test_verify_chain_greedy_rule():
  V = 5
  onehot = lambda ids: jax.nn.one_hot(jnp.asarray(ids), V)
  drafts = jnp.array([[1, 2, 3], [1, 2, 3], [4, 4, 4]])
  p = onehot([[1, 2, 3, 0], [1, 0, 3, 2], [2, 4, 4, 1]])  # target argmax per position
  n, nxt = verify.verify_chain(jax.random.key(0), drafts, onehot(drafts), p)
  np.testing.assert_array_equal(n, [3, 1, 0])
  np.testing.assert_array_equal(nxt, [0, 0, 2])  # bonus; correction; correction


def _chi2_critical(df, z=3.09):  # Wilson-Hilferty, p ~ 0.001
  return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _exact_joint(model, prompt, sp, n_tokens, V):
  """P(t1..tn | prompt) under the target with the sampling filters, by enumeration."""
  prefixes = [list(prompt) + list(t) for k in range(n_tokens)
              for t in itertools.product(range(V), repeat=k)]
  probs = {tuple(p[len(prompt):]): np.asarray(sampling.probabilities(jnp.asarray(l[-1]), sp))
           for p, l in zip(prefixes, specjax.logits(model, prefixes))}
  joint = {}
  for seq in itertools.product(range(V), repeat=n_tokens):
    joint[seq] = np.prod([probs[seq[:k]][seq[k]] for k in range(n_tokens)])
  return joint


def _chi2(model, prompt, sp, n_rows, compact_batch=False, **kw):
  """Chi-square of the generated 3-token sequences against the exact joint, and its
  degrees of freedom. ``compact_batch`` is off unless a test asks for it: the batch
  would shrink through a few of its 12000 rows' buckets, one compile each; the chain
  and random host-tree tests ask for it (sampling with a shrinking batch)."""
  V = model.config.vocab_size
  # prefill_chunk = the prompt's own (rounded) length: the memory check then sizes the
  # 12000-row prefill as it really runs, not as a default 512-token chunk would.
  out = specjax.generate(model, [prompt] * n_rows, max_new_tokens=3, temperature=sp.temperature,
                         top_k=sp.top_k, top_p=sp.top_p, seed=7,
                         prefill_chunk=-(-len(prompt) // 8) * 8,
                         compact_batch=compact_batch, **kw)
  assert bool(out.stats.compactions) == compact_batch  # rows finish at different rounds
  counts = {}
  for t in out.tokens:
    counts[tuple(t)] = counts.get(tuple(t), 0) + 1
  expected = {k: v * n_rows for k, v in _exact_joint(model, prompt, sp, 3, V).items()}
  big = [k for k, e in expected.items() if e >= 5]
  rest_e = n_rows - sum(expected[k] for k in big)
  rest_o = n_rows - sum(counts.get(k, 0) for k in big)
  chi2 = sum((counts.get(k, 0) - expected[k]) ** 2 / expected[k] for k in big)
  if rest_e >= 5:
    chi2 += (rest_o - rest_e) ** 2 / rest_e
  return chi2, len(big) - (0 if rest_e >= 5 else 1)


@pytest.fixture(scope="module")
def small_vocab():
  cfg = tiny_config(vocab_size=6, eos_ids=(), pad_id=0, bos_id=None)
  params = init_params(cfg, jax.random.key(11))
  params.embedding = params.embedding * 4.0  # sharper, input-dependent distributions
  return specjax.Model(config=cfg, params=params, tokenizer=None)


STOCHASTIC = dict(method="magicdec", gamma=2, sinks=1, window=3)
PROMPT = [1, 4, 2, 5, 3, 0, 4, 1, 2, 2, 5, 3]


@pytest.mark.parametrize("sp", [sampling.SamplingParams(temperature=1.0),
                                sampling.SamplingParams(temperature=0.8, top_k=4, top_p=0.9)])
def test_stochastic_magicdec_preserves_target_distribution(small_vocab, sp):
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, compact_batch=True, **STOCHASTIC)
  assert chi2 < _chi2_critical(df), (chi2, df)


@pytest.mark.parametrize("policy", ["snapkv", "draft_ring", "draft_full"])
def test_stochastic_new_drafts_preserve_target_distribution(small_vocab, policy):
  kw = {"snapkv": dict(method="magicdec", draft_kv="snapkv", gamma=2, sinks=1, window=6,
                       obs_window=2),
        "draft_ring": dict(method="magicdec_draft", gamma=2, sinks=1, window=4,
                           draft_model=drafts.truncated_draft(small_vocab, 1)),
        "draft_full": dict(method="magicdec_draft", gamma=2, window=None,
                           draft_model=drafts.truncated_draft(small_vocab, 1)),
        }[policy]
  sp = sampling.SamplingParams(temperature=1.0)
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, **kw)
  assert chi2 < _chi2_critical(df), (chi2, df)


def test_stochastic_auto_gamma_switching_preserves_target_distribution(small_vocab,
                                                                      monkeypatch):
  """Every round switches gamma (1, 0, 2, ...): the first three tokens span switches."""
  _cycle_gammas(monkeypatch, [1, 0, 2], every=1)
  sp = sampling.SamplingParams(temperature=1.0)
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, method="magicdec", gamma="auto",
                   auto_gammas=(0, 1, 2), sinks=1, window=3)
  assert chi2 < _chi2_critical(df), (chi2, df)


SMALL_TREE = TokenTree((-1, 0, 0, 1, 2))  # two ranks at the root, two levels


@pytest.mark.parametrize("draft", ["streaming", "draft_ring"])
def test_stochastic_tree_speculation_preserves_target_distribution(small_vocab, draft):
  kw = dict(sinks=1, window=3) if draft == "streaming" else dict(
      sinks=1, window=4, draft_model=drafts.truncated_draft(small_vocab, 1))
  sp = sampling.SamplingParams(temperature=0.9, top_k=5)
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, method="sequoia", tree=SMALL_TREE, **kw)
  assert chi2 < _chi2_critical(df), (chi2, df)


_VERIFY_TREE = verify.verify_tree


def _broken_verify(key, tree, tokens, q, p):
  """Wrong on purpose: after the accepted path, sample from p instead of the residual."""
  path, n, _ = _VERIFY_TREE(key, tree, tokens, q, p)
  last = jnp.take_along_axis(path, n[:, None], axis=1)[:, 0]
  p_n = jnp.take_along_axis(p, last[:, None, None], axis=1)[:, 0]
  nxt = jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p_n)).astype(jnp.int32)
  return path, n, nxt


@pytest.mark.parametrize("kw", [STOCHASTIC, dict(method="sequoia", tree=SMALL_TREE, sinks=1,
                                                 window=3)], ids=["chain", "tree"])
def test_distribution_test_detects_broken_verification(small_vocab, monkeypatch, kw):
  sp = sampling.SamplingParams(temperature=1.0)
  monkeypatch.setattr(verify, "verify_tree", _broken_verify)
  monkeypatch.setattr(engine, "_COMPILED", {})  # recompile with the broken rule
  chi2, df = _chi2(small_vocab, PROMPT, sp, 12000, **kw)
  assert chi2 > _chi2_critical(df), (chi2, df)


def test_magicdec_fills_the_whole_context_without_scratch_slots():
  """prompt + max_new == max_seq_len: drafts past the end are never committed."""
  cfg = tiny_config(eos_ids=(), max_seq_len=256)
  model = specjax.Model(config=cfg, params=init_params(cfg, jax.random.key(4)), tokenizer=None)
  prompts = [list(range(3, 203)), list(range(7, 57))]
  budgets = [56, 40]
  ar = specjax.generate(model, prompts, max_new_tokens=budgets)
  sd = specjax.generate(model, prompts, max_new_tokens=budgets, method="magicdec", gamma=5,
                        sinks=2, window=16)
  assert ar.stats.cache_size == 256 and sd.tokens == ar.tokens


def test_rows_that_finish_past_the_cache_end_do_not_stall_the_others():
  """Row 0 fills the cache and its last round commits drafts past its budget (and past
  the last slot) while row 1 still generates: the loop must go on for row 1."""
  cfg = tiny_config(eos_ids=(), max_seq_len=512)
  model = specjax.Model(config=cfg, params=init_params(cfg, jax.random.key(4)), tokenizer=None)
  prompts = [list(range(3, 241)), list(range(7, 17))]
  budgets = [18, 200]
  ar = specjax.generate(model, prompts, max_new_tokens=budgets)
  for tree in (None, TREE):
    kw = dict(method="magicdec", gamma=4) if tree is None else dict(method="sequoia", tree=tree)
    sd = specjax.generate(model, prompts, max_new_tokens=budgets, sinks=16, window=512, **kw)
    assert sd.stats.cache_size == 256 and sd.tokens == ar.tokens


@pytest.mark.parametrize("kw", [
    dict(method="magicdec", gamma=3, sinks=2, window=8),
    dict(method="magicdec", draft_kv="snapkv", sinks=1, window=12, obs_window=4),
    dict(method="magicdec_draft", sinks=2, window=10, layers=1),
    dict(method="sequoia", tree=8, tree_depth=4, sinks=2, window=8),
], ids=["streaming", "snapkv", "draft_ring", "tree"])  # auto: tests/test_sharding.py
def test_greedy_speculation_with_batch_compaction_equals_autoregressive(tiny, kw):
  """Rows leave the batch as they finish (the draft state is gathered with the cache);
  the reference is autoregressive decoding at the full batch throughout."""
  if "layers" in kw:
    kw = dict(kw, draft_model=drafts.truncated_draft(tiny, kw.pop("layers")))
  ar = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS,
                        compact_batch=False)
  sd = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS, **kw)
  assert sd.tokens == ar.tokens
  batches = sd.stats.compactions
  assert batches and batches == sorted(set(batches), reverse=True) and batches[0] < 8
