"""Draft building blocks: the ring cache, SnapKV scoring and selection, the sparse views
of attention, and the validation of draft settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from specjax import attention, drafts, engine, kv_cache, model as model_lib
from specjax.config import tiny_config
from specjax.params import init_params
from tests import numpy_reference


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config(eos_ids=())
  return specjax.Model(config=cfg, params=init_params(cfg, jax.random.key(0)), tokenizer=None)


def _expected_ring_positions(length, sinks, recent):
  return set(range(min(sinks, length))) | set(range(max(length - recent, sinks), length))


def test_ring_holds_sinks_and_last_window_after_appends():
  sinks, recent, B = 3, 5, 3
  R = sinks + recent
  ring = kv_cache.RingCache(k=jnp.zeros((1, B, 1, R, 1)), v=jnp.zeros((1, B, 1, R, 1)),
                            lengths=jnp.zeros((B,), jnp.int32),
                            pos=jnp.full((B, R), -1, jnp.int32))
  rng = np.random.default_rng(0)
  commit = jax.jit(kv_cache.ring_commit, static_argnums=3)
  for _ in range(25):  # up to 25 * 4 = 100 positions: the ring wraps many times
    T = 4
    n_keep = rng.integers(0, T + 1, size=B)
    position = np.asarray(ring.lengths)[:, None] + np.arange(T)[None, :]  # [B, T]
    # Each key/value encodes its position, so a misplaced write is visible.
    val = jnp.asarray(position, jnp.float32)[None, :, :, None, None]  # [1, B, T, 1, 1]
    ring = commit(ring, kv_cache.NewKV(k=val, v=-val), jnp.asarray(n_keep, jnp.int32), sinks)
    for b in range(B):
      length = int(ring.lengths[b])
      pos = np.asarray(ring.pos[b])
      held = pos[pos >= 0]
      assert len(held) == len(set(held.tolist()))
      assert set(held.tolist()) == _expected_ring_positions(length, sinks, recent)
      np.testing.assert_array_equal(np.asarray(ring.k[0, b, 0, :, 0])[pos >= 0], held)
      np.testing.assert_array_equal(np.asarray(ring.v[0, b, 0, :, 0])[pos >= 0], -held)
  assert int(ring.lengths.min()) > 2 * R


def test_ring_from_cache_matches_appends():
  sinks, recent, S = 2, 4, 20
  lengths = jnp.array([0, 1, 3, 6, 7, 13, 20], jnp.int32)
  B = lengths.shape[0]
  positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.float32), (B, S))
  linear = kv_cache.KVCache(k=positions[None, :, None, :, None],
                            v=positions[None, :, None, :, None], lengths=lengths)
  ring = kv_cache.ring_from_cache(linear, lengths, sinks, sinks + recent)
  for b in range(B):
    pos = np.asarray(ring.pos[b])
    assert set(pos[pos >= 0].tolist()) == _expected_ring_positions(int(lengths[b]), sinks,
                                                                   recent)
    # Every held position sits in its ring slot, so later appends evict the oldest.
    slots = np.nonzero(pos >= 0)[0]
    np.testing.assert_array_equal(
        np.asarray(kv_cache.ring_slot(jnp.asarray(pos[slots]), sinks, sinks + recent)), slots)
    np.testing.assert_array_equal(np.asarray(ring.k[0, b, 0, slots, 0]), pos[slots])


def test_ring_view_equals_streaming_window_of_the_full_cache(tiny):
  """A draft reading its ring (masked by stored positions) sees exactly what the
  streaming window of a full cache shows."""
  cfg = tiny.config
  prompts = [list(range(3, 40)), [7, 8, 9], list(range(50, 71))]
  cache = kv_cache.init_cache(cfg, 3, 64)
  cache, _, _ = engine.prefill(tiny.params, cfg, cache, prompts)
  sinks, recent = 2, 6
  ring = kv_cache.ring_from_cache(cache, cache.lengths, sinks, sinks + recent)
  window = attention.Window(sinks, recent)
  tokens = jnp.array([[11, 12], [13, 14], [15, 16]])
  ref, ref_kv = model_lib.forward(tiny.params, cfg, tokens, cache, window=window)
  got, got_kv = model_lib.forward(tiny.params, cfg, tokens, ring.as_kv_cache(), window=window,
                                  slot_pos=ring.pos)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_kv.k, ref_kv.k, rtol=1e-5, atol=1e-5)


def test_prefix_idx_attention_matches_dense_reference():
  B, T, H, K, S, D = 2, 3, 4, 2, 24, 8
  rng = np.random.default_rng(1)
  q, k_new, v_new = (rng.standard_normal(s, np.float32)
                     for s in [(B, T, H, D), (B, T, K, D), (B, T, K, D)])
  k_cache, v_cache = rng.standard_normal((2, B, K, S, D), np.float32)
  lengths = jnp.array([20, 9])
  window = attention.Window(sinks=2, recent=4)
  # Per KV head a different selection; -1 = unused, 22 is past row 1's length.
  prefix_idx = jnp.array([[[0, 1, 5, 9], [-1, 0, 1, 14]], [[0, 1, 3, 22], [-1, -1, 0, 4]]])
  causal = attention.causal_mask(T)
  got = jax.jit(lambda *a: attention.attention(*a, window=window, prefix_idx=prefix_idx))(
      q, k_new, v_new, k_cache, v_cache, lengths, causal)
  G = H // K
  q, k_new, v_new, k_cache, v_cache, prefix_idx = map(
      np.asarray, (q, k_new, v_new, k_cache, v_cache, prefix_idx))
  got = np.asarray(got)
  for b in range(B):
    L = int(lengths[b])
    recent = set(range(max(L - window.recent, window.sinks), L))
    for h in range(H):
      kv = h // G
      seen = sorted(({int(i) for i in prefix_idx[b, kv] if 0 <= i < L}) | recent)
      keys_bh = np.concatenate([k_cache[b, kv, seen], k_new[b, :, kv]])
      vals_bh = np.concatenate([v_cache[b, kv, seen], v_new[b, :, kv]])
      s = q[b, :, h] @ keys_bh.T / np.sqrt(D)  # [T, n + T]
      s[:, len(seen):] = np.where(np.asarray(causal), s[:, len(seen):], -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      ref = (p / p.sum(-1, keepdims=True)) @ vals_bh
      np.testing.assert_allclose(got[b, :, h], ref, rtol=1e-5, atol=1e-5)


def test_snapkv_select_hand_built_scores():
  spec = drafts.SpecConfig(gamma=2, draft_kv="snapkv", sinks=1, window=12, obs_window=4)
  assert spec.num_selected == 8
  S = 24
  scores = np.zeros((1, 2, 2, S), np.float32)  # [L, B, K, S]
  # Row 0 (length 20: candidates 0..15). Head 0: a peak at 10, which the kernel-7 max
  # pool spreads over 7..13, and large scores inside the observation window (18) and
  # past the row's length (22) that must never be chosen. Head 1: a falling ramp.
  scores[0, 0, 0, 10] = 5.0
  scores[0, 0, 0, 2] = 1.0
  scores[0, 0, 0, 18] = 50.0
  scores[0, 0, 0, 22] = 60.0
  scores[0, 0, 1] = S - np.arange(S)
  scores[0, 1] = 7.0  # row 1 (length 6): candidates 0..1 only
  idx = np.asarray(drafts.snapkv_select(jnp.asarray(scores), jnp.array([20, 6]), spec))
  assert idx.shape == (1, 2, 2, 8)
  np.testing.assert_array_equal(idx[0, 0, 0], [0, 7, 8, 9, 10, 11, 12, 13])  # sink + peak
  np.testing.assert_array_equal(idx[0, 0, 1], np.arange(8))
  np.testing.assert_array_equal(idx[0, 1, 0], [-1] * 6 + [0, 1])
  np.testing.assert_array_equal(idx[0, 1, 1], [-1] * 6 + [0, 1])


def test_snapkv_state_selects_only_valid_positions(tiny):
  cfg = tiny.config
  prompts = [list(range(3, 60)), [7], list(range(100, 130))]
  spec = drafts.SpecConfig(gamma=2, draft_kv="snapkv", sinks=2, window=16, obs_window=5)
  cache = kv_cache.init_cache(cfg, 3, 64)
  cache, _, _ = engine.prefill(tiny.params, cfg, cache, prompts)
  tail, n = drafts.prompt_tails(prompts, spec.prompt_tail, cfg.pad_id)
  state = jax.jit(lambda c, t, n: drafts.init_state(spec, tiny.params, cfg, c, t, n))(
      cache, jnp.asarray(tail), jnp.asarray(n))
  idx = np.asarray(state.prefix_idx)  # [L, B, K, 11]
  assert idx.shape == (cfg.num_layers, 3, cfg.num_kv_heads, 11)
  for b, p in enumerate(prompts):
    for sel in idx[:, b].reshape(-1, 11):
      kept = sel[sel >= 0]
      assert len(set(kept.tolist())) == len(kept)
      assert {0, 1} <= set(kept.tolist())  # the sinks, even past a short prompt
      assert all(i < 2 or i < len(p) - 5 for i in kept)  # never the recent part
      # Enough candidates: the whole budget is used; else every candidate is kept.
      assert len(kept) == min(11, max(len(p) - 5, 2))
  # Heads and layers attend differently, so their selections differ.
  assert len({tuple(s) for s in idx[:, 0].reshape(-1, 11)}) > 1


def test_snapkv_scores_match_numpy_first_layer(tiny):
  """Layer 0's scores: the observation window's softmax mass on each earlier position."""
  cfg = tiny.config
  prompts = [list(range(3, 30)), [7, 8, 9, 10]]
  W = 6
  cache = kv_cache.init_cache(cfg, 2, 32)
  cache, _, _ = engine.prefill(tiny.params, cfg, cache, prompts)
  tail, n = drafts.prompt_tails(prompts, W, cfg.pad_id)
  view = kv_cache.KVCache(k=cache.k, v=cache.v, lengths=cache.lengths - jnp.asarray(n))
  scores = np.asarray(model_lib.prefix_scores(
      tiny.params, cfg, jnp.asarray(tail), view, jnp.arange(W)[None] < jnp.asarray(n)[:, None]))
  p = {k: np.asarray(v, np.float64)[0] for k, v in vars(tiny.params.layers).items()}
  # The float64 reference's own pieces (it shares no code with specjax).
  # pylint: disable=protected-access
  rms_norm, rope = numpy_reference._rms_norm, numpy_reference._rope
  inv_freq = numpy_reference._inv_freq(cfg)
  # pylint: enable=protected-access
  G = cfg.num_heads // cfg.num_kv_heads
  for b, prompt in enumerate(prompts):
    T = len(prompt)
    h = rms_norm(np.asarray(tiny.params.embedding, np.float64)[prompt], p["attn_norm"],
                 cfg.rms_eps)
    pos = np.arange(T, dtype=np.float64)
    q = rope(np.einsum("te,ehd->thd", h, p["wq"]), pos, inv_freq)
    k = rope(np.einsum("te,ekd->tkd", h, p["wk"]), pos, inv_freq)
    start = T - n[b]
    ref = np.zeros((cfg.num_kv_heads, T))
    for head in range(cfg.num_heads):
      for t in range(start, T):
        s = k[:t + 1, head // G] @ q[t, head] / np.sqrt(cfg.head_dim)
        e = np.exp(s - s.max())
        ref[head // G, :t + 1] += e / e.sum()
    np.testing.assert_allclose(scores[0, b, :, :start], ref[:, :start], rtol=1e-4, atol=1e-5)
    assert not scores[0, b, :, start:].any()  # the window itself and beyond: not scored


def test_truncated_draft_shares_the_first_layers(tiny):
  draft = drafts.truncated_draft(tiny, 1)
  assert draft.config.num_layers == 1 and draft.config.vocab_size == tiny.config.vocab_size
  assert draft.params.layers.wq.shape[0] == 1
  np.testing.assert_array_equal(draft.params.layers.wq[0], tiny.params.layers.wq[0])
  assert draft.params.embedding is tiny.params.embedding
  with pytest.raises(ValueError, match=r"num_layers=3 must be in \[1, 2\]"):
    drafts.truncated_draft(tiny, 3)


def test_bad_draft_settings_raise_clear_errors(tiny):
  other = tiny_config(eos_ids=(), vocab_size=128, num_layers=1)
  foreign = specjax.Model(config=other, params=init_params(other, jax.random.key(1)),
                          tokenizer=None)
  prompt = [[1, 2, 3]]
  cases = [
      (dict(method="magicdec_draft", draft_model=foreign), "vocab_size"),
      (dict(method="magicdec_draft"), "needs a draft model"),
      (dict(method="magicdec", draft_model=drafts.truncated_draft(tiny, 1)),
       "only used by method='magicdec_draft' or 'sequoia'"),
      (dict(method="magicdec_draft", draft_model=drafts.truncated_draft(tiny, 1), gamma=4,
            sinks=2, window=6), r"5 tokens a round may append; use window >= 7"),
      (dict(method="magicdec", window=None), "needs a draft model"),
      (dict(method="magicdec", draft_kv="snapkv", sinks=4, window=8, obs_window=4),
       "window > sinks \\+ obs_window"),
      (dict(method="magicdec", draft_kv="lru"), "available"),
      (dict(method="magicdec_draft", draft_model=drafts.truncated_draft(tiny, 1),
            draft_kv="snapkv"), "ring"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      specjax.generate(tiny, prompt, max_new_tokens=4, **kwargs)
