"""ModelConfig.attention_impl: the dispatch between the Pallas kernel and XLA attention.

On CPU "pallas" runs the kernel in Pallas interpret mode, so these tests run the
model, a sharded forward (8 fake CPU devices, see conftest.py) and the whole engine on
it and compare with "xla". Interpreted Pallas is slow: configs and prompts are tiny.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import specjax
from pallas_kernels import tree_attention as tree_attention_lib
from specjax import attention, kv_cache, loading, model, sharding
from specjax.config import tiny_config
from specjax.params import init_params
from specjax.tree import TokenTree


@pytest.fixture
def kernel_calls(monkeypatch):
  """Records each trace of the Pallas kernel (a dispatch to it traces it once): its
  keyword arguments, and whether it was traced per shard (inside a shard_map)."""
  calls = []
  kernel = tree_attention_lib.tree_attention

  def counted(*args, **kwargs):
    mesh = jax.sharding.get_abstract_mesh()
    calls.append(dict(kwargs, per_shard=not mesh.empty and mesh.are_all_axes_manual,
                      q_shape=args[0].shape))
    return kernel(*args, **kwargs)

  monkeypatch.setattr(tree_attention_lib, "tree_attention", counted)
  return calls


# ---------------------------------------------------------------------------- config


def test_config_field_is_validated_hashable_and_serialised():
  cfg = tiny_config()
  assert cfg.attention_impl == "auto"
  pallas = dataclasses.replace(cfg, attention_impl="pallas")
  assert pallas != cfg and hash(pallas) != hash(cfg)  # distinct jit cache keys
  assert {cfg: 0, pallas: 1}[dataclasses.replace(cfg, attention_impl="pallas")] == 1
  with pytest.raises(ValueError, match="attention_impl='triton'"):
    dataclasses.replace(cfg, attention_impl="triton")
  # Checkpoint configs round-trip, and those written before the field load as "auto".
  data = loading._config_to_json(pallas)  # pylint: disable=protected-access
  assert loading._config_from_json(data, None) == pallas  # pylint: disable=protected-access
  del data["config"]["attention_impl"]
  assert loading._config_from_json(data, None) == cfg  # pylint: disable=protected-access


# -------------------------------------------------------------------------- dispatch


def _call_arrays(T=4, Tn=4, D=16, dtype=jnp.float32):
  B, H, K, S = 2, 4, 2, 32
  return (jnp.zeros((B, T, H, D), dtype), jnp.zeros((B, Tn, K, D), dtype),
          jnp.zeros((B, K, S, D), dtype))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU's choices")
def test_choose_on_cpu():
  q, kn, kc = _call_arrays()
  assert attention.choose("auto", q, kn, kc) == ("xla", None)
  assert attention.choose("xla", q, kn, kc) == ("xla", None)
  assert attention.choose("pallas", q, kn, kc) == ("pallas", None)
  idx = jnp.zeros((2, 2, 3), jnp.int32)
  for kwargs, reason in [
      (dict(prefix_idx=idx), "prefix_idx"),
      (dict(slot_pos=jnp.zeros((2, 32), jnp.int32)), "slot_pos"),
      (dict(score_queries=jnp.ones((2, 4), bool)), "score_queries"),
  ]:
    chosen, why = attention.choose("pallas", q, kn, kc, **kwargs)
    assert chosen == "xla" and reason in why
  for arrays, reason in [(_call_arrays(T=200, Tn=200), "200 new tokens"),
                         (_call_arrays(D=24), "head_dim 24"),
                         (_call_arrays(D=8), "head_dim 8")]:
    chosen, why = attention.choose("pallas", *arrays)
    assert chosen == "xla" and reason in why
  chosen, why = attention.choose("pallas", q, kn, kc, v_dtypes=(jnp.bfloat16,))
  assert chosen == "xla" and "mixed dtypes" in why
  with pytest.raises(ValueError, match="expected one of 'auto', 'pallas', 'xla'"):
    attention.choose("cuda", q, kn, kc)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_auto_on_an_accelerator_needs_a_mesh_when_devices_are_many(monkeypatch):
  """As on an 8-GPU host: without a mesh in context the partitioning is unknown."""
  monkeypatch.setattr(attention, "_platform", lambda: "gpu")
  q, kn, kc = _call_arrays()
  chosen, why = attention.choose("auto", q, kn, kc)
  assert chosen == "xla" and "no mesh in context" in why
  assert attention.choose("pallas", q, kn, kc) == ("pallas", None)  # asked for it
  with jax.set_mesh(sharding.make_mesh(2, 4)):
    assert attention.choose("auto", q, kn, kc) == ("pallas", None)
  monkeypatch.setattr(attention, "_platform", lambda: "tpu")
  with jax.set_mesh(sharding.make_mesh(1, 8)):  # Mosaic takes any head_dim
    assert attention.choose("auto", *_call_arrays(D=24)) == ("pallas", None)


def test_fallback_is_logged_once_per_reason(caplog):
  attention._log_fallback.cache_clear()  # pylint: disable=protected-access
  B, T, H, K, D, S = 1, 2, 2, 1, 16, 8
  args = (jnp.ones((B, T, H, D)), jnp.ones((B, T, K, D)), jnp.ones((B, T, K, D)),
          jnp.ones((B, K, S, D)), jnp.ones((B, K, S, D)), jnp.array([3]),
          attention.causal_mask(T))
  slot_pos = jnp.arange(S)[None]
  with caplog.at_level(logging.INFO, logger=attention.__name__):
    for _ in range(3):
      attention.attend("pallas", *args, slot_pos=slot_pos)
    attention.attend("pallas", *args, slot_pos=slot_pos, window=attention.Window(1, 2))
    attention.attend("auto", *args)  # CPU's own choice: nothing to report
  records = [r for r in caplog.records if r.name == attention.__name__]
  assert len(records) == 1 and records[0].levelno == logging.WARNING
  assert "slot_pos" in records[0].getMessage()


# ----------------------------------------------------------------------------- model


def _filled(cfg, lengths, size=96, seed=0) -> kv_cache.KVCache:
  """A cache of random keys/values (every slot, so reading past a row's length would
  show) whose rows hold the given lengths."""
  rng = np.random.default_rng(seed)
  shape = kv_cache.cache_shape(cfg, len(lengths), size)  # [L, B, K, S, D]
  k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  return kv_cache.KVCache(k=k, v=v, lengths=jnp.asarray(lengths, jnp.int32))


def _forwards(cfg, params, cache, tokens, **kwargs):
  """Logits of the same forward with attention_impl "xla" and "pallas"."""
  out = {}
  for impl in ("xla", "pallas"):
    c = cfg.replace(attention_impl=impl)
    f = jax.jit(lambda p, t, cache, c=c: model.forward(p, c, t, cache, **kwargs)[0])
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs
      out[impl] = np.asarray(f(params, tokens, cache))
  return out["pallas"], out["xla"]


#       0        The tree of the verify case: two children at the root, a grandchild.
#      / \
#     1   2
#     |
#     3
_PARENTS = (-1, 0, 0, 1)


@pytest.mark.parametrize("case", ["tree_verify", "windowed_draft_with_pending"])
def test_forward_logits_pallas_equal_xla(case, kernel_calls):
  cfg = tiny_config()  # GQA: 4 heads over 2 KV heads
  params = init_params(cfg, jax.random.key(1))
  cache = _filled(cfg, [37, 0, 21])
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (3, 4)))
  if case == "tree_verify":
    tree = TokenTree(_PARENTS)
    kwargs = dict(offsets=jnp.asarray(tree.depths), new_mask=jnp.asarray(tree.ancestor_mask),
                  kv_limit=64)
  else:  # A draft level: sinks + recent prefix, 3 pending drafted tokens, causal.
    rng = np.random.default_rng(2)
    shape = (cfg.num_layers, 3, 3, cfg.num_kv_heads, cfg.head_dim)  # [L, B, P, K, D]
    pending = kv_cache.NewKV(k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                             v=jnp.asarray(rng.standard_normal(shape), jnp.float32))
    mask = np.concatenate([np.ones((4, 3), bool), np.tril(np.ones((4, 4), bool))], axis=1)
    kwargs = dict(offsets=jnp.arange(3, 7), new_mask=jnp.asarray(mask), pending=pending,
                  window=attention.Window(sinks=2, recent=9))
  got, expected = _forwards(cfg, params, cache, tokens, **kwargs)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert len(kernel_calls) == 1  # traced once: the layers are one lax.scan
  if case == "windowed_draft_with_pending":
    assert (kernel_calls[0]["sinks"], kernel_calls[0]["recent"]) == (2, 9)


@pytest.mark.parametrize("platform, lowering, kernel", [
    ("gpu", "cuda", "tree_attention_triton"), ("tpu", "tpu", "tree_attention_mosaic")])
def test_model_lowers_to_the_compiled_kernel(monkeypatch, platform, lowering, kernel):
  """What "pallas" builds on a GPU or TPU (lowering needs no device): a decode step
  whose attention is the compiled kernel."""
  monkeypatch.setattr(attention, "_platform", lambda: platform)
  cfg = tiny_config(attention_impl="pallas")
  sd = jax.ShapeDtypeStruct
  params = jax.tree.map(lambda x: sd(x.shape, x.dtype), init_params(cfg, jax.random.key(0)))
  cache = jax.tree.map(lambda x: sd(x.shape, x.dtype), kv_cache.init_cache(cfg, 2, 256))
  f = jax.jit(lambda p, t, c: model.forward(p, cfg, t, c, kv_limit=128)[0])
  text = f.trace(params, sd((2, 1), jnp.int32), cache).lower(
      lowering_platforms=(lowering,)).as_text()
  assert kernel in text


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_forward_runs_the_kernel_per_shard(kernel_calls):
  """Under jax.set_mesh the kernel runs in a shard_map: 2 of the 4 rows and 1 of the 4
  KV heads (with its 2 query heads) per device of a (2, 4) mesh."""
  cfg = tiny_config(num_heads=8, num_kv_heads=4)
  params = init_params(cfg, jax.random.key(3))
  cache = _filled(cfg, [30, 5, 17, 0], size=64)
  tokens = jnp.asarray(np.random.default_rng(4).integers(3, cfg.vocab_size, (4, 3)))
  xla_cfg = cfg.replace(attention_impl="xla")
  with jax.default_matmul_precision("float32"):
    expected = np.asarray(jax.jit(lambda p, t, c: model.forward(p, xla_cfg, t, c)[0])(
        params, tokens, cache))
  mesh = sharding.make_mesh(2, 4)
  pallas_cfg = cfg.replace(attention_impl="pallas")
  cache_sh = sharding.cache_shardings(cfg, 4, 64, mesh)
  f = jax.jit(lambda p, t, c: model.forward(p, pallas_cfg, t, c)[0],
              in_shardings=(sharding.param_shardings(cfg, mesh),
                            sharding.batch_sharding(mesh, 4, 2), cache_sh))
  with jax.set_mesh(mesh), jax.default_matmul_precision("float32"):
    got = np.asarray(f(sharding.shard_params(params, cfg, mesh), tokens,
                       jax.device_put(cache, cache_sh)))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert [(c["per_shard"], c["q_shape"]) for c in kernel_calls] == [(True, (2, 3, 2, 16))]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_shard_specs_keep_gqa_groups_whole():
  P = jax.sharding.PartitionSpec
  tokens, cache = P("data", None, "model", None), P("data", "model", None, None)
  specs, out = attention.shard_specs(sharding.make_mesh(2, 4), 4, 4, mask_ndim=2)
  assert specs == (tokens, tokens, tokens, cache, cache, P("data"), P(None, None))
  assert out == tokens
  # SmolLM2's 3 KV heads on 8 devices, batch 3 on 2: everything replicated.
  specs, out = attention.shard_specs(sharding.make_mesh(2, 4), 3, 3, mask_ndim=3)
  assert specs[0] == specs[3] == out == P(None, None, None, None)
  assert specs[5] == P(None) and specs[6] == P(None, None, None)
  # 8 query heads over 2 KV heads on a model axis of 4: the groups stay whole.
  specs, _ = attention.shard_specs(sharding.make_mesh(1, 8), 8, 2, mask_ndim=3)
  assert specs[0] == P("data", None, None, None) and specs[3] == P("data", None, None, None)


# ---------------------------------------------------------------------------- engine

_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 41))]


_BUDGETS = [6, 4, 5]


@pytest.fixture(scope="module")
def tiny_pallas():
  cfg = tiny_config(eos_ids=(), name="tiny-attention-impl", attention_impl="pallas")
  return specjax.Model(config=cfg, params=init_params(cfg, jax.random.key(0)),
                       tokenizer=None)


@pytest.fixture(scope="module")
def xla_tokens(tiny_pallas):
  """Greedy autoregressive tokens with XLA attention. Greedy speculation is lossless
  (tests/test_speculative.py), so they are every method's expected output."""
  xla = dataclasses.replace(tiny_pallas, config=tiny_pallas.config.replace(
      attention_impl="xla"))
  with jax.default_matmul_precision("float32"):  # no TF32 on GPUs: no near-tie flips
    return specjax.generate(xla, _PROMPTS, max_new_tokens=_BUDGETS).tokens


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(method="magicdec", gamma=2, sinks=2, window=8),
    dict(method="sequoia", tree=TokenTree((-1, 0, 0, 1)), sinks=2, window=8),
], ids=["autoregressive", "magicdec", "sequoia"])
def test_engine_greedy_tokens_pallas_equal_xla(tiny_pallas, xla_tokens, kwargs,
                                               kernel_calls):
  with jax.default_matmul_precision("float32"):
    got = specjax.generate(tiny_pallas, _PROMPTS, max_new_tokens=_BUDGETS, **kwargs)
  assert got.tokens == xla_tokens
  windows = {(c["sinks"], c["recent"]) for c in kernel_calls}
  assert (None, None) in windows  # prefill/decode or verification ran the kernel
  if kwargs:  # and so did the draft, over its sinks + recent window
    assert (2, 6) in windows, windows
