"""Model, attention, cache and sampling on tiny random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax import attention, kv_cache, model, sampling
from specjax.config import RopeScaling, tiny_config
from specjax.params import check_params, init_params, param_bytes, param_specs
from tests import numpy_reference


def _prefill_logits(cfg, params, tokens, cache_size=64, window=None):
  """Logits of one full-sequence forward from an empty cache: f32[T, V]."""
  cache = kv_cache.init_cache(cfg, 1, cache_size)
  logits, _ = model.forward(params, cfg, jnp.asarray([tokens]), cache, window=window)
  return np.asarray(logits[0])


def _stepwise_logits(cfg, params, tokens, cache_size=64, window=None):
  """Logits of token-by-token decoding with cache commits: f32[T, V]."""
  @jax.jit  # one compiled step (op-by-op dispatch of the scanned stack is slow)
  def step(params, cache, token):
    logits, new = model.forward(params, cfg, token[None, None], cache, window=window)
    return kv_cache.commit(cache, new, jnp.ones((1,), jnp.int32)), logits[0, 0]

  cache = kv_cache.init_cache(cfg, 1, cache_size)
  out = []
  for t in tokens:
    cache, logits = step(params, cache, jnp.asarray(t, jnp.int32))
    out.append(np.asarray(logits))
  return np.stack(out)


def _rel_err(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True},
    {"num_kv_heads": 1, "num_heads": 4},  # multi-query
    {"num_kv_heads": 4},  # plain multi-head
    {"rope_scaling": RopeScaling(factor=8.0, original_max_position=32)},
])
def test_logits_match_float64_numpy(overrides):
  cfg = tiny_config(**overrides)
  params = init_params(cfg, jax.random.key(1))
  tokens = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 24))
  ref = numpy_reference.forward(cfg, params, tokens)
  assert _rel_err(_prefill_logits(cfg, params, tokens), ref) < 1e-5


def test_rope_scaling_changes_logits():
  """Guards the test above: Llama-3.1 scaling must actually be applied."""
  cfg = tiny_config()
  scaled = cfg.replace(rope_scaling=RopeScaling(factor=8.0, original_max_position=32))
  params = init_params(cfg, jax.random.key(1))
  tokens = list(range(3, 27))
  assert _rel_err(_prefill_logits(cfg, params, tokens),
                  numpy_reference.forward(scaled, params, tokens)) > 1e-3


def test_prefill_equals_token_by_token_decode():
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(2))
  tokens = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 20))
  np.testing.assert_allclose(_stepwise_logits(cfg, params, tokens),
                             _prefill_logits(cfg, params, tokens), rtol=1e-4, atol=1e-4)


def test_window_decode_matches_numpy_sparse_mask():
  """A sinks + recent-window draft reads exactly those prefix positions."""
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(3))
  tokens = list(np.random.default_rng(2).integers(0, cfg.vocab_size, 30))
  window = attention.Window(sinks=2, recent=5)
  got = _stepwise_logits(cfg, params, tokens, window=window)
  ref = numpy_reference.forward(cfg, params, tokens, window=(2, 5))
  assert _rel_err(got, ref) < 1e-5
  full = numpy_reference.forward(cfg, params, tokens)
  assert _rel_err(got, full) > 1e-3  # the window really drops positions


def test_attention_new_mask_and_ragged_lengths_match_dense():
  """Prefix + new tokens with an arbitrary mask == one dense masked softmax."""
  rng = np.random.default_rng(4)
  B, T, H, K, D, S = 3, 5, 6, 2, 8, 16
  q = rng.normal(size=(B, T, H, D)).astype(np.float32)
  kn, vn = (rng.normal(size=(B, T, K, D)).astype(np.float32) for _ in range(2))
  kc, vc = (rng.normal(size=(B, K, S, D)).astype(np.float32) for _ in range(2))
  lengths = np.array([0, 7, 16], np.int32)
  parents = [-1, 0, 0, 1, 1]  # a small tree: ancestor mask
  mask = np.eye(T, dtype=bool)
  for t in range(T):
    a = parents[t]
    while a >= 0:
      mask[t, a] = True
      a = parents[a]
  out = np.asarray(attention.attention(q, kn, vn, kc, vc, lengths, mask))
  for b in range(B):
    n = lengths[b]
    keys = np.concatenate([kc[b, :, :n].transpose(1, 0, 2), kn[b]], 0)  # [n+T, K, D]
    vals = np.concatenate([vc[b, :, :n].transpose(1, 0, 2), vn[b]], 0)
    vis = np.concatenate([np.ones((T, n), bool), mask], 1)
    for h in range(H):
      s = q[b, :, h] @ keys[:, h // 3].T / np.sqrt(D)
      s = np.where(vis, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      np.testing.assert_allclose(out[b, :, h], (p / p.sum(-1, keepdims=True)) @ vals[:, h // 3],
                                 rtol=1e-5, atol=1e-5)


def test_commit_writes_selected_tokens_at_row_positions():
  cfg = tiny_config(num_layers=1)
  cache = kv_cache.init_cache(cfg, 2, 16)
  cache = kv_cache.KVCache(cache.k, cache.v, jnp.array([3, 5], jnp.int32))
  T = 4
  k = jnp.arange(2 * T, dtype=jnp.float32).reshape(1, 2, T, 1, 1) + 1
  k = jnp.broadcast_to(k, (1, 2, T, cfg.num_kv_heads, cfg.head_dim))
  new = kv_cache.NewKV(k=k, v=-k)
  src = jnp.array([[0, 2, 3, 1], [3, 0, 0, 0]], jnp.int32)
  out = kv_cache.commit(cache, new, jnp.array([3, 1], jnp.int32), src)
  np.testing.assert_array_equal(out.lengths, [6, 6])
  got = np.asarray(out.k[0, :, 0, :, 0])  # [B, S]
  expected = np.zeros((2, 16), np.float32)
  expected[0, 3:6] = [1, 3, 4]  # row 0 keeps nodes 0, 2, 3 after its 3 tokens
  expected[1, 5] = 8  # row 1 keeps node 3 after its 5 tokens
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(np.asarray(out.v[0, :, 0, :, 0]), -expected)


def test_params_declaration_is_consistent():
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(0))
  check_params(cfg, params)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert param_bytes(cfg) == 4 * n
  assert jax.tree.structure(param_specs(cfg), is_leaf=lambda x: hasattr(x, "logical_axes")) \
      .num_leaves == len(jax.tree.leaves(params))
  with pytest.raises(ValueError, match="shape"):
    bad = jax.tree.map(lambda x: x, params)
    bad.final_norm = jnp.ones((cfg.embed + 1,))
    check_params(cfg, bad)


def test_bfloat16_compute_stays_close_to_float32():
  cfg = tiny_config()
  params = init_params(cfg, jax.random.key(5))
  tokens = list(range(10, 30))
  f32 = _prefill_logits(cfg, params, tokens)
  bf16 = _prefill_logits(cfg.replace(compute_dtype="bfloat16", param_dtype="bfloat16"),
                         jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens)
  assert _rel_err(bf16, f32) < 3e-2


# ---------------------------------------------------------------------------- sampling


def test_top_k_top_p_filtering():
  logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
  keep = lambda sp: np.isfinite(np.asarray(sampling.filtered_logits(logits, sp)))
  np.testing.assert_array_equal(keep(sampling.SamplingParams(1.0, top_k=2)),
                                [1, 1, 0, 0, 0])
  # Mass before token i: 0, .4, .7, .85, .95 -> top_p=.8 keeps the first three.
  np.testing.assert_array_equal(keep(sampling.SamplingParams(1.0, top_p=0.8)),
                                [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(keep(sampling.SamplingParams(1.0, top_p=0.3)),
                                [1, 0, 0, 0, 0])
  p = np.asarray(sampling.probabilities(logits, sampling.SamplingParams(1.0, top_k=3)))
  np.testing.assert_allclose(p, np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85, rtol=1e-5)


def test_sample_matches_probabilities_statistically():
  """Chi-square: draws from sample() follow probabilities() (temperature + top-k)."""
  logits = jnp.array([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
  sp = sampling.SamplingParams(temperature=0.7, top_k=4)
  n = 20000
  draws = sampling.sample(jax.random.key(0), jnp.broadcast_to(logits, (n, 6)), sp)
  counts = np.bincount(np.asarray(draws), minlength=6)
  expected = np.asarray(sampling.probabilities(logits, sp)) * n
  assert counts[4:].sum() == 0
  chi2 = (((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum()
  assert chi2 < 16.3  # 3 dof, p = 0.001


def test_sampling_params_validation():
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplingParams(temperature=-1)
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingParams(temperature=1, top_p=0)
