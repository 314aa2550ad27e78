"""specjax.generate / specjax.logits on a tiny random model: batching, stopping, errors."""

import jax
import numpy as np
import pytest

import specjax
from specjax import engine, memory
from specjax.config import tiny_config
from specjax.params import init_params

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 61))]


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(eos_ids=())
  return specjax.Model(config=cfg, params=init_params(cfg, jax.random.key(0)), tokenizer=None)


def _greedy_reference(model, prompt, n):
  """Greedy continuation by re-running the full forward on the growing sequence."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(specjax.logits(model, seq)[-1])))
  return seq[len(prompt):]


def test_greedy_batch_matches_full_recompute(tiny):
  out = specjax.generate(tiny, PROMPTS, max_new_tokens=10, prefill_chunk=16)
  for prompt, tokens in zip(PROMPTS, out.tokens):
    assert tokens == _greedy_reference(tiny, prompt, 10)
  assert out.stats.new_tokens == 30 and out.stats.decode_steps == 9


def test_rows_are_independent_of_batch_and_padding(tiny):
  batch = specjax.generate(tiny, PROMPTS, max_new_tokens=12)
  for prompt, tokens in zip(PROMPTS, batch.tokens):
    assert specjax.generate(tiny, [prompt], max_new_tokens=12).tokens[0] == tokens
  batch_logits = specjax.logits(tiny, PROMPTS)
  for prompt, row in zip(PROMPTS, batch_logits):
    np.testing.assert_allclose(row, specjax.logits(tiny, prompt), rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_results(tiny):
  a = specjax.logits(tiny, PROMPTS[2], prefill_chunk=8)
  b = specjax.logits(tiny, PROMPTS[2], prefill_chunk=512)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert (specjax.generate(tiny, PROMPTS, max_new_tokens=6, prefill_chunk=8).tokens ==
          specjax.generate(tiny, PROMPTS, max_new_tokens=6, prefill_chunk=64).tokens)


def test_eos_and_max_new_tokens_per_row(tiny):
  free = specjax.generate(tiny, PROMPTS, max_new_tokens=10).tokens
  eos = free[0][3]  # stop row 0 at its 4th token
  out = specjax.generate(tiny, PROMPTS, max_new_tokens=[10, 4, 10], eos_ids=[eos])
  for b, tokens in enumerate(out.tokens):
    limit = [10, 4, 10][b]
    expected = free[b][:limit]
    if eos in expected:
      expected = expected[:expected.index(eos) + 1]
    assert tokens == expected
  assert out.tokens[0] == free[0][:4] and out.tokens[1] == free[1][:4]


def test_sampling_is_seeded(tiny):
  kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
  a = specjax.generate(tiny, PROMPTS, seed=1, **kw).tokens
  assert a == specjax.generate(tiny, PROMPTS, seed=1, **kw).tokens
  assert a != specjax.generate(tiny, PROMPTS, seed=2, **kw).tokens


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "prompts is empty"),
    ([[1, 2, 256]], {}, r"outside \[0, 256\)"),
    ([[1, -1]], {}, "outside"),
    (["some text"], {}, "no tokenizer"),
    ([[1] * 100], {"max_cache_len": 64}, "max_cache_len"),
    ([[1] * 500], {"max_new_tokens": 20}, "max_seq_len"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ([[1, 2], [3]], {"max_new_tokens": [4, 4, 4]}, "3 entries for a batch of 2"),
    ([[1, 2]], {"method": "beam"}, "available methods"),
])
def test_bad_input_raises_clear_error(tiny, prompts, kwargs, match):
  with pytest.raises(ValueError, match=match):
    specjax.generate(tiny, prompts, **kwargs)


def test_batch_that_does_not_fit_is_refused_before_allocation(tiny, monkeypatch):
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1 << 20)
  with pytest.raises(ValueError, match=r"GiB per device .* only 0\.00 GiB is free"):
    specjax.generate(tiny, [[1, 2, 3]] * 64, max_new_tokens=400)


def test_batch_buckets_halve_down_to_the_mesh_multiple_and_the_smallest():
  assert engine.batch_buckets(8, smallest=1) == (1, 2, 4, 8)
  assert engine.batch_buckets(12, smallest=1) == (1, 2, 4, 8, 12)
  assert engine.batch_buckets(1) == (1,)
  assert engine.batch_buckets(8, multiple=2, smallest=1) == (2, 4, 8)
  assert engine.batch_buckets(6, multiple=4, smallest=1) == (4, 6)
  assert engine.MIN_COMPACT_BATCH == 4
  assert engine.batch_buckets(8) == (4, 8)
  assert engine.batch_buckets(3) == (3,)  # nothing to shrink to
  assert engine.batch_buckets(16, multiple=8) == (8, 16)


def test_batch_rows_keep_the_active_rows_padded_to_the_bucket():
  rows = engine._BatchRows(8, enabled=True)
  done = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
  assert rows.floor() == 4
  keep = rows.keep(done)  # 3 active rows fit 4: padded with the first finished row
  np.testing.assert_array_equal(keep, [1, 4, 7, 0])
  assert rows.keep(np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)) is None  # 5 need all 8
  assert engine._BatchRows(8, enabled=False).keep(done) is None
  assert engine._BatchRows(8, enabled=False).floor() == 0


# Eight rows that finish one after another: the batch shrinks 8 -> 4 (-> 2 -> 1 with
# MIN_COMPACT_BATCH = 1).
RAGGED_PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 3, [3, 4], list(range(20, 61)), [7, 7, 7, 7],
                  [9] * 10, [1, 2, 3] * 5, [40, 41], [12] * 3]
RAGGED_BUDGETS = [3, 30, 9, 17, 5, 25, 2, 12]


def test_batch_compaction_keeps_tokens_eos_and_budgets(tiny, monkeypatch):
  full = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS,
                          compact_batch=False)
  assert full.stats.compactions == []
  out = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS)
  assert out.tokens == full.tokens
  assert out.stats.compactions == [4]
  monkeypatch.setattr(engine, "MIN_COMPACT_BATCH", 1)  # compactions of compacted rows
  out = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS)
  assert out.tokens == full.tokens
  assert out.stats.compactions == [4, 2, 1]
  assert [len(t) for t in out.tokens] == RAGGED_BUDGETS
  eos = full.tokens[1][4]  # row 1 (budget 30) stops at its 5th token instead
  stop = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS, eos_ids=[eos])
  stop_full = specjax.generate(tiny, RAGGED_PROMPTS, max_new_tokens=RAGGED_BUDGETS,
                               eos_ids=[eos], compact_batch=False)
  assert stop.tokens == stop_full.tokens and len(stop.tokens[1]) <= 5
