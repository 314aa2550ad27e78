"""Functional Llama-family decoder (pure functions over a Params pytree).

Architecture (Touvron et al. 2023, arXiv 2302.13971; Llama 3, arXiv 2407.21783):
pre-norm blocks of RMSNorm -> GQA attention with RoPE -> residual -> RMSNorm ->
SwiGLU MLP -> residual, a final RMSNorm and a (possibly tied) output projection.

:func:`forward` is the only forward pass. It runs T new tokens per row at positions
``cache.lengths[b] + offsets[t]`` against the cached prefix (read-only) and returns
the logits and the new tokens' keys/values; :func:`specjax.kv_cache.commit` then
writes the ones to keep. The same call serves prefill chunks (causal mask), decode
(T = 1), chain verification (causal) and tree verification (ancestor mask, offsets =
node depths), and sparse-KV drafts (``window``; SnapKV's per-layer ``prefix_idx``;
``slot_pos`` for a draft model's ring cache). Attention runs on the implementation
``cfg.attention_impl`` selects (``specjax.attention.attend``: the Pallas
tree-attention kernel or the XLA path). :func:`prefix_scores` runs the same
layers and also returns the attention each layer paid to the prefix (SnapKV scoring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from specjax import attention as attention_lib
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache, NewKV
from specjax.params import LayerParams, Params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies f32[D/2], with Llama-3.1 scaling when configured."""
  D = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
  sc = cfg.rope_scaling
  if sc is not None:
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = sc.original_max_position / sc.low_freq_factor
    high_wavelen = sc.original_max_position / sc.high_freq_factor
    smooth = ((sc.original_max_position / wavelen - sc.low_freq_factor) /
              (sc.high_freq_factor - sc.low_freq_factor))
    interpolated = (1 - smooth) * inv_freq / sc.factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / sc.factor,
                        np.where(wavelen < high_wavelen, inv_freq, interpolated))
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array,  # [B, T, N, D]
               positions: jax.Array,  # i32[B, T]
               inv_freq: np.ndarray,  # f32[D/2]
               ) -> jax.Array:
  """Rotary embedding in the "rotate half" layout (dims i and i + D/2 form a pair)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _block(cfg: ModelConfig, x, layer: LayerParams, k_cache, v_cache, pending_k, pending_v,
           prefix_idx, lengths, positions, new_mask, kv_limit, view: dict):
  """One decoder block. x: [B, T, E]; returns (x, (k_new, v_new, scores)).

  k_new: [B, T, K, D]; scores: f32[B, K, S] prefix attention scores when
  ``view["score_queries"]`` is set, else None. pending_k/v: [B, P, K, D] keys/values
  of uncommitted earlier tokens (or None); the new tokens see them through the first P
  columns of ``new_mask`` (for the Pallas kernel they are simply more new-token
  columns). prefix_idx: this layer's kept positions [B, K, n] or None.
  """
  dt = cfg.dtype
  inv_freq = rope_frequencies(cfg)
  h = rms_norm(x, layer.attn_norm, cfg.rms_eps)
  q = jnp.einsum("bte,ehd->bthd", h, layer.wq.astype(dt))
  k = jnp.einsum("bte,ekd->btkd", h, layer.wk.astype(dt))
  v = jnp.einsum("bte,ekd->btkd", h, layer.wv.astype(dt))
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq)
  k_seen, v_seen = k, v
  if pending_k is not None:
    k_seen = jnp.concatenate([pending_k.astype(k.dtype), k], axis=1)
    v_seen = jnp.concatenate([pending_v.astype(v.dtype), v], axis=1)
  o = attention_lib.attend(cfg.attention_impl, q, k_seen, v_seen, k_cache, v_cache, lengths,
                           new_mask, prefix_idx=prefix_idx, kv_limit=kv_limit, **view)
  scores = None
  if view.get("score_queries") is not None:
    o, scores = o
  x = x + jnp.einsum("bthd,hde->bte", o, layer.wo.astype(dt))
  h = rms_norm(x, layer.mlp_norm, cfg.rms_eps)
  gate = jnp.einsum("bte,ef->btf", h, layer.w_gate.astype(dt))
  up = jnp.einsum("bte,ef->btf", h, layer.w_up.astype(dt))
  x = x + jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, layer.w_down.astype(dt))
  return x, (k.astype(k_cache.dtype), v.astype(v_cache.dtype), scores)


def output_logits(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
  """Final norm + output projection: h [B, T, E] -> float32 logits [B, T, V]."""
  h = rms_norm(h, params.final_norm, cfg.rms_eps)
  if params.lm_head is None:
    return jnp.einsum("bte,ve->btv", h, params.embedding.astype(cfg.dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("bte,ev->btv", h, params.lm_head.astype(cfg.dtype),
                    preferred_element_type=jnp.float32)


def forward(params: Params,
            cfg: ModelConfig,
            tokens: jax.Array,  # i32[B, T]
            cache: KVCache,
            *,
            offsets: jax.Array | None = None,  # i32[T] or i32[B, T]
            new_mask: jax.Array | None = None,  # bool[T, T] or bool[B, T, T]
            window: attention_lib.Window | None = None,
            prefix_idx: jax.Array | None = None,  # i32[L, B, K, n]
            slot_pos: jax.Array | None = None,  # i32[B, S]
            logits_at: jax.Array | None = None,  # i32[B, N]
            pending: NewKV | None = None,  # [L, B, P, K, D]
            kv_limit: int | None = None,
            ) -> tuple[jax.Array, NewKV]:
  """Run T new tokens per row after each row's committed prefix.

  Args:
    params: model weights.
    cfg: the model config (static under jit).
    tokens: new token ids.
    cache: the KV cache; read, never written.
    offsets: position of each new token relative to ``cache.lengths`` (default
      ``arange(T)``; tree nodes use their depth).
    new_mask: which new tokens each new token attends to (default causal); with
      ``pending``, bool[T, P + T] whose first P columns are the pending tokens.
    window: restrict the prefix to sinks + recent positions (sparse-KV drafts).
    prefix_idx: per layer and KV head, the prefix positions a SnapKV draft keeps
      (-1 = unused); they replace the window's sinks (see ``attention.prefix_keys``).
    slot_pos: the absolute position held by each cache slot, for ring caches whose
      slots are reused (``kv_cache.RingCache``); None when slot s holds position s.
    logits_at: compute logits only at these new-token indices (e.g. each row's last
      prompt token during prefill); None computes all T.
    pending: keys/values of P earlier tokens that are not committed to the cache (a
      draft's own drafted tokens); they sit between the prefix and the new tokens.
    kv_limit: read only the first ``kv_limit`` cache slots (static; every row's
      ``lengths[b]`` must be <= it). XLA attention over the full prefix reads the whole
      buffer, masked; a limit lets short rows of a large cache (early prefill chunks,
      decoding far below the cache size) pay only for a bucket of it. The Pallas
      kernel reads only each row's valid blocks and needs no limit.

  Returns:
    logits: f32[B, T or N, V]; new_kv: the keys/values of the T new tokens.
  """
  x, new, _ = _layers(params, cfg, tokens, cache, offsets=offsets, new_mask=new_mask,
                      pending=pending, prefix_idx=prefix_idx, kv_limit=kv_limit,
                      view=dict(window=window, slot_pos=slot_pos))
  if logits_at is not None:
    x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
  return output_logits(cfg, params, x), new


def prefix_scores(params: Params,
                  cfg: ModelConfig,
                  tokens: jax.Array,  # i32[B, T]
                  cache: KVCache,
                  query_valid: jax.Array,  # bool[B, T]
                  ) -> jax.Array:  # f32[L, B, K, S]
  """How much the T new tokens attend to each cached slot, per layer and KV head.

  The same layers as :func:`forward` (causal over the new tokens, full prefix
  ``[0, lengths[b])``), additionally returning each layer's softmax probabilities on
  the prefix slots, summed over the valid queries and the query heads of each KV head.
  SnapKV's observation window is such a forward over a prompt's last tokens.
  """
  _, _, scores = _layers(params, cfg, tokens, cache, offsets=None, new_mask=None,
                         pending=None, prefix_idx=None, kv_limit=None,
                         view=dict(window=None, slot_pos=None, score_queries=query_valid))
  return scores


def _layers(params: Params, cfg: ModelConfig, tokens, cache: KVCache, *, offsets, new_mask,
            pending, prefix_idx, kv_limit, view: dict):
  """Embedding + every decoder block (one lax.scan); returns (x [B, T, E], NewKV,
  per-layer scores or None)."""
  B, T = tokens.shape
  if offsets is None:
    offsets = jnp.arange(T, dtype=jnp.int32)
  positions = cache.lengths[:, None] + jnp.broadcast_to(offsets, (B, T))  # [B, T]
  if new_mask is None:
    new_mask = attention_lib.causal_mask(T)

  x = jnp.take(params.embedding, tokens, axis=0).astype(cfg.dtype)  # [B, T, E]

  def step(x, per_layer):
    layer, k_cache, v_cache, pending_k, pending_v, idx = per_layer
    # kv_limit slices per layer inside attention: XLA folds it into the scan's slice.
    return _block(cfg, x, layer, k_cache, v_cache, pending_k, pending_v, idx,
                  cache.lengths, positions, new_mask, kv_limit, view)

  pk, pv = (None, None) if pending is None else (pending.k, pending.v)
  x, (k_new, v_new, scores) = jax.lax.scan(
      step, x, (params.layers, cache.k, cache.v, pk, pv, prefix_idx))
  return x, NewKV(k=k_new, v=v_new), scores
