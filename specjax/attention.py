"""The one attention entry point of specjax.

Prefill chunks, decode steps, chain and tree verification and sparse-KV drafts all
call :func:`attention`. T new queries of row b attend to two key sets:

* the **cached prefix** ``[0, lengths[b])`` of that row (optionally restricted to
  ``sinks`` leading positions + the ``window`` most recent ones, the StreamingLLM /
  MagicDec draft budget; or to a SnapKV selection per KV head + the most recent ones;
  a ring cache names the position of each slot instead of slot = position), and
* the **new tokens** (their keys were computed in the same forward pass) through a
  ``new_mask[t, u]``: causal for prefill and chains, the ancestor mask for trees.

Example: row with ``lengths[b] = 6``, ``window = Window(sinks=1, recent=2)`` and a
tree of 3 new tokens (node 0 is the root, nodes 1 and 2 its children)::

              prefix slots 0..5        new tokens
    query     0  1  2  3  4  5         0  1  2
    node 0    x  .  .  .  x  x         x  .  .
    node 1    x  .  .  .  x  x         x  x  .
    node 2    x  .  .  .  x  x         x  .  x

The two parts are combined with a single softmax by merging their log-sum-exp
statistics, so the cache is never concatenated with the new keys (the same shape as
the Pallas kernel: prefix blocks + tree block + LSE merge). Keys are stored already
rotated (RoPE at absolute positions), so attention itself never needs positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# A large finite negative score: avoids inf - inf = nan for queries whose every key is
# masked (such rows are padding and their outputs are never used).
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class Window:
  """A sparse prefix budget: ``sinks`` leading positions + ``recent`` latest ones."""

  sinks: int
  recent: int

  def __post_init__(self):
    if self.sinks < 0 or self.recent < 0 or self.sinks + self.recent == 0:
      raise ValueError(f"Window(sinks={self.sinks}, recent={self.recent}) must keep at"
                       " least one position and have no negative part.")

  @property
  def budget(self) -> int:
    return self.sinks + self.recent


def prefix_keys(k_cache: jax.Array,  # [B, K, S, D]
                v_cache: jax.Array,  # [B, K, S, D]
                lengths: jax.Array,  # i32[B]
                window: Window | None,
                *,
                prefix_idx: jax.Array | None = None,  # i32[B, K, n]
                slot_pos: jax.Array | None = None,  # i32[B, S]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The prefix keys/values a query may read, and which of them are valid.

  Four views of the cache, all masked by *position* ``< lengths[b]``:

  * no window: every slot, slot s holding position s;
  * ``window``: only ``sinks + recent`` slots per row are gathered, so the cost of
    reading the prefix is the budget, not the cache size;
  * ``window`` + ``prefix_idx`` (SnapKV): the ``n`` positions listed per KV head
    (-1 = unused entry) replace the sinks, plus the window's ``recent`` latest
    positions, which never start before ``window.sinks`` (the selection owns
    positions below it, so no position is read twice);
  * ``slot_pos`` (a ring cache): every slot, slot s holding position
    ``slot_pos[b, s]`` (-1 = empty), optionally restricted to the window.

  Returns:
    k, v: [B, K, S', D] with S' = S, the window budget or n + recent;
    valid: bool[B, 1 or K, S'].
  """
  S = k_cache.shape[2]
  if slot_pos is not None:
    if prefix_idx is not None:
      raise ValueError("prefix_idx selects positions of a linear cache; a ring cache"
                       " (slot_pos) cannot take one.")
    valid = (slot_pos >= 0) & (slot_pos < lengths[:, None])
    if window is not None:
      valid &= _in_window(slot_pos, lengths[:, None], window)
    return k_cache, v_cache, valid[:, None]
  if prefix_idx is None and (window is None or window.budget >= S):
    valid = jnp.arange(S)[None, :] < lengths[:, None]
    if window is not None:  # budget covers the cache: same slots, same restriction
      valid &= _in_window(jnp.arange(S)[None, :], lengths[:, None], window)
    return k_cache, v_cache, valid[:, None]
  if window is None:
    raise ValueError("prefix_idx needs a window for its recent part.")
  B, K = k_cache.shape[:2]
  recent_start = jnp.maximum(lengths - window.recent, window.sinks)  # [B]
  recent_idx = recent_start[:, None] + jnp.arange(window.recent)[None, :]  # [B, recent]
  if prefix_idx is None:
    sink_idx = jnp.broadcast_to(jnp.arange(window.sinks), (B, window.sinks))
    idx = jnp.concatenate([sink_idx, recent_idx], axis=1)[:, None]  # [B, 1, S']
  else:
    recent_idx = jnp.broadcast_to(recent_idx[:, None], (B, K, window.recent))
    idx = jnp.concatenate([prefix_idx, recent_idx], axis=2)  # [B, K, S']
  valid = (idx >= 0) & (idx < lengths[:, None, None])
  idx = jnp.clip(idx, 0, S - 1)[..., None]  # [B, 1 or K, S', 1]
  return (jnp.take_along_axis(k_cache, idx, axis=2),
          jnp.take_along_axis(v_cache, idx, axis=2), valid)


def _in_window(pos, length, window: Window):
  return (pos < window.sinks) | (pos >= length - window.recent)


def attention(q: jax.Array,  # [B, T, H, D], already rotated
              k_new: jax.Array,  # [B, Tn, K, D], already rotated
              v_new: jax.Array,  # [B, Tn, K, D]
              k_cache: jax.Array,  # [B, K, S, D]
              v_cache: jax.Array,  # [B, K, S, D]
              lengths: jax.Array,  # i32[B]
              new_mask: jax.Array,  # bool[T, Tn] or bool[B, T, Tn]
              *,
              window: Window | None = None,
              prefix_idx: jax.Array | None = None,  # i32[B, K, n]
              slot_pos: jax.Array | None = None,  # i32[B, S]
              score_queries: jax.Array | None = None,  # bool[B, T]
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention of new queries over the cached prefix and the new tokens.

  This is the XLA implementation; ``pallas_kernels.tree_attention`` implements the
  same signature.

  Args:
    q: queries of the T new tokens, RoPE already applied at their positions.
    k_new, v_new: keys/values of the Tn new tokens (usually Tn == T).
    k_cache, v_cache: the row's cache; only positions ``[0, lengths[b])`` are read.
    lengths: committed prefix length of each row.
    new_mask: which new tokens each query sees (True = visible).
    window: restrict the prefix to sinks + recent positions (drafts), or None.
    prefix_idx: explicit kept prefix positions per KV head (SnapKV drafts); see
      :func:`prefix_keys`.
    slot_pos: absolute position held by each cache slot (ring caches), or None when
      slot s holds position s.
    score_queries: when given, also return how much attention the selected queries
      paid to each prefix slot (SnapKV scoring). Only with the plain full-prefix view.

  Returns:
    The attention output [B, T, H, D] in q's dtype; with ``score_queries`` also
    f32[B, K, S]: softmax probabilities on each prefix slot, summed over the
    selected queries and the query heads of each KV head.
  """
  B, T, H, D = q.shape
  K = k_new.shape[2]
  G = H // K
  f32 = jnp.float32
  qg = q.reshape(B, T, K, G, D) * jnp.asarray(D ** -0.5, q.dtype)
  if score_queries is not None and (window is not None or prefix_idx is not None or
                                    slot_pos is not None):
    raise ValueError("score_queries scores cache slots: use the full-prefix view.")
  kp, vp, valid = prefix_keys(k_cache, v_cache, lengths, window, prefix_idx=prefix_idx,
                              slot_pos=slot_pos)

  # Scores in float32: [B, K, G, T, S'] over the prefix, [B, K, G, T, Tn] over new tokens.
  s_prefix = jnp.einsum("btkgd,bksd->bkgts", qg, kp, preferred_element_type=f32)
  s_prefix = jnp.where(valid[:, :, None, None, :], s_prefix, _MASKED)
  s_new = jnp.einsum("btkgd,bukd->bkgtu", qg, k_new, preferred_element_type=f32)
  mask = new_mask if new_mask.ndim == 3 else new_mask[None]
  s_new = jnp.where(mask[:, None, None, :, :], s_new, _MASKED)

  # One softmax over both parts, merged through their maxima and sums.
  m = jnp.maximum(s_prefix.max(-1), s_new.max(-1))[..., None]  # [B, K, G, T, 1]
  p_prefix = jnp.exp(s_prefix - m)
  p_new = jnp.exp(s_new - m)
  denom = p_prefix.sum(-1) + p_new.sum(-1)  # [B, K, G, T]
  out = (jnp.einsum("bkgts,bksd->btkgd", p_prefix.astype(vp.dtype), vp,
                    preferred_element_type=f32) +
         jnp.einsum("bkgtu,bukd->btkgd", p_new.astype(v_new.dtype), v_new,
                    preferred_element_type=f32))
  out = out / jnp.moveaxis(denom, 3, 1)[..., None]  # [B, T, K, G, D]
  out = out.reshape(B, T, H, D).astype(q.dtype)
  if score_queries is None:
    return out
  # Padding queries (ragged observation windows) must not vote.
  weight = score_queries.astype(f32)[:, None, None, :] / denom  # [B, K, G, T]
  return out, jnp.einsum("bkgts,bkgt->bks", p_prefix, weight)


def causal_mask(T: int) -> jax.Array:
  """bool[T, T]: token t sees tokens 0..t (prefill chunks and chains)."""
  return jnp.tril(jnp.ones((T, T), bool))
