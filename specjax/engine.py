"""Generation engine: input validation, chunked ragged prefill and decoding loops.

``generate`` takes a batch of prompts of different lengths, validates them at the
boundary (empty prompts, out-of-range ids, context and memory limits), prefills them in
fixed-size chunks (one compiled shape; each row commits only its own valid tokens) and
runs the decode loop for the chosen method. The autoregressive loop is one
``lax.while_loop`` on device: a whole generation is a single dispatch. Every jitted
step is compiled ahead of time once per shape, so ``stats`` separate compile time from
run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import uuid
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax import cost_model, drafts, kv_cache, memory, model as model_lib, sampling, sequoia
from specjax import ngram as ngram_lib
from specjax import suffix_index
from specjax import verify
from specjax import sharding as sharding_lib
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache
from specjax.tree import RowTrees, TokenTree

METHODS = ("autoregressive", "magicdec", "magicdec_draft", "sequoia", "suffix", "ngram",
           "hybrid")
DEFAULT_PREFILL_CHUNK = 512
_CACHE_ALIGN = 128


@dataclasses.dataclass
class GenerateStats:
  """Timings of one ``generate`` call (seconds; compile time kept apart)."""

  batch: int
  prompt_tokens: int  # sum over rows
  new_tokens: int  # sum over rows, the first (prefill) token included
  cache_size: int
  compile_s: float
  prefill_s: float
  decode_s: float
  decode_steps: int  # target forward passes after prefill (speculation rounds)
  tokens_per_round: float  # mean tokens a generating row gains per round
  # (kv_limit, drafts per round, rounds) per on-device decode loop, in order: the
  # context buckets decoding passed through and, with gamma/tree="auto", the shape
  # chosen for each (drafts per round = gamma for a chain, tree size - 1 for a tree).
  segments: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
  calibrate_s: float = 0.0  # auto: timing the cost model (once per bucket and process)
  host: Any = None  # HostStats of host-drafted methods (suffix, ngram, hybrid)
  compactions: list[int] = dataclasses.field(default_factory=list)  # batch after each

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens produced by decode steps (all rows) per second of decoding."""
    return (self.new_tokens - self.batch) / self.decode_s if self.decode_s > 0 else 0.0

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(decode_tokens_per_s=self.decode_tokens_per_s,
             prefill_tokens_per_s=self.prefill_tokens_per_s)
    return d


@dataclasses.dataclass
class GenerateOutput:
  """Generated token ids per row (prompt excluded, a final EOS included), texts when a
  tokenizer is available, and timings."""

  tokens: list[list[int]]
  texts: list[str] | None
  stats: GenerateStats


# ----------------------------------------------------------------------------------
# Validation at the public boundary.


def is_single_prompt(prompts) -> bool:
  """True for one prompt (a string or a flat list/array of ids), False for a batch."""
  if isinstance(prompts, str):
    return True
  if isinstance(prompts, np.ndarray) or hasattr(prompts, "shape"):
    return np.ndim(prompts) == 1
  return (isinstance(prompts, Sequence) and len(prompts) > 0 and
          isinstance(prompts[0], (int, np.integer)))


def encode_prompts(prompts, cfg: ModelConfig, tokenizer=None) -> list[list[int]]:
  """Turn a prompt or a batch of prompts (strings or token-id lists) into id lists.

  Raises:
    ValueError: empty batch, empty prompt, strings without a tokenizer, ids out of
      ``[0, vocab_size)``.
  """
  if is_single_prompt(prompts):
    prompts = [prompts]
  if not isinstance(prompts, Sequence) or len(prompts) == 0:
    raise ValueError("prompts is empty: pass a string, a list of token ids, or a batch"
                     " of either.")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError(f"prompt {i} is a string but the model has no tokenizer; pass"
                         " token ids.")
      ids = tokenizer.encode(p)
    else:
      ids = [int(t) for t in np.asarray(p).reshape(-1)]
    if not ids:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token.")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {cfg.vocab_size})"
                       f" (the model's vocab_size).")
    out.append(ids)
  return out


def per_row(value, batch: int, name: str) -> np.ndarray:
  """An int or a per-row sequence -> i32[batch], each >= 1."""
  arr = np.broadcast_to(np.asarray(value, np.int64), (batch,)) if np.ndim(value) == 0 \
      else np.asarray(value, np.int64)
  if arr.shape != (batch,):
    raise ValueError(f"{name} has {arr.size} entries for a batch of {batch}.")
  if (arr < 1).any():
    raise ValueError(f"{name} must be >= 1 for every row; got {arr.tolist()}.")
  return arr.astype(np.int32)


def plan_cache_size(cfg: ModelConfig, prompt_lens: Sequence[int], max_new: np.ndarray,
                    max_cache_len: int | None, extra: int = 0) -> int:
  """Slots per row: the longest prompt + its new tokens (+ ``extra`` scratch), aligned.

  Raises:
    ValueError: a prompt plus its new tokens exceeds ``max_cache_len`` or the model's
      context ``cfg.max_seq_len``.
  """
  limit = cfg.max_seq_len if max_cache_len is None else min(max_cache_len, cfg.max_seq_len)
  need = [n + int(m) + extra for n, m in zip(prompt_lens, max_new)]
  worst = int(np.argmax(need))
  if need[worst] > limit:
    which = ("the cache (max_cache_len)" if max_cache_len is not None and
             max_cache_len < cfg.max_seq_len else "the model's context (max_seq_len)")
    raise ValueError(
        f"prompt {worst} has {prompt_lens[worst]} tokens; with max_new_tokens="
        f"{int(max_new[worst])}{f' and {extra} scratch slots' if extra else ''} it needs"
        f" {need[worst]} positions, more than the {limit} of {which}. Shorten the prompt"
        f" or generate fewer tokens.")
  size = -(-max(need) // _CACHE_ALIGN) * _CACHE_ALIGN
  return min(size, limit) if max_cache_len is None else min(size, max_cache_len)


# ----------------------------------------------------------------------------------
# Compiled steps. Each is compiled once per (config, shapes, mesh) and reused.

_COMPILED: dict[Any, Any] = {}  # key -> executable, least recently used first
# Executables kept at most. Each holds its JIT code mappings: XLA:CPU maps ~250 per
# decode program (its parallel-codegen splits), and a process may hold
# vm.max_map_count (65530 by default) in all, so a long-running process (a server, the
# test suite) that meets many shapes (batch x context buckets x trees) must let old
# ones go; past that, LLVM aborts with "Unable to allocate section memory".
MAX_COMPILED = 96


def _compile(key, fn, args, in_shardings, out_shardings, donate_argnums=(), mesh=None):
  """AOT-compile ``fn`` for these argument shapes, or reuse the executable compiled
  for ``key`` (an LRU of ``MAX_COMPILED``); returns (executable, seconds compiling).

  With a mesh, tracing happens under ``jax.set_mesh`` so that the attention kernel
  can run per shard (``specjax.attention.attend``)."""
  if key in _COMPILED:
    _COMPILED[key] = _COMPILED.pop(key)  # now the most recently used
    return _COMPILED[key], 0.0
  t0 = time.perf_counter()
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    exe = jitted.lower(*args).compile()
  _COMPILED[key] = exe
  while len(_COMPILED) > MAX_COMPILED:
    del _COMPILED[next(iter(_COMPILED))]
  return exe, time.perf_counter() - t0


def _prefill_chunk(params, cache: KVCache, tokens, chunk_start, prompt_lens, last_logits,
                   *, cfg: ModelConfig, all_logits: bool, kv_limit: int):
  """One prefill chunk for all rows: tokens i32[B, C] are prompt[chunk_start:+C].

  Row b commits its ``clip(prompt_lens[b] - chunk_start, 0, C)`` valid tokens; the
  logits of its last prompt token are kept when that token falls in this chunk.
  Attention reads only the first ``kv_limit`` cache slots (static; every committed
  token of every row lies below it), so early chunks do not pay for the whole cache.
  """
  C = tokens.shape[1]
  n_valid = jnp.clip(prompt_lens - chunk_start, 0, C)
  last = prompt_lens - 1 - chunk_start  # [B], in-chunk index of the last prompt token
  logits_at = None if all_logits else jnp.clip(last, 0, C - 1)[:, None]
  logits, new = model_lib.forward(params, cfg, tokens, cache, logits_at=logits_at,
                                  kv_limit=kv_limit)
  cache = kv_cache.commit(cache, new, n_valid)
  if all_logits:
    return cache, logits
  here = ((last >= 0) & (last < C))[:, None]
  return cache, jnp.where(here, logits[:, 0], last_logits)


def _kv_limit(prefix: int, chunk: int, size: int) -> int:
  """Slots a chunk after ``prefix`` committed tokens must read: the prefix rounded up to
  a power-of-two multiple of the chunk (few compiled shapes), capped at the cache."""
  limit = chunk
  while limit < prefix:
    limit *= 2
  return min(limit, size)


def prefill_chunk_size(chunk: int, longest_prompt: int) -> int:
  """The chunk prefill really uses: no longer than the longest prompt (rounded to 8)."""
  return min(chunk, -(-longest_prompt // 8) * 8)


def prefill(params, cfg: ModelConfig, cache: KVCache, prompts: list[list[int]], *,
            chunk: int = DEFAULT_PREFILL_CHUNK, mesh=None, all_logits: bool = False):
  """Prefill a ragged batch of prompts into an empty cache, chunk by chunk.

  Returns:
    (cache, logits, compile_s): logits f32[B, V] of each row's last prompt token, or
    f32[B, P, V] for every (padded) prompt position when ``all_logits``.
  """
  B = len(prompts)
  lens = np.array([len(p) for p in prompts], np.int32)
  chunk = prefill_chunk_size(chunk, int(lens.max()))
  n_chunks = -(-int(lens.max()) // chunk)
  padded = np.full((B, n_chunks * chunk), cfg.pad_id, np.int32)
  for b, p in enumerate(prompts):
    padded[b, :len(p)] = p
  last_logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
  shardings = _step_shardings(cfg, mesh, B, cache.size, params)
  in_sh = out_sh = None
  if shardings is not None:
    p_sh, c_sh, row, rep = shardings
    in_sh = (p_sh, c_sh, row, rep, row, row)
    out_sh = (c_sh, row)
  lens_arr = jnp.asarray(lens)
  compile_s = 0.0
  outs = []
  for c in range(n_chunks):
    limit = _kv_limit(c * chunk, chunk, cache.size)
    tokens = jnp.asarray(padded[:, c * chunk:(c + 1) * chunk])
    args = (params, cache, tokens, jnp.int32(c * chunk), lens_arr, last_logits)
    fn = functools.partial(_prefill_chunk, cfg=cfg, all_logits=all_logits, kv_limit=limit)
    key = ("prefill", cfg, B, chunk, cache.size, limit, all_logits, _mesh_key(mesh))
    exe, seconds = _compile(key, fn, args, in_sh, out_sh, donate_argnums=(1,), mesh=mesh)
    compile_s += seconds
    cache, last_logits = exe(*args)
    if all_logits:
      outs.append(last_logits)
      last_logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
  if all_logits:
    return cache, jnp.concatenate(outs, axis=1), compile_s
  return cache, last_logits, compile_s


def _place(model, batch: int, size: int, mesh):
  """The model's params and an empty cache, laid out on the mesh when one is given."""
  cfg = model.config
  if mesh is None:
    return model.params, kv_cache.init_cache(cfg, batch, size)
  return (sharding_lib.shard_params(model.params, cfg, mesh),
          kv_cache.init_cache(cfg, batch, size,
                              sharding_lib.cache_shardings(cfg, batch, size, mesh)))


def _mesh_key(mesh):
  return None if mesh is None else (tuple(mesh.shape.items()),
                                    tuple(d.id for d in mesh.devices.flat))


def _step_shardings(cfg, mesh, batch, cache_size, params):
  """(params, cache, per-row, replicated) shardings, or None without a mesh."""
  if mesh is None:
    return None
  del params
  return (sharding_lib.param_shardings(cfg, mesh),
          sharding_lib.cache_shardings(cfg, batch, cache_size, mesh),
          sharding_lib.batch_sharding(mesh, batch, 1),
          sharding_lib.replicated(mesh))


def _emit(out, num, done, toks, count, max_new, eos):
  """Append ``toks[b, :count[b]]`` to each active row, cut at its budget and first EOS.

  Args:
    out: i32[B, N] output buffer; num: i32[B] tokens already in it; done: bool[B].
    toks: i32[B, R] this round's tokens; count: i32[B] how many of them are real.
  """
  B, R = toks.shape
  i = jnp.arange(R)[None, :]
  count = jnp.where(done, 0, jnp.minimum(count, max_new - num))
  is_eos = (toks[..., None] == eos).any(-1) & (i < count[:, None])
  hit = is_eos.any(-1)
  count = jnp.where(hit, jnp.argmax(is_eos, axis=-1) + 1, count)
  idx = jnp.where(i < count[:, None], num[:, None] + i, out.shape[1])
  out = out.at[jnp.arange(B)[:, None], idx].set(toks, mode="drop")
  num = num + count
  return out, num, done | hit | (num >= max_new)


def _spec_round(params, cfg, cache, draft_state, pending, key, spec: drafts.SpecConfig, sp,
                draft_params, active, kv_limit):
  """Draft a token tree (a chain is a one-branch tree; autoregressive decoding the
  lone root), verify all its nodes in one target forward, commit the accepted path.

  Args:
    pending: i32[B] each row's last accepted token, not yet in the cache: the root.
    draft_params: the draft model's weights, or None for self-speculation.
    active: bool[B] rows still generating; finished rows still run (static shapes)
      but commit nothing, to the target cache or the draft state.
    kv_limit: cache slots the verify reads (static; >= every row's length).

  Returns:
    (cache, draft_state, tokens i32[B, D + 1], count i32[B], next pending i32[B])
    where row b's new tokens are ``tokens[b, :count[b]]`` (accepted drafts, then the
    target's token) and D the tree's depth.
  """
  key_draft, key_verify = jax.random.split(key)
  tree = spec.shape
  if spec.speculative:
    nodes, q, draft_state = drafts.propose(params, cfg, cache, draft_state, pending,
                                           key_draft, spec, sp, draft_params)
  else:
    nodes = pending[:, None]
    q = jnp.zeros((pending.shape[0], 1, cfg.vocab_size), jnp.float32)
  cache, keep, path, toks, count, nxt = _verify_commit(params, cfg, cache, nodes, q, tree,
                                                       key_verify, sp, active, kv_limit)
  if spec.speculative:
    draft_state = drafts.after_verify(draft_state, spec, cache, keep, path)
  return cache, draft_state, toks, count, nxt


def _verify_commit(params, cfg: ModelConfig, cache: KVCache, nodes, q, tree, key, sp,
                   active, kv_limit):
  """Verify every node of each row's tree in one target forward and commit the
  accepted path: the one verify + KV-commit path of every method.

  Args:
    nodes: i32[B, n] node tokens (node 0 the pending token); q: f32[B, n, V] the draft
      distributions (zeros for deterministic host drafts).
    tree: a static ``TokenTree`` or per-row ``RowTrees``.

  Returns:
    (cache, keep i32[B] tokens committed, path i32[B, D + 1], tokens i32[B, D + 1],
    count i32[B], next pending i32[B]); row b's new tokens are ``tokens[b, :count[b]]``.
  """
  # Node u sits at position lengths + depth(u) and sees the prefix and its ancestors.
  logits, new = model_lib.forward(params, cfg, nodes, cache,
                                  offsets=jnp.asarray(tree.depths),
                                  new_mask=jnp.asarray(tree.ancestor_mask), kv_limit=kv_limit)
  path, n, nxt = verify.verify_tree(key, tree, nodes, q, sampling.probabilities(logits, sp))
  keep = jnp.where(active, n + 1, 0)  # the pending token + accepted drafts
  # KV compaction: the accepted path's keys go to contiguous slots after the prefix.
  cache = kv_cache.commit(cache, new, keep, src=jnp.maximum(path, 0))
  accepted = jnp.take_along_axis(nodes, jnp.maximum(path[:, 1:], 0), axis=1)  # [B, D]
  padded = jnp.concatenate([accepted, jnp.zeros_like(nxt[:, None])], 1)  # [B, D + 1]
  i = jnp.arange(tree.max_depth + 1)[None, :]
  return cache, keep, path, jnp.where(i < n[:, None], padded, nxt[:, None]), n + 1, nxt


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything the decode loop carries from round to round (and segment to segment)."""

  cache: KVCache
  draft: Any  # the draft state (drafts.init_state), or None
  pending: jax.Array  # i32[B] last accepted token per row, not yet in the cache
  out: jax.Array  # i32[B, n_out] tokens emitted so far (pad after num[b])
  num: jax.Array  # i32[B]
  done: jax.Array  # bool[B]
  key: jax.Array  # PRNG key
  rounds: jax.Array  # i32[] target forwards so far
  row_rounds: jax.Array  # i32[] sum over rounds of the rows still generating


def _start_state(cache: KVCache, draft_state, first, key, max_new, *, pad_id: int,
                 eos_ids: tuple[int, ...], n_out: int) -> DecodeState:
  """The state before the first round: ``first`` emitted, nothing else."""
  B = first.shape[0]
  out = jnp.full((B, n_out), pad_id, jnp.int32)
  out, num, done = _emit(out, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool),
                         first[:, None], jnp.ones((B,), jnp.int32), max_new,
                         _eos_array(eos_ids))
  return DecodeState(cache=cache, draft=draft_state, pending=first, out=out, num=num,
                     done=done, key=key, rounds=jnp.int32(0), row_rounds=jnp.int32(0))


def _state_shardings(cfg: ModelConfig, mesh, batch: int, size: int, draft_state):
  """(params, DecodeState, per-row, replicated) shardings for a decode loop, or None
  without a mesh. The draft state is replicated."""
  sh = _step_shardings(cfg, mesh, batch, size, None)
  if sh is None:
    return None
  p_sh, c_sh, row, rep = sh
  s_sh = DecodeState(cache=c_sh, draft=None if draft_state is None else rep, pending=row,
                     out=row, num=row, done=row, key=rep, rounds=rep, row_rounds=rep)
  return p_sh, s_sh, row, rep


# The smallest batch compaction shrinks to. Below a few rows a decode step reads the
# weights whatever the batch (it is weight-bound on GPU, TPU and CPU alike), so a
# smaller batch saves little per round and costs one more compiled step shape.
MIN_COMPACT_BATCH = 4


def batch_buckets(batch: int, multiple: int = 1,
                  smallest: int = MIN_COMPACT_BATCH) -> tuple[int, ...]:
  """The batch sizes a decode loop shrinks through as its rows finish
  (``compact_batch``): ``batch`` and ``multiple`` times the powers of two below it,
  none below ``smallest`` (``multiple``: the mesh's data-parallel size, so the rows stay
  evenly sharded). A generation compiles its step for at most log2(B) + 1 batch shapes."""
  sizes = {batch}
  while multiple < batch:
    if multiple >= smallest:
      sizes.add(multiple)
    multiple *= 2
  return tuple(sorted(sizes))


def _take_state(state: DecodeState, rows) -> DecodeState:
  return DecodeState(cache=kv_cache.take_rows(state.cache, rows),
                     draft=drafts.take_rows(state.draft, rows), pending=state.pending[rows],
                     out=state.out[rows], num=state.num[rows], done=state.done[rows],
                     key=state.key, rounds=state.rounds, row_rounds=state.row_rounds)


class _BatchRows:
  """Batch compaction for a decode loop: which request each row of the loop's state
  holds, and the outputs of the requests that have left it.

  A static batch pays for a finished row in every round, and rows finish at different
  times: at EOS, at their own budgets, and under speculation at the pace of their
  drafts (a row that copies long stretches of its prompt is done in a fraction of the
  rounds of one that does not). Between device steps, once the rows still generating
  fit the next smaller of ``batch_buckets``, the state is gathered to them (padded with
  finished rows up to the bucket), the leaving rows' outputs are kept here, and the
  loop goes on at the smaller batch. Rows never change order relative to each other,
  and a row's tokens do not depend on its batch (greedy output is unchanged).
  """

  def __init__(self, batch: int, enabled: bool, mesh=None):
    multiple = 1 if mesh is None else int(dict(mesh.shape).get("data", 1))
    self.buckets = (batch_buckets(batch, multiple, MIN_COMPACT_BATCH) if enabled
                    else (batch,))
    self.slots = np.arange(batch)  # the request held by each row of the state
    self.out: np.ndarray | None = None  # outputs of the requests that left
    self.num = np.zeros(batch, np.int32)
    self.compactions: list[int] = []  # batch size after each compaction

  @property
  def batch(self) -> int:
    return len(self.slots)

  def floor(self) -> int:
    """Active rows at which an on-device loop should stop for compaction (0: never)."""
    smaller = [b for b in self.buckets if b < self.batch]
    return smaller[-1] if smaller else 0

  def keep(self, done: np.ndarray) -> np.ndarray | None:
    """The rows to keep (active ones, then finished ones up to the bucket) when the
    active rows fit a smaller bucket, else None."""
    active = np.flatnonzero(~done)
    size = next(b for b in self.buckets if b >= max(len(active), 1))
    if size >= self.batch:
      return None
    return np.concatenate([active, np.flatnonzero(done)[:size - len(active)]])

  def compact(self, state: DecodeState, keep: np.ndarray, cfg: ModelConfig, mesh):
    """Gather ``state`` to rows ``keep``.

    Returns:
      (state, shardings for the new batch (None without a mesh), compile seconds).
    """
    leaving = np.setdiff1d(np.arange(self.batch), keep)
    out, num = jax.device_get((state.out, state.num))
    if self.out is None:
      self.out = np.zeros((len(self.num),) + out.shape[1:], out.dtype)
    self.out[self.slots[leaving]] = out[leaving]
    self.num[self.slots[leaving]] = num[leaving]
    self.slots = self.slots[keep]
    shardings = _state_shardings(cfg, mesh, len(keep), state.cache.size, state.draft)
    in_sh = out_sh = None
    if shardings is not None:
      old = _state_shardings(cfg, mesh, len(leaving) + len(keep), state.cache.size,
                             state.draft)
      in_sh, out_sh = (old[1], old[3]), shardings[1]
    rows = np.asarray(keep, np.int32)
    leaves = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state))
    exe, seconds = _compile(("take_rows", jax.tree.structure(state), leaves, len(keep),
                             _mesh_key(mesh)), _take_state, (state, rows), in_sh, out_sh,
                            mesh=mesh)  # no donation: no output has an input's shape
    self.compactions.append(len(keep))
    return exe(state, rows), shardings, seconds

  def result(self, state: DecodeState) -> tuple[np.ndarray, np.ndarray]:
    """(tokens i32[B, n], num i32[B]) of every request, in the original order."""
    out, num = jax.device_get((state.out, state.num))
    if self.out is None:
      return out, num
    self.out[self.slots] = out
    self.num[self.slots] = num
    return self.out, self.num


def _eos_array(eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)


def _decode_segment(params, state: DecodeState, max_new, draft_params, stop_rounds,
                    min_active, *, cfg: ModelConfig, sp: sampling.SamplingParams,
                    spec: drafts.SpecConfig, eos_ids: tuple[int, ...],
                    kv_limit: int) -> DecodeState:
  """Speculative (gamma > 0) or autoregressive (gamma = 0) rounds as one on-device
  while loop, until at most ``min_active`` rows are still generating (0: every row
  is done), some row's prefix outgrows ``kv_limit`` (the cache slots this compiled
  loop reads), or ``stop_rounds`` rounds have run in all.

  Args:
    max_new: i32[B] per-row token budget (the first token counts).
    draft_params: a draft model's weights (``spec.draft_cfg``), or None.
    stop_rounds: i32[] (traced) round count at which to return to the host.
    min_active: i32[] (traced): return to the host once this few rows are active (the
      host then compacts the batch, ``_BatchRows``).
  """
  eos = _eos_array(eos_ids)

  def cond(s: DecodeState):
    # Finished rows may have committed a round's drafts past their budget (and past
    # the limit); they run on masked and commit nothing, so only active rows count.
    longest = jnp.where(s.done, 0, s.cache.lengths).max()
    return (((~s.done).sum() > min_active) & (s.rounds < stop_rounds)
            & (longest <= kv_limit))

  def body(s: DecodeState):
    key, sub = jax.random.split(s.key)
    active = ~s.done
    cache, draft_state, toks, count, nxt = _spec_round(
        params, cfg, s.cache, s.draft, s.pending, sub, spec, sp, draft_params, active,
        kv_limit)
    out, num, done = _emit(s.out, s.num, s.done, toks, count, max_new, eos)
    return DecodeState(cache=cache, draft=draft_state, pending=nxt, out=out, num=num,
                       done=done, key=key, rounds=s.rounds + 1,
                       row_rounds=s.row_rounds + active.sum(dtype=jnp.int32))

  return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class DecodeResult:
  """What a decoding loop produced after prefill."""

  tokens: np.ndarray  # i32[B, n]; row b's tokens are tokens[b, :num[b]]
  num: np.ndarray  # i32[B]
  steps: int  # rounds = target forward passes
  row_rounds: int  # sum over rounds of the rows still generating
  compile_s: float
  run_s: float
  cache: KVCache  # the loop's last cache (after compaction, of the rows still in it)
  draft_init_s: float = 0.0  # building the draft state (SnapKV scoring, draft prefill)
  # One (kv_limit, drafts per round, rounds) per on-device loop run, in order.
  segments: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
  calibrate_s: float = 0.0  # gamma="auto": timing the cost model's forwards
  compactions: list[int] = dataclasses.field(default_factory=list)  # batch after each

  @property
  def tokens_per_round(self) -> float:
    """Mean tokens a generating row gains per target forward (1 for autoregressive)."""
    return float(self.num.sum() - len(self.num)) / max(self.row_rounds, 1)


DECODE_BUCKET = 1024  # decode loops read a power-of-two multiple of this many slots
AUTO_GAMMAS = (0, 1, 2, 3, 4, 6)  # gamma="auto" chooses among these chains
AUTO_TREE_SIZES = (3, 4, 5, 8, 16, 32, 64)  # tree="auto": optimal trees of these
AUTO_TREE_DEPTHS = (2, 4, 8)  # ... sizes (root included) and depth limits
# auto: rounds between re-estimates (a segment returns to the host; a 64-token
# generation runs ~15 rounds, so the schedule can go back on a choice that disappoints)
AUTO_SEGMENT_ROUNDS = 4
AUTO_PROBE_ROUNDS = 4  # ... and before the first one
AUTO_PROBE_DEPTH = 4  # ... drafting at most this deep (cost_model.ShapeSchedule)


def auto_trees(acceptance, sizes=AUTO_TREE_SIZES, depths=AUTO_TREE_DEPTHS,
               max_depth: int | None = None) -> tuple[TokenTree, ...]:
  """``tree="auto"``'s choices: Sequoia's optimal tree for every (size, depth limit),
  plus the lone root (plain decoding, for where no tree pays)."""
  trees = {TokenTree.chain(0): None}
  for n in sizes:
    for d in depths:
      if max_depth is None or d <= max_depth:
        trees[sequoia.optimal_tree(n, min(d, n - 1), acceptance)] = None
  return tuple(trees)


def decode_kv_limit(max_length: int, size: int, bucket: int = DECODE_BUCKET) -> int:
  """The cache slots a decode loop reads while the longest row has ``max_length``
  committed tokens: a power-of-two multiple of ``bucket`` above it, capped at
  ``size``. A row reaching the limit ends the loop, and the next reads a larger one."""
  return _kv_limit(max_length + 1, bucket, size)


def decode(params, cfg: ModelConfig, cache: KVCache, first: jax.Array, *,
           max_new: np.ndarray, sp: sampling.SamplingParams = sampling.SamplingParams(),
           spec: drafts.SpecConfig = drafts.SpecConfig(), key: jax.Array | None = None,
           eos_ids: tuple[int, ...] = (), mesh=None,
           prompts: Sequence[Sequence[int]] | None = None,
           draft_params=None, auto: Sequence[TokenTree] | None = None,
           acceptance: Sequence[float] = (0.7,),
           kv_bucket: int | None = None, compact_batch: bool = True) -> DecodeResult:
  """Continue every row of a prefilled cache, autoregressively or speculatively.

  Decoding runs on device as a while loop over rounds; the host steps in only
  between *segments*: when the longest row outgrows the context bucket the loop was
  compiled for (the verify reads a power-of-two multiple of ``kv_bucket`` slots, not
  the whole cache), and with ``auto`` every few rounds to re-estimate the acceptance
  and choose the next segment's tree (or chain, or plain decoding).

  Args:
    cache: prefilled cache; row b continues after its ``lengths[b]`` tokens. Donated.
      It needs room for ``max_new[b] - 1`` more tokens per row; speculation needs no
      extra scratch.
    first: i32[B] each row's next token (sampled from the prefill logits, or taken
      from the text when benchmarking); it is the first output token.
    max_new: i32[B] tokens per row, ``first`` included.
    spec: speculation settings; ``gamma=0`` is autoregressive decoding. With ``auto``
      its gamma/tree is ignored (the rest is the draft's template).
    key: PRNG key for sampling.
    prompts: the prompt ids that filled ``cache`` (row b: ``lengths[b]`` ids); needed
      by SnapKV (its observation window) and draft models (their own prefill).
    draft_params: the draft model's weights when ``spec.draft_cfg`` is set.
    auto: ``gamma="auto"`` (chains) / ``tree="auto"``: choose the round's tree per
      (batch, context bucket) among these with the calibrated cost model
      (``cost_model.ShapeSchedule``); ``TokenTree.chain(0)`` is plain decoding.
    acceptance: the schedule's prior positional acceptance vector.
    kv_bucket: the smallest context bucket in slots (default ``DECODE_BUCKET``).
    compact_batch: drop finished rows from the batch as they go: the loop returns to
      the host once the active rows fit the next smaller of ``batch_buckets``, which
      gathers the state to them (``_BatchRows``); with ``auto`` the cost model is
      calibrated per (batch, context bucket).

  Returns:
    A DecodeResult; ``run_s`` excludes compilation, calibration and building the draft
    state (``draft_init_s``, prefill-time work).
  """
  drafts.check(spec, cfg, draft_params)
  B = first.shape[0]
  n_out = int(max_new.max())
  key = jax.random.key(0) if key is None else key
  kv_bucket = DECODE_BUCKET if kv_bucket is None else kv_bucket
  schedule, calibrate_s = None, [0.0]
  if auto is not None:
    auto = tuple(dict.fromkeys(auto))
    if spec.draft_cfg is not None:  # a draft model's ring must follow every round
      auto = tuple(t for t in auto if t.max_depth)
    if not auto:
      raise ValueError("auto has no usable tree (a draft model needs drafts each round).")
    for tree in auto:  # validate every choice now (__post_init__), not mid-generation
      dataclasses.replace(spec, gamma=0, tree=tree)
    spec = dataclasses.replace(spec, gamma=0, tree=max(auto, key=lambda t: t.size))

    def timings(bucket):  # bucket = (batch, kv_limit): the batch shrinks with compaction
      t, seconds = _calibration(params, cfg, *bucket, auto, spec, draft_params, mesh)
      calibrate_s[0] += seconds
      return t

    schedule = cost_model.ShapeSchedule(timings, auto, prior=acceptance,
                                        probe_depth=AUTO_PROBE_DEPTH)
  lengths, size = np.asarray(cache.lengths), cache.size
  draft_state, init_compile_s, init_s = None, 0.0, 0.0
  if spec.speculative:
    draft_state, init_compile_s, init_s = _init_draft_state(
        params, cfg, cache, spec, prompts, draft_params, mesh)
  # The loop state is donated: copy what belongs to the caller (the cache is donated).
  state = _start_state(cache, draft_state, jnp.array(first, jnp.int32), jax.random.clone(key),
                       jnp.asarray(max_new), pad_id=cfg.pad_id, eos_ids=tuple(eos_ids),
                       n_out=n_out)
  max_new = np.asarray(max_new)
  max_new_arr = jnp.asarray(max_new)
  batch_rows = _BatchRows(B, compact_batch, mesh)
  shardings = _state_shardings(cfg, mesh, B, cache.size, draft_state)
  if shardings is not None:
    p_sh, s_sh, row, rep = shardings
    d_sh = None if spec.draft_cfg is None else sharding_lib.param_shardings(spec.draft_cfg,
                                                                            mesh)
    state = jax.device_put(state, s_sh)
    max_new_arr = jax.device_put(max_new_arr, row)
  compile_s, run_s, segments = init_compile_s, 0.0, []
  done_rows = np.asarray(state.done)
  done = bool(done_rows.all())
  while not done:
    keep = batch_rows.keep(done_rows)
    if keep is not None:  # the active rows fit a smaller batch: drop finished ones
      t0 = time.perf_counter()
      state, shardings, seconds = batch_rows.compact(state, keep, cfg, mesh)
      compile_s += seconds
      lengths, done_rows = lengths[keep], done_rows[keep]
      max_new_arr = jnp.asarray(max_new[batch_rows.slots])
      if shardings is not None:
        p_sh, s_sh, row, rep = shardings
        max_new_arr = jax.device_put(max_new_arr, row)
      run_s += time.perf_counter() - t0 - seconds
    limit = decode_kv_limit(int(lengths[~done_rows].max()), size, kv_bucket)
    bucket = (batch_rows.batch, limit)
    rounds_before = int(state.rounds)
    stop = np.iinfo(np.int32).max
    seg_spec = spec
    if schedule is not None:
      seg_spec = dataclasses.replace(spec, tree=schedule.choose(bucket))
      stop = rounds_before + (AUTO_SEGMENT_ROUNDS if segments else AUTO_PROBE_ROUNDS)
      if seg_spec.speculative:
        state.draft = drafts.for_round(state.draft, seg_spec)
        if shardings is not None:
          state.draft = jax.device_put(state.draft, rep)
    fn = functools.partial(_decode_segment, cfg=cfg, sp=sp, spec=seg_spec,
                           eos_ids=tuple(eos_ids), kv_limit=limit)
    args = (params, state, max_new_arr, draft_params, jnp.int32(stop),
            jnp.int32(batch_rows.floor()))
    in_sh = out_sh = None
    if shardings is not None:
      in_sh, out_sh = (p_sh, s_sh, row, d_sh, rep, rep), s_sh
    exe_key = ("decode", cfg, sp, seg_spec, tuple(eos_ids), n_out, batch_rows.batch, size,
               limit, _mesh_key(mesh))
    exe, seconds = _compile(exe_key, fn, args, in_sh, out_sh, donate_argnums=(1,), mesh=mesh)
    compile_s += seconds
    num_before, row_rounds_before = np.asarray(state.num), int(state.row_rounds)
    t0 = time.perf_counter()
    state = exe(*args)
    lengths, num, done_rows, rounds, row_rounds = jax.device_get(
        (state.cache.lengths, state.num, state.done, state.rounds, state.row_rounds))
    seg_s = time.perf_counter() - t0
    run_s += seg_s
    if int(rounds) == rounds_before and not done_rows.all():
      raise RuntimeError(f"decode made no progress (kv_limit={limit}, lengths="
                         f"{lengths.tolist()}, done={done_rows.tolist()}); this is a bug.")
    segments.append((limit, seg_spec.shape.size - 1, int(rounds) - rounds_before))
    if schedule is not None:
      schedule.observe(seg_spec.shape, int((num - num_before).sum()),
                       int(row_rounds) - row_rounds_before, context=bucket, seconds=seg_s,
                       rounds=int(rounds) - rounds_before)
    done = bool(done_rows.all())
  out, num = batch_rows.result(state)
  return DecodeResult(tokens=out, num=num, steps=int(state.rounds),
                      row_rounds=int(state.row_rounds), compile_s=compile_s,
                      run_s=run_s, cache=state.cache, draft_init_s=init_s,
                      segments=segments, calibrate_s=calibrate_s[0],
                      compactions=batch_rows.compactions)


# ----------------------------------------------------------------------------------
# Host-built drafts (SuffixDecoding, n-gram lookup, and their hybrid with MagicDec).

HOST_METHODS = ("suffix", "ngram", "hybrid")
HOST_TREE_SIZES = (1, 2, 4, 8, 16, 32)  # compiled verify sizes for host drafts (root incl.)
HOST_EXPLORE_ROUNDS = 8  # sizing="auto": verify some drafts at least this often


def _host_round(params, state: DecodeState, nodes, trees: RowTrees, use_model, max_new, *,
                cfg: ModelConfig, sp: sampling.SamplingParams, spec: drafts.SpecConfig | None,
                eos_ids: tuple[int, ...], kv_limit: int):
  """One round of host-drafted speculation: verify each row's host tree (and, with
  ``spec``, the MagicDec self-draft's chain for the rows in ``use_model``) in one
  target forward, commit, emit.

  Args:
    nodes: i32[B, n] the host drafts' tokens (node 0 is replaced by the pending token).
    trees: the host drafts' shapes; use_model: bool[B] rows that take the model draft
      instead (ignored without ``spec``).

  Returns:
    (state, tokens i32[B, n], count i32[B]) as in :func:`_spec_round`.
  """
  key, sub = jax.random.split(state.key)
  key_draft, key_verify = jax.random.split(sub)
  active = ~state.done
  nodes = nodes.at[:, 0].set(state.pending)
  # Host drafts are deterministic choices: q = 0 verifies each node as a point mass.
  q = jnp.zeros(nodes.shape + (cfg.vocab_size,), jnp.float32)
  draft_state = state.draft
  if spec is not None:
    m_nodes, m_q, draft_state = drafts.propose(params, cfg, state.cache, draft_state,
                                               state.pending, key_draft, spec, sp)
    g = spec.shape.size
    nodes = nodes.at[:, :g].set(jnp.where(use_model[:, None], m_nodes, nodes[:, :g]))
    q = q.at[:, :g].set(jnp.where(use_model[:, None, None], m_q, 0.0))
    trees = trees.where(use_model, spec.shape)
  cache, keep, path, toks, count, nxt = _verify_commit(params, cfg, state.cache, nodes, q,
                                                       trees, key_verify, sp, active, kv_limit)
  if spec is not None:
    draft_state = drafts.after_verify(draft_state, spec, cache, keep, path)
  out, num, done = _emit(state.out, state.num, state.done, toks, count, max_new,
                         _eos_array(eos_ids))
  state = DecodeState(cache=cache, draft=draft_state, pending=nxt, out=out, num=num,
                      done=done, key=key, rounds=state.rounds + 1,
                      row_rounds=state.row_rounds + active.sum(dtype=jnp.int32))
  return state, toks, count


class _Calibration:
  """Online ratio of accepted to predicted drafts (a prior of ``prior`` worth
  ``weight`` observations): the hybrid's self-draft acceptance per row-round."""

  def __init__(self, prior: float, weight: float = 8.0):
    self.accepted, self.predicted = prior * weight, weight

  @property
  def value(self) -> float:
    return self.accepted / self.predicted

  def observe(self, accepted: float, predicted: float) -> None:
    self.accepted += accepted
    self.predicted += predicted


class _DepthCalibration:
  """Host drafts' acceptance per draft depth: accepted / predicted, where predicted is
  the sum of the proposer's probabilities of the verified nodes at that depth and
  accepted counts the rows whose accepted path reached it (a prior of ``prior``
  worth ``weight`` observations per depth).

  The proposers' probabilities are frequency estimates (a copy seen once scores 1 all
  the way down); what verification accepts falls off with depth faster than they do,
  so one scale for every depth overrates long drafts. This is the host drafts'
  counterpart of Sequoia's positional acceptance vector.
  """

  def __init__(self, max_depth: int, prior: float = 0.5, weight: float = 8.0):
    self.accepted = np.full(max_depth + 1, prior * weight)
    self.predicted = np.full(max_depth + 1, weight)
    self.accepted[0] = weight  # depth 0, the root: always kept

  def factors(self) -> np.ndarray:
    """Per depth; never above a shallower depth's (a row reaches depth d only through
    d - 1), so a rarely verified deep depth does not keep its optimistic prior."""
    return np.minimum.accumulate(self.accepted / self.predicted)

  def observe(self, depths: np.ndarray, probs: np.ndarray, accepted: int) -> None:
    """One verified draft: its nodes' depths and probabilities, and how many of its
    tokens were accepted (the accepted path's depth)."""
    np.add.at(self.predicted, depths, probs)
    self.accepted[1:min(int(accepted), int(depths.max(initial=0))) + 1] += 1.0


def _draft_depths(parents: Sequence[int]) -> np.ndarray:
  """Depth of every node of a draft whose parents come first (the root, depth 0, is
  not listed: parent -1)."""
  depth = np.zeros(len(parents), np.int64)
  for i, p in enumerate(parents):
    depth[i] = 1 if p < 0 else depth[p] + 1
  return depth


def _hybrid_bar(model_accepted: float, spec: drafts.SpecConfig, timings) -> float:
  """The score a row's host draft needs to beat the self-draft chain.

  A row gains 1 + s tokens from a host draft of score s in one verify, and 1 + m from
  the chain (m = its accepted drafts per round so far), which costs gamma draft forwards
  more: the host draft is the better deal when (1 + s) / T_verify >= (1 + m) /
  (T_verify + gamma T_draft). Without timings (``sizing="longest"``): s >= m.
  """
  if timings is None:
    return model_accepted
  verify_s = timings.target[spec.shape.size]
  return (1.0 + model_accepted) * verify_s / timings.round_time(spec.shape) - 1.0


def _choose_host_size(sizes, gains_fn, round_time) -> int:
  """The verify size with the most expected tokens per second of round time."""
  return max(sizes, key=lambda n: gains_fn(n) / round_time(n))


def _plan_host_round(use_model, active, row_drafts, expect, sizes, spec, timings,
                     measured, bucket, model_accepted):
  """A host-drafted round's plan when the rows in ``use_model`` take the self-draft.

  Args:
    expect: row -> calibrated expected accepted tokens of its draft's first k nodes
      (index k - 1); timings: the bucket's calibration, None for ``sizing="longest"``;
    measured: (bucket, size, with_model) -> measured round seconds, or None, where
      bucket = (batch, kv_limit).

  Returns:
    (host_rows, size, whole, rate): the rows verifying a host draft, the verify size
    (the one with the most expected tokens per second, or ``whole`` without timings),
    the smallest size holding every host draft, and the expected tokens per second.
  """
  model_rows = bool(use_model.any())
  host_rows = [b for b in np.flatnonzero(active & ~use_model)
               if row_drafts[b] is not None and row_drafts[b].tokens]
  longest = max((len(row_drafts[b].tokens) + 1 for b in host_rows), default=1)
  floor = spec.shape.size if model_rows else 1
  choices = [s for s in sizes if s >= floor]
  whole = next((s for s in choices if s >= longest), choices[-1])  # holds every draft
  if timings is None:
    return host_rows, whole, whole, 0.0
  gain_m = model_accepted * use_model.sum()
  gains = lambda n: int(active.sum()) + gain_m + sum(
      expect[b][min(n - 1, len(expect[b])) - 1] if n > 1 else 0.0 for b in host_rows)
  draft_time = spec.gamma * timings.draft[spec.shape] if model_rows else 0.0

  def round_time(n):  # measured in this bucket once it ran there, else calibrated
    seen = measured((bucket, n, model_rows))
    return float(np.median(seen[-8:])) if seen else timings.target[n] + draft_time

  size = _choose_host_size([s for s in choices if s <= whole], gains, round_time)
  return host_rows, size, whole, gains(size) / round_time(size)


@dataclasses.dataclass
class HostStats:
  """Host-side cost of host-built drafts: per round, seconds of proposer work
  (lookups + index updates) divided by the rows it served, and the device round time."""

  host_s_per_row: list[float] = dataclasses.field(default_factory=list)
  device_s: list[float] = dataclasses.field(default_factory=list)
  sizes: list[int] = dataclasses.field(default_factory=list)  # verify size per round
  model_rows: int = 0  # hybrid: row-rounds drafted by the model
  host_rows: int = 0  # row-rounds drafted on the host (non-empty drafts)
  start_s: float = 0.0  # proposer.start for every row (indexing the prompts), in all


def decode_host(params, cfg: ModelConfig, cache: KVCache, first: jax.Array, *,
                max_new: np.ndarray, proposer, prompts: Sequence[Sequence[int]],
                sp: sampling.SamplingParams = sampling.SamplingParams(),
                spec: drafts.SpecConfig | None = None, threshold: float | None = None,
                sizes: Sequence[int] = HOST_TREE_SIZES, max_draft: int = 31,
                sizing: str = "auto", key: jax.Array | None = None,
                eos_ids: tuple[int, ...] = (), mesh=None, kv_bucket: int | None = None,
                compact_batch: bool = True) -> tuple[DecodeResult, HostStats]:
  """Decode with drafts built on the host between device rounds (SuffixDecoding,
  n-gram prompt lookup), optionally hybrid with the MagicDec self-draft.

  Each round: the host asks ``proposer`` for every active row's draft (a token tree
  or path after the row's last token), packs them into ``RowTrees`` of the smallest
  compiled size in ``sizes`` that the round needs, and one jitted step verifies and
  commits them through the same path as every other method (``_verify_commit``);
  the accepted tokens come back to the host and extend the proposer's index.

  Args:
    proposer: ``start(rid, prompt) / extend(rid, tokens) / finish(rid) /
      propose(rid, max_tokens, max_depth) -> Draft`` (``specjax.suffix_index.
      SuffixDecoder``, ``specjax.ngram.NgramProposer``). Rows are started here and
      finished when they stop, so a SuffixDecoder's global index learns their outputs.
    prompts: the prompt ids that filled ``cache``.
    spec: the hybrid's MagicDec self-draft (a chain); None for host drafts only.
    threshold: hybrid: a row takes its host draft when the draft's calibrated score
      (expected accepted tokens) is at least this; None compares tokens per second
      with the model draft's, from its accepted tokens per round measured so far and
      the calibrated draft and verify times (:func:`_hybrid_bar`); with
      ``sizing="auto"`` a round also drops the self-draft when the cost model expects
      more tokens per second without it.
    sizes: compiled verify sizes (root included); max_draft: drafted tokens per row
      per round at most.
    sizing: "auto" picks the round's size (truncating drafts, parents first) that
      maximises expected tokens per second: expected tokens from the proposers'
      probabilities rescaled per draft depth by what verification has accepted
      (``_DepthCalibration``), seconds from the round times measured at that size in
      this context bucket, or the calibrated cost model before one ran there;
      "longest" uses the smallest size holding every row's whole draft.
    compact_batch: drop finished rows from the batch (``_BatchRows``) once the active
      ones fit the next smaller of ``batch_buckets``; timings and measured round times
      are per (batch, context bucket).

  Returns:
    (DecodeResult, HostStats); ``run_s`` counts the device rounds and the host's
    drafting and index updates between them (not compilation or calibration).
  """
  if sizing not in ("auto", "longest"):
    raise ValueError(f"sizing={sizing!r}; pass 'auto' or 'longest'.")
  if spec is not None and (spec.tree is not None or spec.draft_cfg is not None
                           or not spec.speculative):
    raise ValueError("the hybrid's model draft is the MagicDec self-draft chain (gamma >= 1,"
                     " no draft model, no tree).")
  sizes = tuple(sorted({int(s) for s in sizes} | {1}))
  if spec is not None and spec.shape.size > sizes[-1]:
    raise ValueError(f"gamma={spec.gamma} needs a verify size of {spec.shape.size}; the"
                     f" largest compiled size is {sizes[-1]}.")
  max_draft = min(max_draft, sizes[-1] - 1)
  B = first.shape[0]
  n_out = int(max_new.max())
  key = jax.random.key(0) if key is None else key
  kv_bucket = DECODE_BUCKET if kv_bucket is None else kv_bucket
  prompts = [list(map(int, p)) for p in prompts]
  draft_state, compile_s, init_s = None, 0.0, 0.0
  if spec is not None:
    draft_state, compile_s, init_s = _init_draft_state(params, cfg, cache, spec, prompts,
                                                       None, mesh)
  state = _start_state(cache, draft_state, jnp.array(first, jnp.int32), jax.random.clone(key),
                       jnp.asarray(max_new), pad_id=cfg.pad_id, eos_ids=tuple(eos_ids),
                       n_out=n_out)
  max_new = np.asarray(max_new)
  max_new_arr = jnp.asarray(max_new)
  batch_rows = _BatchRows(B, compact_batch, mesh)
  shardings = _state_shardings(cfg, mesh, B, cache.size, draft_state)
  if shardings is not None:
    p_sh, s_sh, row, rep = shardings
    state = jax.device_put(state, s_sh)
    max_new_arr = jax.device_put(max_new_arr, row)

  stats = HostStats()
  first_host = np.asarray(first)
  rids = [f"{uuid.uuid4().hex}:{b}" for b in range(B)]
  t0 = time.perf_counter()
  for b in range(B):
    proposer.start(rids[b], prompts[b])
    proposer.extend(rids[b], [int(first_host[b])])
  stats.start_s = time.perf_counter() - t0  # indexing the prompts: once per request
  host_s = 0.0
  num, done_rows = jax.device_get((state.num, state.done))
  lengths = np.asarray(cache.lengths).copy()
  for b in np.flatnonzero(done_rows):
    proposer.finish(rids[b])
  size_limit = cache.size
  host_cal = _DepthCalibration(max_draft)  # accepted / predicted per draft depth
  measured: dict[tuple, list[float]] = {}  # ((batch, limit), size, model) -> seconds
  model_accept = _Calibration(prior=0.7 * spec.gamma if spec else 0.0, weight=1.0)
  run_s, segments, calibrate_s = 0.0, [], 0.0
  idle = 0  # rounds in a row that had host drafts but verified none (sizing="auto")
  timings_cache: dict[int, Any] = {}  # kv_limit -> the full batch's Timings
  B0 = B

  def timings(bucket):  # bucket = (batch, kv_limit)
    """The full batch's calibration at this context bucket; for a compacted batch,
    rescaled by the round times measured there (not calibrated again: each batch
    size would cost a calibration of every verify size)."""
    nonlocal calibrate_s
    batch, limit = bucket
    if limit not in timings_cache:
      trees = [TokenTree.chain(s - 1) for s in sizes]
      verify_t, seconds = _calibration(params, cfg, B0, limit, trees, None, None, mesh)
      calibrate_s += seconds
      if spec is not None:  # the model draft's chain: one draft level and its verify
        model, seconds = _calibration(params, cfg, B0, limit, [spec.shape], spec, None, mesh)
        calibrate_s += seconds
        verify_t = dataclasses.replace(verify_t, target={**model.target, **verify_t.target},
                                       draft=dict(model.draft))
      timings_cache[limit] = verify_t
    base = timings_cache[limit]
    if batch == B0:
      return base
    ratios = [np.median(seen[-8:]) / (base.target[n] + (base.drafting(spec.shape) if m else 0))
              for (key, n, m), seen in measured.items() if key == bucket]
    return base.scaled(float(np.median(ratios)) if ratios else 1.0, batch)

  while not done_rows.all():
    keep = batch_rows.keep(done_rows)
    if keep is not None:  # the active rows fit a smaller batch: drop finished ones
      t0 = time.perf_counter()
      state, shardings, seconds = batch_rows.compact(state, keep, cfg, mesh)
      compile_s += seconds
      lengths, done_rows, num = lengths[keep], done_rows[keep], num[keep]
      rids = [rids[b] for b in keep]
      max_new_arr = jnp.asarray(max_new[batch_rows.slots])
      if shardings is not None:
        p_sh, s_sh, row, rep = shardings
        max_new_arr = jax.device_put(max_new_arr, row)
      run_s += time.perf_counter() - t0 - seconds
    B = batch_rows.batch
    row_max = max_new[batch_rows.slots]
    active = ~done_rows
    limit = decode_kv_limit(int(lengths[active].max()), size_limit, kv_bucket)
    bucket = (B, limit)
    t = timings(bucket) if sizing == "auto" else None  # calibrated once, not timed
    t0 = time.perf_counter()
    row_drafts = [None] * B
    for b in np.flatnonzero(active):
      remaining = int(row_max[b] - num[b])  # a round emits at most drafts + 1 tokens
      budget = min(max_draft, remaining - 1)
      row_drafts[b] = proposer.propose(rids[b], max_tokens=budget, max_depth=budget) \
          if budget > 0 else None
    factors = host_cal.factors()
    depths = {b: _draft_depths(d.parents) for b, d in enumerate(row_drafts)
              if d is not None and d.tokens}
    expect = {b: np.cumsum(factors[depths[b]] * np.asarray(row_drafts[b].probs))
              for b in depths}  # calibrated expected accepted tokens, node by node
    score = np.array([expect[b][-1] if b in expect else 0.0 for b in range(B)])
    use_model = np.zeros(B, bool)
    if spec is not None:
      bar = threshold
      if bar is None:
        bar = _hybrid_bar(model_accept.value, spec, t)
      use_model = active & ((score < bar) | (score == 0))
      use_model &= (row_max - num) > spec.gamma  # a full chain fits the budget
    host_rows, size, whole, rate = _plan_host_round(
        use_model, active, row_drafts, expect, sizes, spec, t, measured.get, bucket,
        model_accept.value)
    if spec is not None and threshold is None and t is not None and use_model.any():
      # The self-draft is worth its forwards only if the round beats one without it
      # (on a compute-bound machine it often does not: plain decoding, host drafts).
      alt = _plan_host_round(np.zeros(B, bool), active, row_drafts, expect, sizes, spec, t,
                             measured.get, bucket, model_accept.value)
      if alt[3] > rate:
        use_model = np.zeros(B, bool)
        host_rows, size, whole, rate = alt
    model_rows = bool(use_model.any())
    if sizing == "auto":
      # The calibration learns only from drafts that are verified: if it has talked
      # the rounds out of verifying any, every few rounds verify a short prefix anyway.
      idle = idle + 1 if host_rows and size == 1 else 0
      if idle >= HOST_EXPLORE_ROUNDS:
        size, idle = next(s for s in sizes if s >= max(size, min(whole, 4))), 0
    rows = []
    node_tokens = np.zeros((B, size), np.int32)
    kept = np.zeros(B, np.int64)  # host-drafted nodes verified per row
    for b in range(B):
      d = row_drafts[b]
      if b in host_rows:
        k = min(len(d.tokens), size - 1)
        rows.append((-1,) + tuple(p + 1 for p in d.parents[:k]))
        node_tokens[b, 1:k + 1] = d.tokens[:k]
        kept[b] = k
      else:
        rows.append((-1,))
    trees = RowTrees.from_parents(rows, size, size - 1)
    host_s += time.perf_counter() - t0
    host_time_rows = int(active.sum())

    fn = functools.partial(_host_round, cfg=cfg, sp=sp, spec=spec if model_rows else None,
                           eos_ids=tuple(eos_ids), kv_limit=limit)
    args = (params, state, node_tokens, trees, use_model, max_new_arr)  # NumPy: no convert
    in_sh = out_sh = None
    if shardings is not None:
      t_sh = RowTrees(parents=row, depths=row, ancestor_mask=row, max_depth=size - 1)
      in_sh, out_sh = (p_sh, s_sh, row, t_sh, row, row), (s_sh, row, row)
    exe, seconds = _compile(("host_round", cfg, sp, spec if model_rows else None,
                             tuple(eos_ids), n_out, B, cache.size, size, limit,
                             _mesh_key(mesh)), fn, args, in_sh, out_sh, donate_argnums=(1,),
                            mesh=mesh)
    compile_s += seconds
    t1 = time.perf_counter()
    state, toks, count = exe(*args)
    new_num, done_new, lengths, toks = jax.device_get(
        (state.num, state.done, state.cache.lengths, toks))
    device_s = time.perf_counter() - t1
    run_s += device_s

    t0 = time.perf_counter()
    for b in np.flatnonzero(active):
      emitted = int(new_num[b] - num[b])
      if emitted:
        proposer.extend(rids[b], toks[b, :emitted].tolist())
      if done_new[b]:
        proposer.finish(rids[b])
    gained = np.asarray(new_num - num, np.float64) - 1.0  # accepted drafts (about)
    for b in host_rows:
      k = kept[b]
      host_cal.observe(depths[b][:k], np.asarray(row_drafts[b].probs[:k]), max(gained[b], 0))
    measured.setdefault((bucket, size, model_rows), []).append(device_s)
    if model_rows:
      model_accept.observe(float(np.clip(gained[use_model], 0, None).sum()),
                           float(use_model.sum()))
    host_s += time.perf_counter() - t0
    stats.host_s_per_row.append(host_s / max(host_time_rows, 1))
    run_s += host_s  # the host's drafting is part of decoding time
    host_s = 0.0
    stats.device_s.append(device_s)
    stats.sizes.append(size)
    stats.model_rows += int(use_model.sum())
    stats.host_rows += len(host_rows)
    if segments and segments[-1][:2] == (limit, size - 1):
      segments[-1] = (limit, size - 1, segments[-1][2] + 1)
    else:
      segments.append((limit, size - 1, 1))
    num, done_rows = new_num, done_new
  out, num = batch_rows.result(state)
  return DecodeResult(tokens=out, num=num, steps=int(state.rounds),
                      row_rounds=int(state.row_rounds), compile_s=compile_s,
                      run_s=run_s + stats.start_s,
                      cache=state.cache, draft_init_s=init_s, segments=segments,
                      calibrate_s=calibrate_s, compactions=batch_rows.compactions), stats


_TIMINGS: dict[Any, Any] = {}


def _calibration(params, cfg: ModelConfig, batch: int, context: int, trees, spec,
                 draft_params, mesh):
  """``cost_model.calibrate`` for one (batch, context bucket), once per process.

  Returns:
    (Timings, seconds spent now).
  """
  key = (cfg, batch, context, tuple(trees),
         None if spec is None else dataclasses.replace(spec, tree=None), _mesh_key(mesh))
  if key in _TIMINGS:
    return _TIMINGS[key], 0.0
  t0 = time.perf_counter()
  sh = None if mesh is None else sharding_lib.cache_shardings(cfg, batch, context, mesh)
  _TIMINGS[key] = cost_model.calibrate(params, cfg, batch, context, trees, spec,
                                       draft_params=draft_params, cache_sharding=sh)
  return _TIMINGS[key], time.perf_counter() - t0


def _init_draft_state(params, cfg: ModelConfig, cache: KVCache, spec: drafts.SpecConfig,
                      prompts, draft_params, mesh):
  """Build ``drafts.init_state`` (SnapKV scoring or a draft model's prefill).

  Returns:
    (state, compile seconds, run seconds).
  """
  if spec.draft_cfg is None and spec.draft_kv == "streaming":
    return None, 0.0, 0.0
  if prompts is None:
    raise ValueError(f"this speculation setting (draft_kv={spec.draft_kv!r}, draft model:"
                     f" {spec.draft_cfg is not None}) builds its draft from the prompts;"
                     " pass prompts= to decode.")
  prompts = [list(p) for p in prompts]
  lens = np.array([len(p) for p in prompts])
  if len(prompts) != cache.batch or not (lens == np.asarray(cache.lengths)).all():
    raise ValueError(f"prompts (lengths {lens.tolist()}) do not match the cache (lengths"
                     f" {np.asarray(cache.lengths).tolist()}).")
  compile_s = 0.0
  t0 = time.perf_counter()
  draft_prefill = None
  if spec.draft_cfg is not None:
    dcfg = spec.draft_cfg
    sh = None if mesh is None else sharding_lib.cache_shardings(dcfg, cache.batch,
                                                                cache.size, mesh)
    draft_prefill, _, compile_s = prefill(
        draft_params, dcfg, kv_cache.init_cache(dcfg, cache.batch, cache.size, sh), prompts,
        mesh=mesh)
  tail, tail_n = drafts.prompt_tails(prompts, spec.prompt_tail, cfg.pad_id)
  args = (params, cache, jnp.asarray(tail), jnp.asarray(tail_n), draft_prefill)
  exe, seconds = _compile(("draft_init", cfg, spec, cache.batch, cache.size, _mesh_key(mesh)),
                          lambda p, c, t, n, d: drafts.init_state(spec, p, cfg, c, t, n, d),
                          args, None, None, mesh=mesh)
  state = exe(*args)
  jax.block_until_ready(state)
  compile_s += seconds
  return state, compile_s, time.perf_counter() - t0 - compile_s


def spec_config(method: str, *, gamma: int = 4, draft_kv: str = "streaming",
                sinks: int = 16, window: int | None = 512, obs_window: int = 32,
                draft_cfg: ModelConfig | None = None,
                tree: TokenTree | None = None) -> drafts.SpecConfig:
  """The speculation settings of a named method.

  "magicdec" drafts a chain with the target itself (streaming or SnapKV prefix),
  "magicdec_draft" a chain with a draft model, "sequoia" a token ``tree`` with either
  (the draft model when ``draft_cfg`` is given).

  Raises:
    ValueError: an unknown method, gamma < 1 for a chain method, no tree for
      "sequoia", a draft model for "magicdec" or none for "magicdec_draft", and the
      budget checks of ``drafts.SpecConfig``.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r}; available methods: {', '.join(METHODS)}.")
  if method in ("autoregressive", "suffix", "ngram"):  # host drafts need no SpecConfig
    return drafts.SpecConfig(gamma=0)
  if method == "hybrid":  # host drafts + the MagicDec self-draft
    if draft_cfg is not None:
      raise ValueError("method='hybrid' pairs host drafts with the self-draft; it takes no"
                       " draft model.")
    method = "magicdec"
  if method == "magicdec" and draft_cfg is not None:
    raise ValueError("method='magicdec' drafts with the target itself; pass the draft"
                     " model with method='magicdec_draft' (or 'sequoia').")
  if method == "magicdec_draft" and draft_cfg is None:
    raise ValueError("method='magicdec_draft' needs a draft model (draft_model=...; e.g."
                     " specjax.drafts.truncated_draft(model, num_layers)).")
  common = dict(draft_kv=draft_kv, sinks=sinks, window=window, obs_window=obs_window,
                draft_cfg=draft_cfg)
  if method == "sequoia":
    if tree is None or tree.size < 2:
      raise ValueError("method='sequoia' needs a tree of at least 2 nodes (tree=...).")
    return drafts.SpecConfig(tree=tree, **common)
  if gamma < 1:
    raise ValueError(f"method={method!r} needs gamma >= 1; got {gamma}.")
  return drafts.SpecConfig(gamma=gamma, **common)


# ----------------------------------------------------------------------------------
# Public API.


def generate(model,
             prompts,
             *,
             max_new_tokens: int | Sequence[int] = 64,
             method: str = "autoregressive",
             temperature: float = 0.0,
             top_k: int = 0,
             top_p: float = 1.0,
             seed: int = 0,
             eos_ids: Sequence[int] | None = None,
             max_cache_len: int | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             gamma: int | str = 4,
             auto_gammas: Sequence[int] = AUTO_GAMMAS,
             draft_kv: str = "streaming",
             sinks: int = 16,
             window: int | None = 512,
             obs_window: int = 32,
             draft_model=None,
             tree: int | str | TokenTree = 16,
             tree_depth: int = 8,
             acceptance: Sequence[float] | None = None,
             proposer=None,
             hybrid_threshold: float | None = None,
             host_sizing: str = "auto",
             max_draft: int = 31,
             attention_impl: str | None = None,
             compact_batch: bool = True,
             mesh=None) -> GenerateOutput:
  """Generate continuations for a batch of prompts.

  Args:
    model: a ``specjax.Model`` (config, params, tokenizer).
    prompts: a string, a list of token ids, or a batch (list) of either.
    max_new_tokens: tokens to generate per row (an int, or one per row); a row stops
      earlier at an EOS token.
    method: the decoding method; see ``specjax.engine.METHODS``.
    temperature, top_k, top_p: sampling; temperature 0 is greedy.
    seed: PRNG seed for sampling.
    eos_ids: stop tokens (default: the config's ``eos_ids``; ``()`` disables stopping).
    max_cache_len: cap on cache slots per row; a prompt that does not fit with its new
      tokens raises ValueError instead of being truncated.
    prefill_chunk: tokens per prefill step.
    gamma: drafted tokens per round (speculative methods), or "auto": the cost model
      (``specjax.cost_model``), calibrated on this machine for the batch and each
      context bucket, chooses among ``auto_gammas`` per bucket from the timings and
      the acceptance rate measured so far, switching as rows grow.
    auto_gammas: the choices for ``gamma="auto"`` (0 = autoregressive; not used with a
      draft model, whose ring must follow every round).
    draft_kv: the self-speculation draft's view of the prefix: "streaming" (sinks +
      recent window) or "snapkv" (positions selected at prefill + recent window).
    sinks, window: the draft's prefix budget: ``window`` positions in all, the first
      ``sinks`` of the sequence plus the most recent ``window - sinks`` (streaming and
      draft models), or ``window - obs_window`` selected (sinks included) plus the
      ``obs_window`` most recent (snapkv). ``window=None`` gives a draft model a full
      cache (plain speculative decoding).
    obs_window: SnapKV's observation window (the last prompt tokens whose attention
      scores the prefix).
    draft_model: the draft for ``method="magicdec_draft"`` (and optionally
      "sequoia"): a ``specjax.Model`` with the target's vocabulary (e.g.
      ``specjax.drafts.truncated_draft(model, k)``).
    tree: ``method="sequoia"``: a ``specjax.tree.TokenTree``; a size n (root
      included) for Sequoia's optimal tree of depth <= ``tree_depth`` under
      ``acceptance`` (``specjax.sequoia.optimal_tree``); or "auto": the cost model
      chooses per context bucket among the optimal trees of ``engine.auto_trees``
      (sizes 4..64, depth limits up to ``tree_depth``) and plain decoding, refitting
      the acceptance as it measures it.
    acceptance: the positional acceptance vector for optimal trees (measure one with
      ``python -m experiments.acceptance``); default ``sequoia.DEFAULT_ACCEPTANCE``.
    proposer: ``method="suffix"`` / ``"hybrid"``: a ``specjax.suffix_index.SuffixDecoder``
      to draft from; pass the same one to successive calls so that its global index
      keeps the outputs of earlier requests (default: a fresh one). ``"ngram"``: a
      ``specjax.ngram.NgramProposer`` (default: a fresh one).
    hybrid_threshold: ``method="hybrid"``: a row takes its suffix draft in a round
      when the draft's calibrated score (expected accepted tokens) is at least this,
      and the MagicDec self-draft chain of ``gamma`` otherwise; None (default)
      compares it with the self-draft's accepted tokens per round measured so far,
      and (``host_sizing="auto"``) skips the self-draft in rounds where the cost model
      expects it not to pay for its draft forwards.
    host_sizing: host-drafted methods: "auto" verifies each round at the compiled
      size (``engine.HOST_TREE_SIZES``) with the most expected tokens per second (the
      acceptance per draft depth and the round times measured so far, the calibrated
      cost model until then), truncating longer drafts; "longest"
      at the smallest size holding every row's whole draft.
    max_draft: host-drafted methods: drafted tokens per row per round at most.
    attention_impl: "auto" (the Pallas kernel on GPU/TPU, XLA on CPU), "pallas" (the
      kernel everywhere; interpreted on CPU) or "xla"; None keeps the model config's
      (``ModelConfig.attention_impl``). Applies to the draft model too.
    compact_batch: as rows finish (EOS, their budgets, or speculation that runs ahead
      for some rows), drop them from the batch: once the rows still generating fit
      half the batch (``engine.batch_buckets``; not below ``MIN_COMPACT_BATCH`` rows),
      the decode state is gathered to them and decoding goes on at the smaller batch.
      Off: every round runs the full batch.
    mesh: a ("data", "model") mesh to shard params, cache and batch over (optional).

  Returns:
    GenerateOutput with per-row generated ids, decoded texts and timings.
  """
  if attention_impl is not None:
    model = dataclasses.replace(model, config=dataclasses.replace(
        model.config, attention_impl=attention_impl))
    if draft_model is not None:
      draft_model = dataclasses.replace(draft_model, config=dataclasses.replace(
          draft_model.config, attention_impl=attention_impl))
  host = method in HOST_METHODS
  if proposer is not None and not host:
    raise ValueError(f"proposer is used by methods {HOST_METHODS}; got method={method!r}.")
  if host:
    if gamma == "auto":
      raise ValueError(f"method={method!r} takes an int gamma (the hybrid's self-draft).")
    if proposer is None:
      proposer = (ngram_lib.NgramProposer() if method == "ngram" else
                  suffix_index.SuffixDecoder())
  if draft_model is not None and method not in ("magicdec_draft", "sequoia"):
    raise ValueError(f"draft_model is only used by method='magicdec_draft' or 'sequoia';"
                     f" got method={method!r}.")
  acceptance = tuple(sequoia.DEFAULT_ACCEPTANCE if acceptance is None else acceptance)
  auto = None
  if method == "sequoia" and tree == "auto":
    auto = auto_trees(acceptance, max_depth=tree_depth)
    tree = max(auto, key=lambda t: t.size)
  elif method == "sequoia" and not isinstance(tree, TokenTree):
    tree = sequoia.optimal_tree(int(tree), tree_depth, acceptance)
  if gamma == "auto":
    if method in ("autoregressive", "sequoia"):
      raise ValueError(f"gamma='auto' chooses a chain length; method={method!r} has none"
                       " (sequoia drafts tree=..., or tree='auto').")
    auto = tuple(TokenTree.chain(g) for g in auto_gammas)
    acceptance = (0.7,)  # a chain's vector is its acceptance rate alone
  elif not isinstance(gamma, (int, np.integer)):
    raise ValueError(f"gamma={gamma!r}; pass an int or 'auto'.")
  spec = spec_config(method, gamma=max(auto_gammas, default=0) if gamma == "auto" else gamma,
                     draft_kv=draft_kv, sinks=sinks, window=window, obs_window=obs_window,
                     draft_cfg=None if draft_model is None else draft_model.config,
                     tree=tree if method == "sequoia" else None)
  cfg: ModelConfig = model.config
  drafts.check(spec, cfg, None if draft_model is None else draft_model.params)
  sp = sampling.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
  tokenizer = getattr(model, "tokenizer", None)
  ids = encode_prompts(prompts, cfg, tokenizer)
  B = len(ids)
  max_new = per_row(max_new_tokens, B, "max_new_tokens")
  # No scratch for drafts: a row that keeps generating after a round has committed
  # fewer than prompt + max_new - 1 tokens, and commits past the buffer by a row that
  # finishes in that round are dropped (commit scatters with mode="drop").
  size = plan_cache_size(cfg, [len(p) for p in ids], max_new, max_cache_len)
  n_dev = 1 if mesh is None else mesh.size
  chunk = prefill_chunk_size(prefill_chunk, max(len(p) for p in ids))
  memory.check_fits(cfg, B, size, chunk, num_devices=n_dev)
  draft_params = None
  if draft_model is not None:  # its prefill cache is full-size before the ring is cut
    memory.check_fits(draft_model.config, B, size, chunk,
                      num_devices=n_dev)
    draft_params = draft_model.params if mesh is None else sharding_lib.shard_params(
        draft_model.params, draft_model.config, mesh)
  eos = tuple(cfg.eos_ids if eos_ids is None else eos_ids)

  params, cache = _place(model, B, size, mesh)
  # Compile first so the prefill timing is of the run alone.
  t0 = time.perf_counter()
  cache, first_logits, compile_prefill = prefill(params, cfg, cache, ids, chunk=prefill_chunk,
                                                 mesh=mesh)
  jax.block_until_ready(first_logits)
  prefill_s = time.perf_counter() - t0 - compile_prefill
  key_first, key_decode = jax.random.split(jax.random.key(seed))
  first = sampling.sample(key_first, first_logits, sp)
  host_stats = None
  if host:
    res, host_stats = decode_host(params, cfg, cache, first, max_new=max_new,
                                  proposer=proposer, prompts=ids, sp=sp,
                                  spec=spec if method == "hybrid" else None,
                                  threshold=hybrid_threshold, max_draft=max_draft,
                                  sizing=host_sizing, key=key_decode, eos_ids=eos, mesh=mesh,
                                  compact_batch=compact_batch)
  else:
    res = decode(params, cfg, cache, first, max_new=max_new, sp=sp, spec=spec,
                 key=key_decode, eos_ids=eos, mesh=mesh, prompts=ids,
                 draft_params=draft_params, auto=auto, acceptance=acceptance,
                 compact_batch=compact_batch)
  out, num = res.tokens, res.num
  tokens = [out[b, :num[b]].tolist() for b in range(B)]
  texts = None
  if tokenizer is not None:
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
  stats = GenerateStats(batch=B, prompt_tokens=int(sum(len(p) for p in ids)),
                        new_tokens=int(num.sum()), cache_size=size,
                        compile_s=compile_prefill + res.compile_s,
                        prefill_s=prefill_s + res.draft_init_s,
                        decode_s=res.run_s, decode_steps=res.steps,
                        tokens_per_round=res.tokens_per_round, segments=res.segments,
                        calibrate_s=res.calibrate_s, host=host_stats,
                        compactions=res.compactions)
  return GenerateOutput(tokens=tokens, texts=texts, stats=stats)


def logits(model, token_ids, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, mesh=None):
  """Full-vocabulary logits at every position, for parity checks.

  Args:
    token_ids: one id list (-> f32[T, V]) or a batch of id lists (-> list of f32[T_b, V]).
  """
  single = is_single_prompt(token_ids)
  cfg = model.config
  ids = encode_prompts(token_ids, cfg, None)
  lens = [len(p) for p in ids]
  size = plan_cache_size(cfg, lens, np.ones(len(ids), np.int32), None)
  params, cache = _place(model, len(ids), size, mesh)
  _, out, _ = prefill(params, cfg, cache, ids, chunk=prefill_chunk, mesh=mesh,
                      all_logits=True)
  out = np.asarray(out)
  rows = [out[b, :n] for b, n in enumerate(lens)]
  return rows[0] if single else rows
