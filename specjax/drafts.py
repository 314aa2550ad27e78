"""Draft proposers for chain speculation.

MagicDec (Chen et al. 2024, arXiv 2408.11049) observes that at large batch x long
context a decode step is bound by reading the KV cache, so a draft that reads a small
*fixed* KV budget is cheap while the target verifies gamma + 1 tokens for about the
price of one step. The self-speculation draft here is the target model itself reading
only ``sinks`` leading positions + the most recent positions of the **target's own
cache** (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453), plus its own freshly
drafted tokens. Nothing is copied or re-prefilled: the draft sees exact target KV, and
after verification nothing needs repairing, because drafted keys never enter the cache
(the verify pass computes the keys that :func:`specjax.kv_cache.commit` writes).

Draft step j (of gamma) feeds token x_j at position ``lengths + j`` and sees::

    target cache                   drafted this round (pending)   itself
    [sinks][ .. skipped .. ][recent]   x_0 .. x_{j-1}                 x_j
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from specjax import model as model_lib
from specjax import sampling
from specjax.attention import Window
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache, NewKV

DRAFT_KV_POLICIES = ("streaming",)


@dataclasses.dataclass(frozen=True)
class SpecConfig:
  """How a round drafts (static under jit).

  Attributes:
    gamma: drafted tokens per round; 0 is plain autoregressive decoding.
    draft_kv: the draft's view of the prefix: "streaming" = sinks + recent window.
    sinks: leading positions always kept (attention sinks).
    window: the draft's total prefix budget, sinks included (MagicDec's default 512).
  """

  gamma: int = 0
  draft_kv: str = "streaming"
  sinks: int = 16
  window: int = 512

  def __post_init__(self):
    if self.gamma < 0:
      raise ValueError(f"gamma={self.gamma} must be >= 0.")
    if self.draft_kv not in DRAFT_KV_POLICIES:
      raise ValueError(f"draft_kv={self.draft_kv!r}; available: {DRAFT_KV_POLICIES}.")
    if not 0 <= self.sinks < self.window:
      raise ValueError(f"need 0 <= sinks ({self.sinks}) < window ({self.window}); the"
                       " window is the draft's whole prefix budget, sinks included.")

  @property
  def prefix_window(self) -> Window:
    return Window(sinks=self.sinks, recent=self.window - self.sinks)


def init_state(spec: SpecConfig, cfg: ModelConfig, cache: KVCache):
  """Per-policy draft state after prefill (a pytree carried through the decode loop).

  The streaming self-draft needs none: its whole view is derived from ``lengths``.
  """
  del spec, cfg, cache
  return None


def propose(params, cfg: ModelConfig, cache: KVCache, state, pending: jax.Array,
            key: jax.Array, spec: SpecConfig, sp: sampling.SamplingParams):
  """Draft ``spec.gamma`` tokens after each row's pending token.

  Returns:
    drafts i32[B, gamma], their distributions f32[B, gamma, V], and the draft state.
  """
  drafted, q = draft_self(params, cfg, cache, pending, key, spec, sp)
  return drafted, q, state


def after_verify(state, spec: SpecConfig, cache: KVCache, n_kept: jax.Array):
  """Update the draft state once the target committed ``n_kept[b]`` tokens per row."""
  del spec, cache, n_kept
  return state


def draft_self(params, cfg: ModelConfig, cache: KVCache, first: jax.Array, key: jax.Array,
               spec: SpecConfig, sp: sampling.SamplingParams
               ) -> tuple[jax.Array, jax.Array]:
  """Self-speculation: gamma draft steps of the target over a sparse prefix.

  Args:
    first: i32[B] the pending token (accepted, not yet in the cache): draft input x_0.

  Returns:
    drafts i32[B, gamma] and the distributions they were drawn from f32[B, gamma, V].
  """
  B = first.shape[0]
  G = spec.gamma
  shape = (cfg.num_layers, B, G, cfg.num_kv_heads, cfg.head_dim)
  pending = NewKV(k=jnp.zeros(shape, cache.k.dtype), v=jnp.zeros(shape, cache.v.dtype))

  def step(carry, j):
    tok, pending, key = carry
    mask = jnp.concatenate([(jnp.arange(G) < j)[None, :], jnp.ones((1, 1), bool)], axis=1)
    logits, new = model_lib.forward(params, cfg, tok[:, None], cache,
                                    offsets=j[None].astype(jnp.int32), new_mask=mask,
                                    window=spec.prefix_window, pending=pending)
    pending = NewKV(k=jax.lax.dynamic_update_slice_in_dim(pending.k, new.k, j, axis=2),
                    v=jax.lax.dynamic_update_slice_in_dim(pending.v, new.v, j, axis=2))
    key, sub = jax.random.split(key)
    q = sampling.probabilities(logits[:, 0], sp)  # [B, V]
    d = jax.random.categorical(sub, jnp.log(q), axis=-1).astype(jnp.int32)
    return (d, pending, key), (d, q)

  _, (drafts, q) = jax.lax.scan(step, (first, pending, key), jnp.arange(G))
  return drafts.T, jnp.swapaxes(q, 0, 1)
