"""Preallocated KV cache with per-sequence lengths.

The cache holds keys (already rotated by RoPE at their absolute positions) and values
for every layer, ``[L, B, K, S, D]``, and one committed length per row. A forward pass
never writes the cache: it returns the keys/values of its new tokens (:class:`NewKV`),
and :func:`commit` writes the ones to keep at each row's own position. That single
write path serves prefill (keep every valid token), decode (keep one), and speculation
(keep the accepted path of a chain or tree, gathered by ``src`` indices, so rejected
drafts never touch the cache and no rollback is needed).

Ragged batches live in ``lengths[B]`` and never in shapes.

A draft model's own cache is a :class:`RingCache`: sinks + a sliding window of fixed
size whose slots are reused, each slot recording the absolute position it holds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig

# Logical axes of the cache arrays, for sharding rules.
CACHE_AXES = ("layers", "batch", "kv_heads", "sequence", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer plus each row's committed length."""

  k: jax.Array  # [L, B, K, S, D]
  v: jax.Array  # [L, B, K, S, D]
  lengths: jax.Array  # i32[B]; slots [0, lengths[b]) of row b are valid

  @property
  def size(self) -> int:
    """S, the number of slots per row."""
    return self.k.shape[3]

  @property
  def batch(self) -> int:
    return self.k.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NewKV:
  """Keys/values computed for the T new tokens of one forward pass."""

  k: jax.Array  # [L, B, T, K, D]
  v: jax.Array  # [L, B, T, K, D]


def cache_shape(cfg: ModelConfig, batch: int, size: int) -> tuple[int, ...]:
  return (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)


def cache_bytes(cfg: ModelConfig, batch: int, size: int) -> int:
  """Bytes of a cache of ``size`` slots for ``batch`` rows (keys and values)."""
  return 2 * int(np.prod(cache_shape(cfg, batch, size))) * jnp.dtype(cfg.dtype).itemsize


def init_cache(cfg: ModelConfig, batch: int, size: int, sharding=None) -> KVCache:
  """An empty cache (all lengths 0) in the compute dtype.

  Args:
    sharding: optional KVCache of shardings (see ``specjax.sharding.cache_shardings``);
      the arrays are then created directly in place on the devices.
  """
  shape = cache_shape(cfg, batch, size)

  def make():
    return KVCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))

  return jax.jit(make, out_shardings=sharding)()


def commit(cache: KVCache,
           new: NewKV,
           n_keep: jax.Array,  # i32[B]
           src: jax.Array | None = None,  # i32[B, T'] (T' <= T)
           ) -> KVCache:
  """Append the kept new tokens of each row after its committed prefix.

  Row b keeps ``n_keep[b]`` tokens: ``new[src[b, i]]`` for ``i < n_keep[b]`` goes to
  slot ``lengths[b] + i``. With ``src=None`` the first ``n_keep[b]`` new tokens are kept
  in order (prefill, decode, accepted chain prefixes); a tree passes its accepted path.
  Writes past the end of the cache are dropped; callers validate capacity first.

  Returns:
    The cache with the tokens written and ``lengths + n_keep``.
  """
  if src is None:
    k_sel, v_sel = new.k, new.v
  else:
    gather = jax.vmap(lambda x, s: jnp.take(x, s, axis=1), in_axes=(1, 0), out_axes=1)
    k_sel, v_sel = gather(new.k, src), gather(new.v, src)
  L, B, T = k_sel.shape[:3]
  i = jnp.arange(T)[None, :]  # [1, T]
  slot = jnp.where(i < n_keep[:, None], cache.lengths[:, None] + i, cache.size)  # [B, T]
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  # Advanced indices on axes 1 and 3 move to the front: updates are [B, T, L, K, D].
  to_bt = lambda x: jnp.transpose(x, (1, 2, 0, 3, 4))
  k = cache.k.at[:, rows, :, slot].set(to_bt(k_sel).astype(cache.k.dtype), mode="drop")
  v = cache.v.at[:, rows, :, slot].set(to_bt(v_sel).astype(cache.v.dtype), mode="drop")
  return KVCache(k=k, v=v, lengths=cache.lengths + n_keep.astype(jnp.int32))



def take_rows(cache, rows: jax.Array):
  """Rows ``rows`` (i32[B']) of a KVCache or RingCache, in that order: the decode
  loops drop finished rows from the batch this way (batch compaction)."""
  if isinstance(cache, RingCache):
    return RingCache(k=cache.k[:, rows], v=cache.v[:, rows], lengths=cache.lengths[rows],
                     pos=cache.pos[rows])
  return KVCache(k=cache.k[:, rows], v=cache.v[:, rows], lengths=cache.lengths[rows])

# ----------------------------------------------------------------------------------
# Ring cache: a draft model's sinks + sliding window, for generations of any length.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RingCache:
  """A fixed-size cache whose slots are reused as the sequence grows (a draft's KV).

  The first ``sinks`` slots hold positions ``0..sinks-1`` for good; the other
  ``R - sinks`` slots form a ring: position p >= sinks lives in slot
  ``sinks + (p - sinks) % (R - sinks)``, so appending evicts the oldest non-sink
  position. Keys are stored rotated at their absolute positions, and ``pos`` records
  which position each slot holds, so attention masks by position
  (``model.forward(..., slot_pos=ring.pos)``) and never needs the slots in order.

  With ``R`` at least the longest sequence and ``sinks = 0`` the ring never wraps: a
  plain (full) cache, slot s holding position s.
  """

  k: jax.Array  # [L, B, K, R, D]
  v: jax.Array  # [L, B, K, R, D]
  lengths: jax.Array  # i32[B]; positions [0, lengths[b]) have been appended
  pos: jax.Array  # i32[B, R]; the position each slot holds, -1 = empty

  @property
  def size(self) -> int:
    """R, the number of slots per row."""
    return self.k.shape[3]

  def as_kv_cache(self) -> KVCache:
    """The arrays as a KVCache (for ``model.forward``; pass ``slot_pos=self.pos``)."""
    return KVCache(k=self.k, v=self.v, lengths=self.lengths)


def ring_slot(position: jax.Array, sinks: int, size: int) -> jax.Array:
  """The slot of absolute ``position`` in a ring of ``size`` slots, ``sinks`` pinned."""
  return jnp.where(position < sinks, position, sinks + (position - sinks) % (size - sinks))


def ring_from_cache(cache: KVCache, lengths: jax.Array, sinks: int, size: int) -> RingCache:
  """The ring view of a filled linear cache: positions ``< sinks`` plus the latest
  ``size - sinks`` positions below ``lengths[b]`` of each row.

  Args:
    cache: a linear cache (slot s = position s), e.g. a draft model's prefill.
    lengths: i32[B] positions to keep below (may be less than ``cache.lengths``).
    sinks, size: the ring's pinned slots and total slots.
  """
  slots = jnp.arange(size)[None, :]  # [1, R]
  ring = size - sinks
  last = lengths[:, None] - 1  # [B, 1]
  # The newest position p <= last that maps to each ring slot.
  newest = last - (last - slots) % ring
  pos = jnp.where(slots < sinks, slots, newest)
  pos = jnp.where((pos >= 0) & (pos < lengths[:, None]) &
                  ((slots < sinks) | (pos >= sinks)), pos, -1)  # [B, R]
  take = jax.vmap(lambda c, i: jnp.take(c, i, axis=2), in_axes=(1, 0), out_axes=1)
  idx = jnp.clip(pos, 0, cache.size - 1)
  return RingCache(k=take(cache.k, idx), v=take(cache.v, idx),
                   lengths=lengths.astype(jnp.int32), pos=pos.astype(jnp.int32))


def ring_commit(ring: RingCache, new: NewKV, n_keep: jax.Array, sinks: int) -> RingCache:
  """Append ``new[:, b, :n_keep[b]]`` at positions ``lengths[b], lengths[b] + 1, ...``.

  Writes are scatters at ``ring_slot(position)``: a wrapping write must land at the
  ring's start, which a ``dynamic_update_slice`` (it clamps its start) would not do.
  Two kept tokens must never share a slot in one call, so ``n_keep <= R - sinks``
  (callers validate: a round keeps at most gamma + 1 tokens).

  Returns:
    The ring with the tokens written, ``pos`` updated and ``lengths + n_keep``.
  """
  L, B, T = new.k.shape[:3]
  i = jnp.arange(T)[None, :]  # [1, T]
  position = ring.lengths[:, None] + i  # [B, T]
  slot = jnp.where(i < n_keep[:, None], ring_slot(position, sinks, ring.size), ring.size)
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  # Advanced indices on axes 1 and 3 move to the front: updates are [B, T, L, K, D].
  to_bt = lambda x: jnp.transpose(x, (1, 2, 0, 3, 4))
  k = ring.k.at[:, rows, :, slot].set(to_bt(new.k).astype(ring.k.dtype), mode="drop")
  v = ring.v.at[:, rows, :, slot].set(to_bt(new.v).astype(ring.v.dtype), mode="drop")
  pos = ring.pos.at[rows, slot].set(position.astype(jnp.int32), mode="drop")
  return RingCache(k=k, v=v, lengths=ring.lengths + n_keep.astype(jnp.int32), pos=pos)
