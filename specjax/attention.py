"""The one attention entry point of specjax.

Prefill chunks, decode steps, chain and tree verification and sparse-KV drafts all
compute :func:`attention` (through :func:`attend`, below). T new queries of row b attend to two key sets:

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

Two implementations, one entry point. :func:`attention` is the XLA (plain jnp) path;
``pallas_kernels.tree_attention`` is the Pallas kernel for the same math.
:func:`attend` is what the model calls: it picks one per call from
``ModelConfig.attention_impl`` and the call's features (:func:`choose`)::

    attention_impl   GPU / TPU                    CPU
    "xla"            XLA                          XLA
    "auto"           kernel (compiled)            XLA
    "pallas"         kernel (compiled)            kernel (Pallas interpret mode, slow)

A call the kernel does not cover runs on XLA whatever the setting, with its reason
logged once: SnapKV's per-KV-head ``prefix_idx`` and its ``score_queries`` scoring,
ring caches (``slot_pos``), more than ``KERNEL_MAX_NEW_TOKENS`` new tokens (prefill
chunks), mixed dtypes, and on the Triton kernel a head_dim that is not a power of two
>= 16. Under a multi-device mesh set with ``jax.set_mesh(mesh)`` the kernel runs
under ``jax.shard_map`` (batch over "data", KV heads with their query heads over
"model", as ``specjax.sharding``); "auto" with several devices and no mesh in
context uses XLA, because the kernel cannot be partitioned automatically (Mosaic
refuses to; for the Triton custom call XLA has no partitioning rule, so at best it
would replicate the cache on every device).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import tree_attention as tree_attention_lib
from specjax import config as config_lib
from specjax import sharding as sharding_lib

_log = logging.getLogger(__name__)

# The values of ModelConfig.attention_impl.
IMPLEMENTATIONS = config_lib.ATTENTION_IMPLS
# The kernel computes the new-token block as one dense [rows, Tn] tile per program:
# right for decode, verification and drafts, not for long prefill chunks.
KERNEL_MAX_NEW_TOKENS = 128

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
  same math (without ``prefix_idx``, ``slot_pos`` and ``score_queries``) and
  :func:`attend` chooses between the two.

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


# ---------------------------------------------------------------------------------------
# Dispatch between the XLA path and the Pallas kernel.


def _platform() -> str:
  """The default devices' platform: "gpu", "tpu" or "cpu"."""
  return jax.default_backend()


def _context_mesh():
  """The mesh set with ``jax.set_mesh`` around this trace (an AbstractMesh), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def choose(impl: str,
           q: jax.Array,  # [B, T, H, D]
           k_new: jax.Array,  # [B, Tn, K, D]
           k_cache: jax.Array,  # [B, K, S, D]
           *,
           v_dtypes: tuple = (),
           prefix_idx: jax.Array | None = None,
           slot_pos: jax.Array | None = None,
           score_queries: jax.Array | None = None,
           ) -> tuple[str, str | None]:
  """Which implementation :func:`attend` runs for a call, and why not the kernel.

  Args:
    impl: "auto", "pallas" or "xla" (``ModelConfig.attention_impl``).
    q, k_new, k_cache: the call's arrays (only shapes and dtypes are read).
    v_dtypes: dtypes of the values, which must match as well.
    prefix_idx, slot_pos, score_queries: as in :func:`attention`.

  Returns:
    ("pallas" or "xla", reason): the reason is None when the choice is the setting's
    own (the kernel, "xla", or "auto" on CPU) and says why the call falls back to XLA
    otherwise.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention impl={impl!r}; expected one of"
                     f" {', '.join(map(repr, IMPLEMENTATIONS))}.")
  platform = _platform()
  if impl == "xla" or (impl == "auto" and platform not in ("gpu", "tpu")):
    return "xla", None
  if score_queries is not None:
    return "xla", "SnapKV scoring (score_queries) needs per-slot probabilities"
  if prefix_idx is not None:
    return "xla", "SnapKV's per-KV-head prefix selection (prefix_idx)"
  if slot_pos is not None:
    return "xla", "a ring cache's slot positions (slot_pos)"
  Tn, D = k_new.shape[1], q.shape[3]
  if Tn > KERNEL_MAX_NEW_TOKENS:
    return "xla", (f"{Tn} new tokens (> KERNEL_MAX_NEW_TOKENS = {KERNEL_MAX_NEW_TOKENS},"
                   " e.g. a prefill chunk)")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k_new, k_cache)} | set(map(jnp.dtype, v_dtypes))
  if len(dtypes) > 1:
    return "xla", f"mixed dtypes {sorted(map(str, dtypes))}"
  if platform != "tpu" and (D < 16 or D & (D - 1)):  # Triton (and its interpreter)
    return "xla", f"head_dim {D} (the Triton kernel needs a power of two >= 16)"
  mesh = _context_mesh()
  if mesh is not None and mesh.manual_axes and not mesh.are_all_axes_manual:
    return "xla", f"a mesh that is manual over only {sorted(mesh.manual_axes)}"
  if impl == "auto" and mesh is None and jax.device_count() > 1:
    # Not knowing how the surrounding jit is partitioned, the kernel could be handed a
    # sharded cache: Mosaic refuses to lower, and XLA cannot split a Triton call.
    return "xla", (f"{jax.device_count()} devices and no mesh in context: under"
                   " `with jax.set_mesh(mesh)` the kernel runs per shard (shard_map)")
  return "pallas", None


@functools.cache
def _log_fallback(impl: str, reason: str) -> None:
  """Logs a fallback once per (setting, reason); louder when the kernel was asked for."""
  level = logging.WARNING if impl == "pallas" else logging.INFO
  _log.log(level, "attention_impl=%r: XLA attention for calls with %s.", impl, reason)


def attend(impl: str,
           q: jax.Array,  # [B, T, H, D], already rotated
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
           kv_limit: int | None = None,
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The model's attention: :func:`attention`'s math on the implementation ``impl``
  selects for this call (:func:`choose`; the module docstring has the table).

  Args:
    impl: "auto", "pallas" or "xla" (``ModelConfig.attention_impl``).
    kv_limit: read only the first ``kv_limit`` cache slots (static; every
      ``lengths[b]`` must be <= it). The XLA path slices the cache (XLA fuses the slice
      into its reads); the kernel takes it as a bound instead, since slicing a kernel
      operand would copy the cache.
    Everything else: as in :func:`attention`.

  Returns:
    As :func:`attention`.
  """
  chosen, reason = choose(impl, q, k_new, k_cache, v_dtypes=(v_new.dtype, v_cache.dtype),
                          prefix_idx=prefix_idx, slot_pos=slot_pos,
                          score_queries=score_queries)
  if chosen == "pallas":
    return _kernel(q, k_new, v_new, k_cache, v_cache, lengths, new_mask, window, kv_limit)
  if reason is not None:
    _log_fallback(impl, reason)
  if kv_limit is not None:
    k_cache, v_cache = k_cache[:, :, :kv_limit], v_cache[:, :, :kv_limit]
  return attention(q, k_new, v_new, k_cache, v_cache, lengths, new_mask, window=window,
                   prefix_idx=prefix_idx, slot_pos=slot_pos, score_queries=score_queries)


def _kernel(q, k_new, v_new, k_cache, v_cache, lengths, new_mask, window: Window | None,
            kv_limit: int | None):
  """``tree_attention`` compiled on GPU/TPU, interpreted elsewhere; per shard under a
  context mesh."""
  platform = _platform()
  interpret = platform not in ("gpu", "tpu")
  kernel = functools.partial(
      tree_attention_lib.tree_attention,
      sinks=None if window is None else window.sinks,
      recent=None if window is None else window.recent,
      kv_limit=kv_limit,
      backend="tpu" if platform == "tpu" else "gpu",  # the Triton kernel interprets faster
      interpret=interpret,
      # Interpreted grid steps run one after another: fewer splits, less overhead.
      num_splits=2 if interpret else None)
  args = (q, k_new, v_new, k_cache, v_cache, lengths, new_mask)
  mesh = _context_mesh()
  if mesh is None or mesh.size == 1 or mesh.are_all_axes_manual:  # already per shard
    return kernel(*args)
  in_specs, out_spec = shard_specs(mesh, q.shape[0], k_cache.shape[1], new_mask.ndim)
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*args)


def shard_specs(mesh, batch: int, kv_heads: int, mask_ndim: int) -> tuple[tuple, P]:
  """How the kernel's operands are split over a ("data", "model") mesh.

  Each shard gets whole rows (batch over "data") and whole GQA groups (KV heads, with
  their query heads, over "model"); an axis that does not divide is replicated, as in
  ``specjax.sharding``. Attention needs no communication between shards.

  Returns:
    in_specs for (q, k_new, v_new, k_cache, v_cache, lengths, new_mask) and the
    output's spec.
  """
  rules = sharding_lib.ShardingRules()
  b = rules.spec(mesh, ("batch",), (batch,))[0]
  # Query heads follow their KV heads: sharding q's heads alone would split groups.
  h = rules.spec(mesh, ("kv_heads",), (kv_heads,))[0]
  tokens, cache = P(b, None, h, None), P(b, h, None, None)  # [B, T, *, D], [B, K, S, D]
  mask = P(b, None, None) if mask_ndim == 3 else P(None, None)
  return (tokens, tokens, tokens, cache, cache, P(b), mask), tokens


def causal_mask(T: int) -> jax.Array:
  """bool[T, T]: token t sees tokens 0..t (prefill chunks and chains)."""
  return jnp.tril(jnp.ones((T, T), bool))
