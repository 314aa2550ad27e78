"""Pallas tree attention: split-K prefix blocks + one new-token block + LSE merge.

Implements the math of ``specjax.attention.attention`` (decode, chain verify, tree
verify, windowed drafts) as one kernel family with a Triton (GPU) and a Mosaic (TPU)
lowering. T new queries of row b attend to

* the cached prefix, positions ``p < lengths[b]`` (with a window: only
  ``p < sinks`` or ``p >= lengths[b] - recent``), read in blocks of ``block_k``
  slots, and
* the Tn new tokens through ``new_mask`` (causal for chains, ancestors for trees).

The G = H/K query heads of a KV head are folded into the query rows, so one program
works on a ``[T*G, D]`` tile of queries against one KV head (GQA reads each key once
for all its query heads). Rows are ordered ``r = t*G + g``::

    KV head k of row b:   rows (t, g)           keys
                          t=0 g=0..G-1   <-  prefix blocks 0, 1, ...   (length mask)
                          t=1 g=0..G-1   <-  ...
                          ...                new tokens 0..Tn-1        (new_mask[t, :])

Each program returns an unnormalised partial ``(o, m, l)`` (output, row max, row sum);
a plain-jnp log-sum-exp merge combines them. Only the blocks a row can see are read:
the active blocks of row b (those holding a valid position) are numbered
``0..n_active(b)-1`` -- the sink blocks, then the recent blocks -- and dealt out evenly
to ``num_splits`` splits, so the work follows ``lengths[b]`` (and the window budget),
not the cache size S. The XLA path reads all S slots of every row. For
``lengths[b] = 70``, ``block_k = 16``, ``S = 112``::

    slots            0      16      32      48      64      80      96     112
    no window        [blk 0][blk 1][blk 2][blk 3][blk 4]                      (5 read)
    sinks=4, recent=20 (positions 0..3 and 50..69):
                     [blk 0]               [blk 1][blk 2]                     (3 read)

Backends:

* GPU (Triton lowering): grid ``(B, K, row blocks, num_splits + 1)``; split s loops
  over its share of active blocks (a dynamic loop bound: inactive blocks cost neither
  a load nor a flop); the last split computes the new-token block. The last block of
  a cache whose S is not a multiple of ``block_k`` is read from ``S - block_k`` and
  masked, so no read leaves the buffer.
* TPU (Mosaic): lengths are scalar-prefetched into SMEM and the cache BlockSpec's
  index map names the active block of each grid step; steps past a row's active
  blocks repeat the previous block index, so the pipeline issues no DMA for them
  (a row with no prefix at all still fetches one block). Grid
  ``(B, K, num_splits, steps)``, online softmax in VMEM scratch; the new-token block
  is folded into the last split. An edge block past S is zeroed before use.

Not covered (``specjax.attention.attend``, the model's dispatch, sends these calls to
the XLA path with a logged reason): SnapKV ``prefix_idx``, ring caches
(``slot_pos``) and ``score_queries``. Uncommitted draft tokens (``pending``) are
simply more new-token columns.

Semantics beyond ``specjax.attention.attention``: a query that sees no key at all
(padding rows) returns zeros here; the XLA path returns a meaningless finite value
for it. ``lengths`` are clamped to ``[0, S]`` (``[0, kv_limit]`` with a kv_limit).

Validation on a GPU (interpret mode checks the math, not the hardware; run this on
every new GPU or jax version; the tests then run the kernel compiled on the device)::

  python -m pytest -q tests/test_tree_attention_kernel.py tests/test_attention_impl.py \
    && python -m experiments.kernel_bench --batch=64 --context=8192 --tree=16

On a TPU the same command runs the Mosaic kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

try:  # Mosaic TPU; present on every jax build we support.
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None
try:  # Triton GPU; deprecated in jax 0.11 (still works), may go in a later release.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

# A large finite negative score: masked scores never win a max, and inf - inf = nan
# cannot arise for rows whose every key is masked.
_MASKED = -1e30
_BACKENDS = {"gpu": "triton", "triton": "triton", "tpu": "mosaic", "mosaic": "mosaic"}
# Default splits per (row, KV head): GPUs need many programs in flight; on TPU each
# split is a parallel grid axis that megacore can spread over its two cores.
_DEFAULT_SPLITS = {"triton": 8, "mosaic": 2}
_NT = (((1,), (1,)), ((), ()))  # dot_general numbers for a @ b.T
_EXACT = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------
# Which prefix blocks a row reads.


class _Segments(NamedTuple):
  """The one or two runs of valid prefix positions of one row (scalars)."""

  sink_end: jax.Array  # sinks run: positions [0, sink_end)
  sink_blocks: jax.Array  # blocks it touches: 0 .. sink_blocks-1
  recent_start: jax.Array  # recent run: positions [recent_start, length)
  recent_first: jax.Array  # its first block
  recent_blocks: jax.Array  # number of blocks it touches
  length: jax.Array


@dataclasses.dataclass(frozen=True)
class _Prefix:
  """Static geometry of the prefix scan; the active blocks depend on the length."""

  size: int  # S, slots per row
  block_k: int
  window: tuple[int, int] | None  # (sinks, recent), or None for the whole prefix
  limit: int | None = None  # no length exceeds it (kv_limit); None = size

  @property
  def num_blocks(self) -> int:
    return pl.cdiv(self.size, self.block_k)

  @property
  def max_length(self) -> int:
    return self.size if self.limit is None else min(self.limit, self.size)

  @property
  def max_active(self) -> int:
    """An upper bound on the active blocks of any row."""
    reachable = pl.cdiv(self.max_length, self.block_k)  # blocks below the longest row
    if self.window is None:
      return max(reachable, 1)
    sinks, recent = self.window
    sink_blocks = pl.cdiv(min(sinks, self.max_length), self.block_k)
    # A run of `recent` positions at any offset touches at most cdiv(recent, bk) + 1.
    recent_blocks = min(pl.cdiv(recent, self.block_k) + 1, reachable) if recent else 0
    return max(sink_blocks + recent_blocks, 1)

  def segments(self, length: jax.Array) -> _Segments:
    """Splits [0, length) into its sinks run and its (disjoint) recent run."""
    bk = self.block_k
    length = jnp.clip(length, 0, self.max_length)
    if self.window is None:
      zero = jnp.zeros_like(length)
      return _Segments(length, pl.cdiv(length, bk), length, zero, zero, length)
    sinks, recent = self.window
    sink_end = jnp.minimum(length, sinks)
    # The recent run never starts below `sinks`, so no position is counted twice.
    recent_start = jnp.maximum(length - recent, sinks)
    recent_first = lax.div(recent_start, bk)
    recent_blocks = jnp.where(length > recent_start, pl.cdiv(length, bk) - recent_first, 0)
    return _Segments(sink_end, pl.cdiv(sink_end, bk), recent_start, recent_first,
                     recent_blocks, length)

  @staticmethod
  def num_active(seg: _Segments) -> jax.Array:
    return seg.sink_blocks + seg.recent_blocks

  def block(self, c: jax.Array, seg: _Segments):
    """Active block c of a row: (first slot, lowest and end valid position)."""
    in_sinks = c < seg.sink_blocks
    index = jnp.where(in_sinks, c, seg.recent_first + c - seg.sink_blocks)
    start = index * self.block_k
    lo = jnp.where(in_sinks, 0, seg.recent_start)
    hi = jnp.where(in_sinks, seg.sink_end, seg.length)
    return start, jnp.maximum(lo, start), hi


def _update(carry, q, k, v, visible):
  """One online-softmax step of q [R, D] over keys k, v [n, D]; visible: bool[R|1, n]."""
  o, m, l = carry  # f32[R, D], f32[R, 1], f32[R, 1]
  # HIGHEST: float32 inputs get float32 products (Triton's default is TF32, ~1e-3 off);
  # bfloat16 inputs are unaffected.
  s = lax.dot_general(q, k, _NT, precision=_EXACT, preferred_element_type=jnp.float32)
  s = jnp.where(visible, s, _MASKED)
  m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
  # Masked keys get exactly 0, also while every key so far was masked (m_new = _MASKED).
  p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
  correction = jnp.exp(m - m_new)
  l = correction * l + p.sum(axis=1, keepdims=True)
  o = correction * o + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                       precision=_EXACT, preferred_element_type=jnp.float32)
  return o, m_new, l


def _init(rows: int, d: int):
  return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), _MASKED, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))


# ---------------------------------------------------------------------------------------
# GPU (Triton lowering).


def _triton_kernel(len_ref,  # i32[] this row's length
                   q_ref,  # [block_rows, D] scaled queries, rows (t, g)
                   kc_ref, vc_ref,  # [S, D] this row's cache, one KV head
                   kn_ref, vn_ref,  # [Tn, D] new keys/values
                   mask_ref,  # i32[block_rows, Tn] new_mask expanded to rows
                   o_ref,  # f32[block_rows, D]
                   m_ref, l_ref,  # f32[block_rows, 1]
                   *, prefix: _Prefix, num_splits: int):
  split = pl.program_id(3)
  rows, d = q_ref.shape
  bk = prefix.block_k
  q = q_ref[...]

  def prefix_part():
    seg = prefix.segments(len_ref[...])
    n_active = prefix.num_active(seg)
    per_split = pl.cdiv(n_active, num_splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, n_active)
    offsets = lax.broadcasted_iota(jnp.int32, (1, bk), 1)

    def body(c, carry):
      start, lo, hi = prefix.block(c, seg)
      # The last block of a ragged S is read from S - bk: no read leaves the buffer.
      read = jnp.minimum(start, prefix.size - bk)
      pos = read + offsets
      visible = (pos >= lo) & (pos < hi)
      k = kc_ref[pl.ds(read, bk), :]
      v = vc_ref[pl.ds(read, bk), :]
      return _update(carry, q, k, v, visible)

    return lax.fori_loop(first, last, body, _init(rows, d))

  def new_part():
    return _update(_init(rows, d), q, kn_ref[...], vn_ref[...], mask_ref[...] != 0)

  o, m, l = lax.cond(split == num_splits, new_part, prefix_part)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def _triton_call(q, kc, vc, kn, vn, mask, lengths, prefix, num_splits, block_rows,
                 num_warps, num_stages, interpret):
  B, K, R, D = q.shape
  S, Tn, P = kc.shape[2], kn.shape[2], num_splits + 1
  batched_mask = mask.shape[0] > 1
  # Row blocks keep the f32 accumulator of one program in registers (flash-attention
  # style block_q); programs of one (b, k) share the prefix blocks through L2.
  head = lambda b, k, r, s: (b, k, 0, 0)
  rows = lambda b, k, r, s: (b, k, r, 0)
  out = lambda b, k, r, s: (b, k, s, r, 0)
  kernel = functools.partial(_triton_kernel, prefix=prefix, num_splits=num_splits)
  return pl.pallas_call(
      kernel,
      grid=(B, K, R // block_rows, P),
      in_specs=[
          pl.BlockSpec((None,), lambda b, k, r, s: (b,)),
          pl.BlockSpec((None, None, block_rows, D), rows),
          pl.BlockSpec((None, None, S, D), head),
          pl.BlockSpec((None, None, S, D), head),
          pl.BlockSpec((None, None, Tn, D), head),
          pl.BlockSpec((None, None, Tn, D), head),
          pl.BlockSpec((None, block_rows, Tn), lambda b, k, r, s: (
              b if batched_mask else 0, r, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_rows, D), out),
          pl.BlockSpec((None, None, None, block_rows, 1), out),
          pl.BlockSpec((None, None, None, block_rows, 1), out),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((B, K, P, R, D), jnp.float32),
          jax.ShapeDtypeStruct((B, K, P, R, 1), jnp.float32),
          jax.ShapeDtypeStruct((B, K, P, R, 1), jnp.float32),
      ],
      compiler_params=_triton_params(num_warps, num_stages),
      interpret=interpret,
      name="tree_attention_triton",
  )(lengths, q, kc, vc, kn, vn, mask)


def _triton_params(num_warps: int, num_stages: int):
  params = getattr(pltriton, "CompilerParams", None) or getattr(
      pltriton, "TritonCompilerParams", None)
  if params is None:
    raise ValueError("This jax has no Pallas Triton backend (jax.experimental.pallas."
                     "triton.CompilerParams); use backend='tpu' or the XLA attention.")
  return params(num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------------------------------
# TPU (Mosaic lowering).


def _tpu_step(prefix: _Prefix, num_splits: int, b, split, step, lengths_ref):
  """Grid step -> (row segments, active block number c, whether the step computes)."""
  seg = prefix.segments(lengths_ref[b])
  n_active = prefix.num_active(seg)
  per_split = pl.cdiv(n_active, num_splits)
  c = split * per_split + step
  computes = (step < per_split) & (c < n_active)
  # Idle steps name the block just read: an unchanged block index issues no DMA.
  c = jnp.maximum(jnp.minimum(split * per_split + jnp.minimum(step, per_split - 1),
                              n_active - 1), 0)
  return seg, c, computes


def _mosaic_kernel(lengths_ref,  # SMEM i32[B], scalar-prefetched
                   q_ref,  # [R, D]
                   kc_ref, vc_ref,  # [bk, D] the block this step names
                   kn_ref, vn_ref,  # [Tn, D]
                   mask_ref,  # i32[R, Tn]
                   o_ref, m_ref, l_ref,  # f32[R, D], f32[R, 1], f32[R, 1]
                   o_acc, m_acc, l_acc,  # VMEM scratch, same shapes
                   *, prefix: _Prefix, num_splits: int, steps: int):
  b, split, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bk = prefix.block_k

  @pl.when(step == 0)
  def _():
    o_acc[...], m_acc[...], l_acc[...] = _init(*o_acc.shape)

  seg, c, computes = _tpu_step(prefix, num_splits, b, split, step, lengths_ref)

  def accumulate(k, v, visible):
    o_acc[...], m_acc[...], l_acc[...] = _update(
        (o_acc[...], m_acc[...], l_acc[...]), q_ref[...], k, v, visible)

  @pl.when(computes)
  def _():
    start, lo, hi = prefix.block(c, seg)
    pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    v = vc_ref[...]
    if prefix.size % bk:  # The edge block's tail is outside the buffer: not data.
      tail = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) >= prefix.size
      v = jnp.where(tail, jnp.zeros_like(v), v)
    accumulate(kc_ref[...], v, (pos >= lo) & (pos < hi))

  @pl.when((split == num_splits - 1) & (step == steps - 1))
  def _():
    accumulate(kn_ref[...], vn_ref[...], mask_ref[...] != 0)

  @pl.when(step == steps - 1)
  def _():
    o_ref[...], m_ref[...], l_ref[...] = o_acc[...], m_acc[...], l_acc[...]


def _mosaic_call(q, kc, vc, kn, vn, mask, lengths, prefix, num_splits, interpret):
  B, K, R, D = q.shape
  Tn, bk = kn.shape[2], prefix.block_k
  steps = pl.cdiv(prefix.max_active, num_splits)
  batched_mask = mask.shape[0] > 1

  def cache_block(b, k, split, step, lengths_ref):
    seg, c, _ = _tpu_step(prefix, num_splits, b, split, step, lengths_ref)
    start, _, _ = prefix.block(c, seg)
    return b, k, jnp.clip(lax.div(start, bk), 0, prefix.num_blocks - 1), 0

  row = lambda b, k, split, step, lengths_ref: (b, k, 0, 0)
  out = lambda b, k, split, step, lengths_ref: (b, k, split, 0, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(B, K, num_splits, steps),
      in_specs=[
          pl.BlockSpec((None, None, R, D), row),
          pl.BlockSpec((None, None, bk, D), cache_block),
          pl.BlockSpec((None, None, bk, D), cache_block),
          pl.BlockSpec((None, None, Tn, D), row),
          pl.BlockSpec((None, None, Tn, D), row),
          pl.BlockSpec((None, R, Tn), lambda b, k, split, step, lengths_ref: (
              b if batched_mask else 0, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, R, D), out),
          pl.BlockSpec((None, None, None, R, 1), out),
          pl.BlockSpec((None, None, None, R, 1), out),
      ],
      scratch_shapes=[pltpu.VMEM((R, D), jnp.float32), pltpu.VMEM((R, 1), jnp.float32),
                      pltpu.VMEM((R, 1), jnp.float32)],
  )
  kernel = functools.partial(_mosaic_kernel, prefix=prefix, num_splits=num_splits,
                             steps=steps)
  if interpret:
    interpret = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[
          jax.ShapeDtypeStruct((B, K, num_splits, R, D), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R, 1), jnp.float32),
          jax.ShapeDtypeStruct((B, K, num_splits, R, 1), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tree_attention_mosaic",
  )(lengths, q, kc, vc, kn, vn, mask)


# ---------------------------------------------------------------------------------------
# Public entry points.


def _pick_backend(backend: str, interpret: bool) -> str:
  if backend == "auto":
    platform = jax.default_backend()
    if platform == "tpu":
      return "mosaic"
    if platform == "gpu" or interpret:
      return "triton"
    raise ValueError(f"tree_attention has no compiled kernel for {platform!r}: pass"
                     " interpret=True (slow, for tests) or use the XLA attention"
                     " (specjax.attention.attention).")
  if backend not in _BACKENDS:
    raise ValueError(f"backend={backend!r}: expected 'auto', " +
                     ", ".join(repr(b) for b in _BACKENDS) + ".")
  return _BACKENDS[backend]


def _window(sinks: int | None, recent: int | None) -> tuple[int, int] | None:
  if sinks is None and recent is None:
    return None
  sinks, recent = sinks or 0, recent or 0
  if sinks < 0 or recent < 0 or sinks + recent == 0:
    raise ValueError(f"sinks={sinks}, recent={recent}: the window must keep at least one"
                     " position and have no negative part (None, None = whole prefix).")
  return sinks, recent


def _check_shapes(q, k_new, v_new, k_cache, v_cache, lengths, new_mask):
  if q.ndim != 4 or k_new.ndim != 4 or k_cache.ndim != 4:
    raise ValueError(f"q {q.shape}, k_new {k_new.shape}, k_cache {k_cache.shape}: expected"
                     " [B, T, H, D], [B, Tn, K, D] and [B, K, S, D].")
  B, T, H, D = q.shape
  _, Tn, K, _ = k_new.shape
  if (k_new.shape != v_new.shape or k_cache.shape != v_cache.shape or
      (k_new.shape[0], k_new.shape[3]) != (B, D) or k_cache.shape[:2] != (B, K) or
      k_cache.shape[3] != D):
    raise ValueError(f"Inconsistent shapes: q {q.shape}, k_new {k_new.shape}, v_new"
                     f" {v_new.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}.")
  if H % K:
    raise ValueError(f"{H} query heads cannot be grouped over {K} KV heads.")
  if lengths.shape != (B,):
    raise ValueError(f"lengths has shape {lengths.shape}; expected ({B},).")
  if new_mask.shape not in ((T, Tn), (B, T, Tn)):
    raise ValueError(f"new_mask has shape {new_mask.shape}; expected ({T}, {Tn}) or"
                     f" ({B}, {T}, {Tn}).")


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _round_up(n: int, multiple: int) -> int:
  return pl.cdiv(n, multiple) * multiple


@functools.partial(jax.jit, static_argnames=(
    "sinks", "recent", "kv_limit", "block_k", "num_splits", "block_rows", "backend",
    "interpret", "num_warps", "num_stages"))
def tree_attention(q: jax.Array,  # [B, T, H, D], already rotated
                   k_new: jax.Array,  # [B, Tn, K, D], already rotated
                   v_new: jax.Array,  # [B, Tn, K, D]
                   k_cache: jax.Array,  # [B, K, S, D]
                   v_cache: jax.Array,  # [B, K, S, D]
                   lengths: jax.Array,  # i32[B]
                   new_mask: jax.Array,  # bool[T, Tn] or bool[B, T, Tn]
                   *,
                   sinks: int | None = None,
                   recent: int | None = None,
                   kv_limit: int | None = None,
                   block_k: int = 128,
                   num_splits: int | None = None,
                   block_rows: int = 64,
                   backend: str = "auto",
                   interpret: bool = False,
                   num_warps: int = 4,
                   num_stages: int = 2,
                   ) -> jax.Array:
  """Attention of new queries over the cached prefix and the new tokens (Pallas).

  Same math as ``specjax.attention.attention`` without ``prefix_idx``, ``slot_pos``
  and ``score_queries`` (use the XLA path for those): scale ``D**-0.5`` applied to q in
  its dtype, scores and softmax in float32, probabilities cast to the value dtype
  before the value product.

  Args:
    q: queries of the T new tokens, RoPE already applied at their positions.
    k_new, v_new: keys/values of the Tn new tokens (usually Tn == T).
    k_cache, v_cache: the row's cache; only positions ``[0, lengths[b])`` are read.
    lengths: committed prefix length of each row, at most S.
    new_mask: which new tokens each query sees (True = visible).
    sinks, recent: restrict the prefix to positions ``p < sinks`` or
      ``p >= lengths[b] - recent`` (``Window(sinks, recent)``); None for both means
      the whole prefix, None for one of them means 0.
    kv_limit: a static bound on every ``lengths[b]`` (``model.forward``'s kv_limit):
      positions at or past it are never read, as if the cache were sliced to
      ``[:kv_limit]``, without copying it. It shortens the TPU grid (which otherwise
      has steps for every block of S); the GPU loop bounds follow the lengths anyway.
    block_k: prefix slots per block. GPU: a power of two >= 16 (64-128 typical).
      TPU: a multiple of 8; 128-512 keeps the MXU busy and the grid short.
    num_splits: programs per (row, KV head) sharing the active prefix blocks; None
      picks 8 on GPU, 2 on TPU.
    block_rows: query rows (T*G of them per KV head) per GPU program, a power of two
      >= 16 (TPU programs take all rows).
    backend: "auto" (from ``jax.default_backend()``; on CPU it needs interpret=True
      and runs the Triton kernel), "gpu"/"triton" or "tpu"/"mosaic".
    interpret: run the kernel in Pallas interpret mode (CPU tests); the TPU kernel
      uses the TPU interpreter (``pltpu.InterpretParams``).
    num_warps, num_stages: Triton compiler parameters (GPU only).

  Returns:
    The attention output [B, T, H, D] in q's dtype. Queries that see no key at all
    get zeros.
  """
  _check_shapes(q, k_new, v_new, k_cache, v_cache, lengths, new_mask)
  dtypes = {x.dtype for x in (q, k_new, v_new, k_cache, v_cache)}
  if len(dtypes) > 1:
    raise ValueError(f"q, k_new, v_new, k_cache and v_cache mix dtypes"
                     f" {sorted(map(str, dtypes))}; the kernel's tiles need one: cast"
                     " them to the cache dtype.")
  lowering = _pick_backend(backend, interpret)
  window = _window(sinks, recent)
  num_splits = _DEFAULT_SPLITS[lowering] if num_splits is None else num_splits
  if num_splits < 1:
    raise ValueError(f"num_splits={num_splits} must be at least 1.")
  B, T, H, D = q.shape
  _, Tn, K, _ = k_new.shape
  G, S = H // K, k_cache.shape[2]
  if lowering == "triton":
    # Triton tiles are powers of two, and tl.dot wants every side >= 16.
    if block_k < 16 or block_k & (block_k - 1):
      raise ValueError(f"block_k={block_k}: the Triton kernel needs a power of two >= 16.")
    if D < 16 or D & (D - 1):
      raise ValueError(f"head_dim={D}: the Triton kernel needs a power of two >= 16;"
                       " use the XLA attention for this model.")
    if block_rows < 16 or block_rows & (block_rows - 1):
      raise ValueError(f"block_rows={block_rows}: the Triton kernel needs a power of two"
                       " >= 16.")
    block_rows = min(block_rows, max(16, pl.next_power_of_2(T * G)))
    rows, tn = _round_up(T * G, block_rows), max(16, pl.next_power_of_2(Tn))
  else:
    if block_k % 8:
      raise ValueError(f"block_k={block_k}: the TPU kernel needs a multiple of 8.")
    # Whole sublane tiles (8 rows of 32 bits, 16 of bf16); also avoids a degenerate
    # Tn = 1 value product, which Mosaic mislowers for bf16.
    tile = 8 * max(1, 4 // q.dtype.itemsize)
    rows, tn = _round_up(T * G, tile), _round_up(Tn, tile)
  if S < block_k:  # A cache smaller than one block: pad it (a copy of < block_k slots).
    k_cache, v_cache = (_pad_to(x, 2, block_k) for x in (k_cache, v_cache))
  if kv_limit is not None and kv_limit < 0:
    raise ValueError(f"kv_limit={kv_limit} must be >= 0 (or None).")
  limit = S if kv_limit is None else min(kv_limit, S)
  prefix = _Prefix(k_cache.shape[2], block_k, window, limit)

  # Queries of KV head k as rows (t, g), scaled in q's dtype exactly as the XLA path.
  qs = q * jnp.asarray(D ** -0.5, q.dtype)
  qs = qs.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, D)
  qs = _pad_to(qs, 2, rows)
  kn, vn = (_pad_to(x.transpose(0, 2, 1, 3), 2, tn) for x in (k_new, v_new))
  mask = new_mask if new_mask.ndim == 3 else new_mask[None]
  mask = jnp.repeat(mask, G, axis=1)  # [B or 1, T*G, Tn]
  mask = _pad_to(_pad_to(mask, 1, rows), 2, tn).astype(jnp.int32)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, limit)

  if lowering == "triton":
    o, m, l = _triton_call(qs, k_cache, v_cache, kn, vn, mask, lengths, prefix, num_splits,
                           block_rows, num_warps, num_stages, interpret)
  else:
    o, m, l = _mosaic_call(qs, k_cache, v_cache, kn, vn, mask, lengths, prefix, num_splits,
                           interpret)

  # Log-sum-exp merge of the partials [B, K, P, rows, *].
  weight = jnp.exp(m - m.max(axis=2, keepdims=True))
  total = (weight * l).sum(axis=2)  # [B, K, rows, 1]
  out = (weight * o).sum(axis=2) / jnp.where(total > 0, total, 1.0)
  out = out[:, :, :T * G].reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4)
  return out.reshape(B, T, H, D).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sinks", "recent", "kv_limit"))
def tree_attention_reference(q: jax.Array,  # [B, T, H, D]
                             k_new: jax.Array,  # [B, Tn, K, D]
                             v_new: jax.Array,  # [B, Tn, K, D]
                             k_cache: jax.Array,  # [B, K, S, D]
                             v_cache: jax.Array,  # [B, K, S, D]
                             lengths: jax.Array,  # i32[B]
                             new_mask: jax.Array,  # bool[T, Tn] or bool[B, T, Tn]
                             *,
                             sinks: int | None = None,
                             recent: int | None = None,
                             kv_limit: int | None = None,
                             ) -> jax.Array:
  """Plain-jnp :func:`tree_attention`: one dense masked softmax over [prefix; new].

  Returns:
    [B, T, H, D] in q's dtype; zeros for queries that see no key.
  """
  _check_shapes(q, k_new, v_new, k_cache, v_cache, lengths, new_mask)
  window = _window(sinks, recent)
  B, T, H, D = q.shape
  K, S = k_cache.shape[1], k_cache.shape[2]
  f32 = jnp.float32
  qg = q.reshape(B, T, K, H // K, D) * jnp.asarray(D ** -0.5, q.dtype)
  length = jnp.clip(lengths, 0, S if kv_limit is None else min(kv_limit, S))[:, None]
  pos = jnp.arange(S)[None, :]
  valid = pos < length  # [B, S]
  if window is not None:
    valid &= (pos < window[0]) | (pos >= length - window[1])
  mask = jnp.broadcast_to(new_mask, (B,) + new_mask.shape[-2:])
  visible = jnp.concatenate([jnp.broadcast_to(valid[:, None], (B, T, S)), mask], axis=2)
  keys = jnp.concatenate([k_cache, k_new.transpose(0, 2, 1, 3)], axis=2)  # [B, K, S+Tn, D]
  values = jnp.concatenate([v_cache, v_new.transpose(0, 2, 1, 3)], axis=2)
  # Products of bf16 operands are exact in f32, so upcasting first is the same math as
  # a bf16 x bf16 -> f32 dot (which XLA:CPU cannot run for every batched shape).
  s = jnp.einsum("btkgd,bksd->bkgts", qg.astype(f32), keys.astype(f32))
  visible = visible[:, None, None]  # [B, 1, 1, T, S+Tn]
  s = jnp.where(visible, s, -jnp.inf)
  m = s.max(axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.moveaxis(p.sum(axis=-1), 3, 1)[..., None]  # [B, T, K, G, 1]
  # Probabilities rounded to the value dtype, as in the value product of the kernel.
  out = jnp.einsum("bkgts,bksd->btkgd", p.astype(values.dtype).astype(f32),
                   values.astype(f32))
  out = out / jnp.where(denom > 0, denom, 1.0)
  return out.reshape(B, T, H, D).astype(q.dtype)
