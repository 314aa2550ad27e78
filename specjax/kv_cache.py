"""Preallocated KV cache with per-sequence lengths.

The cache holds keys (already rotated by RoPE at their absolute positions) and values
for every layer, ``[L, B, K, S, D]``, and one committed length per row. A forward pass
never writes the cache: it returns the keys/values of its new tokens (:class:`NewKV`),
and :func:`commit` writes the ones to keep at each row's own position. That single
write path serves prefill (keep every valid token), decode (keep one), and speculation
(keep the accepted path of a chain or tree, gathered by ``src`` indices, so rejected
drafts never touch the cache and no rollback is needed).

Ragged batches live in ``lengths[B]`` and never in shapes.
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
           src: jax.Array | None = None,  # i32[B, T]
           ) -> KVCache:
  """Append the kept new tokens of each row after its committed prefix.

  Row b keeps ``n_keep[b]`` tokens: ``new[src[b, i]]`` for ``i < n_keep[b]`` goes to
  slot ``lengths[b] + i``. With ``src=None`` the first ``n_keep[b]`` new tokens are kept
  in order (prefill, decode, accepted chain prefixes); a tree passes its accepted path.
  Writes past the end of the cache are dropped; callers validate capacity first.

  Returns:
    The cache with the tokens written and ``lengths + n_keep``.
  """
  L, B, T = new.k.shape[:3]
  i = jnp.arange(T)[None, :]  # [1, T]
  if src is None:
    k_sel, v_sel = new.k, new.v
  else:
    gather = jax.vmap(lambda x, s: jnp.take(x, s, axis=1), in_axes=(1, 0), out_axes=1)
    k_sel, v_sel = gather(new.k, src), gather(new.v, src)
  slot = jnp.where(i < n_keep[:, None], cache.lengths[:, None] + i, cache.size)  # [B, T]
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  # Advanced indices on axes 1 and 3 move to the front: updates are [B, T, L, K, D].
  to_bt = lambda x: jnp.transpose(x, (1, 2, 0, 3, 4))
  k = cache.k.at[:, rows, :, slot].set(to_bt(k_sel).astype(cache.k.dtype), mode="drop")
  v = cache.v.at[:, rows, :, slot].set(to_bt(v_sel).astype(cache.v.dtype), mode="drop")
  return KVCache(k=k, v=v, lengths=cache.lengths + n_keep.astype(jnp.int32))
