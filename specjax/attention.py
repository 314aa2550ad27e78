"""The one attention entry point of specjax.

Prefill chunks, decode steps, chain and tree verification and sparse-KV drafts all
call :func:`attention`. T new queries of row b attend to two key sets:

* the **cached prefix** ``[0, lengths[b])`` of that row (optionally restricted to
  ``sinks`` leading positions + the ``window`` most recent ones, the StreamingLLM /
  MagicDec draft budget), and
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
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The prefix keys/values a query may read, and which of them are valid.

  Without a window this is the whole cache with a ``slot < lengths[b]`` mask. With a
  window only ``sinks + recent`` slots per row are gathered, so the cost of reading
  the prefix is the budget, not the cache size.

  Returns:
    k, v: [B, K, S', D] with S' = S or the window budget; valid: bool[B, S'].
  """
  S = k_cache.shape[2]
  if window is None or window.budget >= S:
    valid = jnp.arange(S)[None, :] < lengths[:, None]
    if window is not None:  # budget covers the cache: same slots, same restriction
      valid &= _in_window(jnp.arange(S)[None, :], lengths[:, None], window)
    return k_cache, v_cache, valid
  sink_idx = jnp.broadcast_to(jnp.arange(window.sinks), (lengths.shape[0], window.sinks))
  recent_start = jnp.maximum(lengths - window.recent, window.sinks)  # [B]
  recent_idx = recent_start[:, None] + jnp.arange(window.recent)[None, :]
  idx = jnp.concatenate([sink_idx, recent_idx], axis=1)  # [B, S']
  valid = idx < lengths[:, None]
  idx = jnp.minimum(idx, S - 1)
  take = jax.vmap(lambda c, i: jnp.take(c, i, axis=1))  # per row: [K, S, D] -> [K, S', D]
  return take(k_cache, idx), take(v_cache, idx), valid


def _in_window(slot, length, window: Window):
  return (slot < window.sinks) | (slot >= length - window.recent)


def attention(q: jax.Array,  # [B, T, H, D], already rotated
              k_new: jax.Array,  # [B, Tn, K, D], already rotated
              v_new: jax.Array,  # [B, Tn, K, D]
              k_cache: jax.Array,  # [B, K, S, D]
              v_cache: jax.Array,  # [B, K, S, D]
              lengths: jax.Array,  # i32[B]
              new_mask: jax.Array,  # bool[T, Tn] or bool[B, T, Tn]
              *,
              window: Window | None = None,
              ) -> jax.Array:  # [B, T, H, D]
  """Attention of new queries over the cached prefix and the new tokens.

  This is the XLA implementation; ``pallas_kernels.tree_attention`` implements the
  same signature.

  Args:
    q: queries of the T new tokens, RoPE already applied at their positions.
    k_new, v_new: keys/values of the Tn new tokens (usually Tn == T).
    k_cache, v_cache: the row's cache; only slots ``[0, lengths[b])`` are read.
    lengths: committed prefix length of each row.
    new_mask: which new tokens each query sees (True = visible).
    window: restrict the prefix to sinks + recent positions (drafts), or None.

  Returns:
    The attention output, in q's dtype.
  """
  B, T, H, D = q.shape
  K = k_new.shape[2]
  G = H // K
  f32 = jnp.float32
  qg = q.reshape(B, T, K, G, D) * jnp.asarray(D ** -0.5, q.dtype)
  kp, vp, valid = prefix_keys(k_cache, v_cache, lengths, window)

  # Scores in float32: [B, K, G, T, S'] over the prefix, [B, K, G, T, Tn] over new tokens.
  s_prefix = jnp.einsum("btkgd,bksd->bkgts", qg, kp, preferred_element_type=f32)
  s_prefix = jnp.where(valid[:, None, None, None, :], s_prefix, _MASKED)
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
  return out.reshape(B, T, H, D).astype(q.dtype)


def causal_mask(T: int) -> jax.Array:
  """bool[T, T]: token t sees tokens 0..t (prefill chunks and chains)."""
  return jnp.tril(jnp.ones((T, T), bool))
