"""Sharded execution on 8 fake CPU devices equals single-device execution.

conftest.py sets JAX_NUM_CPU_DEVICES=8 before JAX starts.
"""

import jax
import numpy as np
import pytest

import specjax
from specjax import drafts, engine, sharding
from specjax.config import tiny_config
from specjax.params import init_params

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

# Heads, KV heads, MLP and vocab all divide by 8 and 4, so every rule really shards.
CFG = tiny_config(num_heads=8, num_kv_heads=8, head_dim=8, mlp_dim=128, eos_ids=())
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 61)), [7] * 13]


@pytest.fixture(scope="module")
def tiny():
  return specjax.Model(config=CFG, params=init_params(CFG, jax.random.key(0)), tokenizer=None)


@pytest.mark.parametrize("data, model", [(1, 8), (2, 4)])
def test_sharded_generate_and_logits_equal_single_device(tiny, data, model):
  mesh = sharding.make_mesh(data, model)
  single = specjax.generate(tiny, PROMPTS, max_new_tokens=8)
  sharded = specjax.generate(tiny, PROMPTS, max_new_tokens=8, mesh=mesh)
  assert sharded.tokens == single.tokens
  for a, b in zip(specjax.logits(tiny, PROMPTS, mesh=mesh), specjax.logits(tiny, PROMPTS)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(method="magicdec", gamma=3, sinks=2, window=8),
    dict(method="magicdec", gamma=2, draft_kv="snapkv", sinks=1, window=12, obs_window=4),
    dict(method="magicdec_draft", gamma=2, sinks=2, window=10),
    dict(method="magicdec", gamma="auto", auto_gammas=(0, 1, 3), sinks=2, window=8),
], ids=["streaming", "snapkv", "draft_ring", "auto"])
def test_sharded_speculation_equals_single_device(tiny, kw, monkeypatch):
  monkeypatch.setattr(engine, "MIN_COMPACT_BATCH", 1)
  if kw["method"] == "magicdec_draft":
    kw = dict(kw, draft_model=drafts.truncated_draft(tiny, 1))
  mesh = sharding.make_mesh(2, 4)
  single = specjax.generate(tiny, PROMPTS, max_new_tokens=[12, 9, 14, 6])
  sharded = specjax.generate(tiny, PROMPTS, max_new_tokens=[12, 9, 14, 6], mesh=mesh, **kw)
  assert sharded.tokens == single.tokens
  assert sharded.stats.compactions == [2]  # 4 -> 2 rows, the data axis's size, not 1


def test_rules_shard_what_divides_and_replicate_the_rest():
  mesh = sharding.make_mesh(2, 4)
  sh = sharding.param_shardings(CFG, mesh)
  assert sh.layers.wq.spec == jax.sharding.PartitionSpec(None, None, "model", None)
  assert sh.layers.w_down.spec == jax.sharding.PartitionSpec(None, "model", None)
  assert sh.embedding.spec == jax.sharding.PartitionSpec("model", None)
  # SmolLM2's 9 query heads do not divide by 4: replicated, not an error.
  smol = specjax.config.SMOLLM2_135M
  assert sharding.param_shardings(smol, mesh).layers.wq.spec == \
      jax.sharding.PartitionSpec(None, None, None, None)
  cache = sharding.cache_shardings(CFG, 4, 64, mesh)
  assert cache.k.spec == jax.sharding.PartitionSpec(None, "data", "model", None, None)


def test_sharded_params_are_really_distributed(tiny):
  mesh = sharding.make_mesh(1, 8)
  params = sharding.shard_params(tiny.params, CFG, mesh)
  shard = params.layers.w_up.addressable_shards[0].data
  assert shard.shape == (CFG.num_layers, CFG.embed, CFG.mlp_dim // 8)
