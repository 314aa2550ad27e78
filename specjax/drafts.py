"""Draft proposers for chain speculation.

MagicDec (Chen et al. 2024, arXiv 2408.11049) observes that at large batch x long
context a decode step is bound by reading the KV cache, so a draft that reads a small
*fixed* KV budget is cheap while the target verifies gamma + 1 tokens for about the
price of one step. Three drafts share one interface (:func:`init_state` after
prefill, :func:`propose` each round, :func:`after_verify` once the target committed):

* **Self-speculation, streaming** (``draft_kv="streaming"``): the target model itself
  reading only ``sinks`` leading positions + the most recent positions of the
  **target's own cache** (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453), plus its
  own freshly drafted tokens. Nothing is copied or re-prefilled: the draft sees exact
  target KV, and after verification nothing needs repairing, because drafted keys
  never enter the cache (the verify pass computes the keys that
  :func:`specjax.kv_cache.commit` writes).
* **Self-speculation, SnapKV** (``draft_kv="snapkv"``; Li et al. 2024, arXiv
  2404.14469): once, after prefill, the last ``obs_window`` prompt queries score every
  earlier prompt position per layer and KV head; the draft keeps the top
  ``window - obs_window`` of them (the first ``sinks`` positions always among them)
  and reads those + the ``obs_window`` most recent positions of the target cache.
  The selection is fixed; generated tokens enter through the recent part as in
  streaming.
* **A small draft model** (``SpecConfig.draft_cfg``, MagicDec's standalone draft):
  any Llama-family model with the target's vocabulary, with its **own** cache: a
  ring of sinks + window (:class:`specjax.kv_cache.RingCache`) that evicts the oldest
  positions so generations may be far longer than the window, or a full cache
  (``window=None``, plain speculative decoding).

Self-speculation draft step j (of gamma) feeds token x_j at position ``lengths + j``
and sees::

    target cache                        drafted this round (pending)   itself
    [sinks][ .. skipped .. ][recent]    x_0 .. x_{j-1}                 x_j
    [selected (SnapKV)]     [recent]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from specjax import kv_cache
from specjax import model as model_lib
from specjax import sampling
from specjax.attention import Window
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache, NewKV, RingCache
from specjax.params import check_params
from specjax.tree import TokenTree

DRAFT_KV_POLICIES = ("streaming", "snapkv")
# SnapKV's 1-D max-pool over positions: a chosen position brings its neighbours, which
# keeps the selection in contiguous pieces of text rather than isolated tokens.
SNAPKV_POOL = 7


@dataclasses.dataclass(frozen=True)
class SpecConfig:
  """How a round drafts (static under jit).

  Attributes:
    gamma: drafted tokens per round as a chain; 0 is plain autoregressive decoding.
    tree: draft a token tree of this shape instead of a chain (``gamma`` must then be
      0); ``shape`` is the tree a round drafts either way.
    draft_kv: the self-speculation draft's view of the prefix: "streaming" = sinks +
      recent window; "snapkv" = positions selected at prefill + recent window. A draft
      model always uses "streaming" (its ring cache).
    sinks: leading positions always kept (attention sinks).
    window: the draft's total prefix budget, sinks included (MagicDec's default 512);
      None only with a draft model: a full draft cache.
    obs_window: SnapKV's observation window: the last ``obs_window`` prompt tokens
      score the prefix, and stay the draft's recent part (``window - obs_window``
      positions are selected, the sinks among them).
    draft_cfg: the config of a separate draft model, or None for self-speculation.
  """

  gamma: int = 0
  draft_kv: str = "streaming"
  sinks: int = 16
  window: int | None = 512
  obs_window: int = 32
  draft_cfg: ModelConfig | None = None
  tree: TokenTree | None = None

  def __post_init__(self):
    if self.gamma < 0:
      raise ValueError(f"gamma={self.gamma} must be >= 0.")
    if self.tree is not None and self.gamma:
      raise ValueError(f"gamma={self.gamma} and a tree: a round drafts one or the other"
                       " (a chain of gamma drafts is TokenTree.chain(gamma)).")
    if self.draft_kv not in DRAFT_KV_POLICIES:
      raise ValueError(f"draft_kv={self.draft_kv!r}; available: {DRAFT_KV_POLICIES}.")
    if self.window is None:
      if self.draft_cfg is None:
        raise ValueError("window=None (a full draft cache) needs a draft model; the"
                         " self-speculation draft must read a smaller window.")
      return
    if not 0 <= self.sinks < self.window:
      raise ValueError(f"need 0 <= sinks ({self.sinks}) < window ({self.window}); the"
                       " window is the draft's whole prefix budget, sinks included.")
    if self.draft_cfg is not None:
      if self.draft_kv != "streaming":
        raise ValueError(f"draft_kv={self.draft_kv!r} with a draft model; its cache is a"
                         " sinks + window ring (draft_kv='streaming').")
      most = self.shape.max_depth + 1
      if self.speculative and self.window - self.sinks < most:
        raise ValueError(
            f"window={self.window} leaves {self.window - self.sinks} ring slots after"
            f" {self.sinks} sinks, fewer than the {most} tokens a round may append; use"
            f" window >= {self.sinks + most}.")
    elif self.draft_kv == "snapkv" and not (
        self.obs_window >= 1 and self.sinks + self.obs_window < self.window):
      raise ValueError(
          f"draft_kv='snapkv' keeps window - obs_window = {self.window - self.obs_window}"
          f" selected positions, sinks ({self.sinks}) included; need obs_window >= 1 and"
          f" window > sinks + obs_window ({self.sinks + self.obs_window}).")

  @property
  def shape(self) -> TokenTree:
    """The tree a round drafts: ``tree``, or the chain of ``gamma`` drafts."""
    return TokenTree.chain(self.gamma) if self.tree is None else self.tree

  @property
  def speculative(self) -> bool:
    """False for autoregressive decoding (a lone root: nothing drafted)."""
    return self.shape.size > 1

  @property
  def prefix_window(self) -> Window | None:
    """The sinks + recent window of the draft's prefix view (None: everything)."""
    if self.window is None:
      return None
    if self.draft_cfg is None and self.draft_kv == "snapkv":
      return Window(sinks=self.sinks, recent=self.obs_window)
    return Window(sinks=self.sinks, recent=self.window - self.sinks)

  @property
  def num_selected(self) -> int:
    """SnapKV: prefix positions chosen at prefill per layer and KV head."""
    return self.window - self.obs_window

  @property
  def prompt_tail(self) -> int:
    """How many trailing prompt tokens per row :func:`init_state` needs."""
    if self.draft_cfg is None and self.draft_kv == "snapkv":
      return self.obs_window
    return 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SnapKVState:
  """The SnapKV selection, fixed at prefill."""

  prefix_idx: jax.Array  # i32[L, B, K, window - obs_window]; -1 = unused entry


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftModelState:
  """A draft model's cache plus the hand-over between :func:`propose` and
  :func:`after_verify` of one round.

  Invariant between rounds: the ring holds the draft KV of every position below
  ``ring.lengths = target lengths - 1``; the last committed token (``last``, at
  position ``ring.lengths``) has none yet. The next round's first draft step feeds it
  together with the pending token, so a round that accepted every draft (whose last
  draft token the draft never ran) needs no special case.
  """

  ring: RingCache  # [Ld, B, Kd, R, Dd]
  last: jax.Array  # i32[B]
  round_kv: NewKV  # [Ld, B, 1 + n, Kd, Dd]: draft KV of last, then of tree node u at 1 + u
  round_tokens: jax.Array  # i32[B, n]: the round's tree, node 0 = the pending token


def check(spec: SpecConfig, cfg: ModelConfig, draft_params) -> None:
  """Validate a speculation setting against the target at the public boundary.

  Raises:
    ValueError: a draft model without params (or params without a draft model), a
      draft vocabulary different from the target's, or params not matching the
      draft config.
  """
  if spec.draft_cfg is None:
    if draft_params is not None:
      raise ValueError("draft params were given but the method drafts with the target"
                       " itself; use method='magicdec_draft' for a draft model.")
    return
  if draft_params is None:
    raise ValueError("a draft-model method needs the draft's params (draft_model=...).")
  if spec.draft_cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"the draft model's vocab_size ({spec.draft_cfg.vocab_size}) differs"
                     f" from the target's ({cfg.vocab_size}); speculation compares their"
                     " distributions token by token, so they must share one vocabulary.")
  check_params(spec.draft_cfg, draft_params)


def truncated_draft(model, num_layers: int):
  """A draft made of the target's first ``num_layers`` blocks + its final norm and head.

  For tests and benchmarks without a trained draft model: it shares the target's
  vocabulary and weights (no copy), is ``num_layers / L`` of the target's cost per
  token, and agrees with the target often enough to measure acceptance. A real
  deployment would pass a separately trained small model instead.

  Args:
    model: a ``specjax.Model`` (any object with ``config`` and ``params`` fields).
    num_layers: blocks to keep, 1 <= num_layers <= the target's.

  Returns:
    The same kind of object with the truncated config and params.
  """
  cfg = model.config
  if not 1 <= num_layers <= cfg.num_layers:
    raise ValueError(f"num_layers={num_layers} must be in [1, {cfg.num_layers}] (the"
                     " target's layers).")
  layers = jax.tree.map(lambda x: x[:num_layers], model.params.layers)
  params = dataclasses.replace(model.params, layers=layers)
  draft_cfg = cfg.replace(num_layers=num_layers, name=f"{cfg.name}-first{num_layers}")
  return dataclasses.replace(model, config=draft_cfg, params=params)


def prompt_tails(prompts: list[list[int]], width: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Each row's last ``min(width, len)`` prompt tokens, left-aligned and padded.

  Returns:
    tokens i32[B, width] and n i32[B], the real tokens per row.
  """
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  n = np.array([min(width, len(p)) for p in prompts], np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :n[b]] = p[len(p) - n[b]:]
  return tokens, n


def init_state(spec: SpecConfig, params, cfg: ModelConfig, cache: KVCache,
               tail: jax.Array, tail_n: jax.Array, draft_prefill: KVCache | None = None):
  """Per-policy draft state after prefill (a pytree carried through the decode loop).

  Args:
    cache: the target's prefilled cache (row b holds its prompt in ``[0, lengths[b])``).
    tail, tail_n: i32[B, spec.prompt_tail] each row's last prompt tokens and how many
      are real (:func:`prompt_tails`).
    draft_prefill: a draft model's linear cache prefilled over the same prompts.

  Returns:
    None for streaming (its view derives from ``lengths``), a SnapKVState, or a
    DraftModelState.
  """
  if spec.draft_cfg is not None:
    return _draft_model_state(spec, draft_prefill, cache.lengths,
                              jnp.take_along_axis(tail, tail_n[:, None] - 1, axis=1)[:, 0])
  if spec.draft_kv == "snapkv":
    view = KVCache(k=cache.k, v=cache.v, lengths=cache.lengths - tail_n)
    queries = jnp.arange(tail.shape[1])[None, :] < tail_n[:, None]
    scores = model_lib.prefix_scores(params, cfg, tail, view, queries)
    return SnapKVState(prefix_idx=snapkv_select(scores, cache.lengths, spec))
  return None


def snapkv_select(scores: jax.Array,  # f32[L, B, K, S]
                  lengths: jax.Array,  # i32[B]
                  spec: SpecConfig,
                  ) -> jax.Array:  # i32[L, B, K, window - obs_window]
  """SnapKV's choice of prefix positions from the observation window's scores.

  Candidates are the positions before each row's observation window,
  ``[0, lengths[b] - obs_window)``: the window itself is the draft's recent part. The
  scores (attention summed over the window's queries and each KV head's query heads)
  are max-pooled over positions (kernel ``SNAPKV_POOL``) and the top
  ``window - obs_window`` candidates kept. The first ``sinks`` positions are always
  kept (StreamingLLM's attention sinks are counted in the selection, not added to
  it), also those a short prompt has not reached yet: attention reads a kept position
  only once it is below the row's current length. Rows with fewer candidates pad
  with -1.

  Returns:
    Kept positions per layer, row and KV head, ascending, -1 (unused) first.
  """
  n_keep = spec.num_selected
  S = scores.shape[-1]
  slot = jnp.arange(S)[None, :]  # [1, S]
  candidate = (slot < (lengths - spec.obs_window)[:, None])[:, None]  # [B, 1, S]
  # Masked before pooling too: a non-candidate's score must not lift its neighbours.
  pooled = jax.lax.reduce_window(jnp.where(candidate, scores, -jnp.inf), -jnp.inf,
                                 jax.lax.max, (1, 1, 1, SNAPKV_POOL), (1, 1, 1, 1),
                                 [(0, 0)] * 3 + [(SNAPKV_POOL // 2, SNAPKV_POOL // 2)])
  # Sinks are kept even where a short prompt has not reached them yet: the recent
  # part never reads below ``sinks``, so a generated token there has no other way in.
  priority = jnp.where(slot[:, None] < spec.sinks, jnp.inf,
                       jnp.where(candidate, pooled, -jnp.inf))
  if S < n_keep:  # a cache shorter than the budget: everything fits, pad the rest
    priority = jnp.pad(priority, [(0, 0)] * 3 + [(0, n_keep - S)],
                       constant_values=-jnp.inf)
  top, idx = jax.lax.top_k(priority, n_keep)
  return jnp.sort(jnp.where(top > -jnp.inf, idx, -1), axis=-1).astype(jnp.int32)


def _draft_model_state(spec: SpecConfig, prefill: KVCache, lengths: jax.Array,
                       last: jax.Array) -> DraftModelState:
  """The draft's ring after prefill: every prompt position but the last (see the
  DraftModelState invariant), sinks + the latest window of them."""
  size = prefill.size if spec.window is None else spec.window
  ring = kv_cache.ring_from_cache(prefill, lengths - 1, _ring_sinks(spec), size)
  return _with_round_buffers(DraftModelState(ring=ring, last=last.astype(jnp.int32),
                                             round_kv=None, round_tokens=None), spec)


def for_round(state, spec: SpecConfig):
  """The draft state for rounds of ``spec.shape`` (``gamma="auto"`` and adaptive trees
  change it between rounds). Only a draft model's round buffers have a shape that
  depends on the tree; they hold nothing between rounds (see DraftModelState), so they
  are simply reallocated."""
  if not isinstance(state, DraftModelState) or \
      state.round_tokens.shape[1] == spec.shape.size:
    return state
  return _with_round_buffers(state, spec)



def take_rows(state, rows: jax.Array):
  """The draft state of rows ``rows`` (i32[B']) in that order (batch compaction);
  None (the streaming self-draft, whose view derives from the target's lengths) stays
  None."""
  if state is None:
    return None
  if isinstance(state, SnapKVState):
    return SnapKVState(prefix_idx=state.prefix_idx[:, rows])
  if isinstance(state, DraftModelState):
    return DraftModelState(ring=kv_cache.take_rows(state.ring, rows), last=state.last[rows],
                           round_kv=NewKV(k=state.round_kv.k[:, rows],
                                          v=state.round_kv.v[:, rows]),
                           round_tokens=state.round_tokens[rows])
  raise TypeError(f"unknown draft state {type(state).__name__}.")

def _with_round_buffers(state: DraftModelState, spec: SpecConfig) -> DraftModelState:
  dcfg, n = spec.draft_cfg, spec.shape.size
  B = state.last.shape[0]
  shape = (dcfg.num_layers, B, 1 + n, dcfg.num_kv_heads, dcfg.head_dim)
  dtype = state.ring.k.dtype
  return dataclasses.replace(state, round_kv=NewKV(k=jnp.zeros(shape, dtype),
                                                   v=jnp.zeros(shape, dtype)),
                             round_tokens=jnp.zeros((B, n), jnp.int32))


def _ring_sinks(spec: SpecConfig) -> int:
  return 0 if spec.window is None else spec.sinks


def propose(params, cfg: ModelConfig, cache: KVCache, state, pending: jax.Array,
            key: jax.Array, spec: SpecConfig, sp: sampling.SamplingParams,
            draft_params=None):
  """Draft a tree of shape ``spec.shape`` (a chain is a one-branch tree) rooted at
  each row's pending token.

  Args:
    params, cfg, cache: the target's (self-speculation reads them).
    state: the draft state (:func:`init_state`).
    pending: i32[B] each row's accepted token not yet in the target cache: the root.
    draft_params: the draft model's weights (draft-model methods only).

  Returns:
    tokens i32[B, n] (node 0 = pending), q f32[B, n, V] the draft distribution each
    node's children were drawn from (zeros at leaves), and the draft state.
  """
  if spec.draft_cfg is not None:
    return draft_model(draft_params, state, pending, key, spec, sp)
  prefix_idx = state.prefix_idx if spec.draft_kv == "snapkv" else None
  tokens, q = draft_self(params, cfg, cache, pending, key, spec, sp, prefix_idx=prefix_idx)
  return tokens, q, state


def after_verify(state, spec: SpecConfig, cache: KVCache, n_kept: jax.Array,
                 path: jax.Array):
  """Update the draft state once the target committed ``n_kept[b]`` tokens per row (0
  for rows that have stopped): the pending token and the accepted drafts, the tree
  nodes ``path[b, :n_kept[b]]``."""
  del cache
  if spec.draft_cfg is None:
    return state
  # The accepted inputs last, root, path[1], .. sit at positions ring.lengths + i:
  # keeping the first n_kept of them leaves the new last committed token (path
  # node n_kept - 1) without draft KV again.
  path = jnp.maximum(path, 0)
  slots = jnp.concatenate([jnp.zeros_like(path[:, :1]), 1 + path], axis=1)  # [B, D + 2]
  kept = jax.tree.map(lambda x: jax.vmap(lambda r, s: jnp.take(r, s, axis=1), (1, 0), 1)(
      x, slots), state.round_kv)
  ring = kv_cache.ring_commit(state.ring, kept, n_kept, _ring_sinks(spec))
  path_tokens = jnp.take_along_axis(state.round_tokens, path, axis=1)
  new_last = jnp.take_along_axis(path_tokens, jnp.maximum(n_kept - 1, 0)[:, None],
                                 axis=1)[:, 0]
  return dataclasses.replace(state, ring=ring,
                             last=jnp.where(n_kept > 0, new_last, state.last))


def rank_children(key: jax.Array, logits: jax.Array, q: jax.Array, k: int,
              sp: sampling.SamplingParams) -> jax.Array:
  """i32[B, W, k]: each node's k children in rank order: the draft's k most likely
  tokens when greedy, k samples without replacement from q otherwise (Sequoia)."""
  if sp.greedy:
    return jax.lax.top_k(logits, k)[1].astype(jnp.int32)
  return sampling.sample_without_replacement(key, q, k)


def _grow(tree: TokenTree, tokens, q_nodes, nodes, logits, key, sp):
  """Record the draft distribution at ``nodes`` (i32[W], -1 = padding) and propose
  their children. tokens i32[B, n], q_nodes f32[B, n, V]; logits f32[B, W, V]."""
  n = tree.size
  q = sampling.probabilities(logits, sp)
  at = jnp.where(nodes >= 0, nodes, n)  # padding writes are dropped
  q_nodes = q_nodes.at[:, at].set(q, mode="drop")
  kids = jnp.asarray(tree.child_table)[jnp.maximum(nodes, 0)]  # [W, K]
  kids = jnp.where((nodes >= 0)[:, None] & (kids >= 0), kids, n)
  cand = rank_children(key, logits, q, tree.max_children, sp)  # [B, W, K]
  tokens = tokens.at[:, kids].set(cand, mode="drop")
  return tokens, q_nodes


def _level_masks(tree: TokenTree, first_slot: int, n_slots: int) -> np.ndarray:
  """bool[D, W, n_slots + W]: for drafting level d, which round-buffer slots (node u
  at ``first_slot + u``; slots below ``first_slot`` always visible) and which of the
  level's own W tokens each of its tokens sees: its ancestors, and itself."""
  table = tree.expand_table
  D, W = table.shape
  masks = np.zeros((D, W, n_slots + W), bool)
  masks[:, :, :first_slot] = True
  for d in range(D):
    for w, u in enumerate(table[d]):
      if u >= 0:
        masks[d, w, first_slot:first_slot + tree.size] = tree.ancestor_mask[u]
        masks[d, w, first_slot + u] = False  # itself: among the new tokens
      masks[d, w, n_slots + w] = True
  return masks


def _draft_levels(run, tree: TokenTree, tokens, q_nodes, buf, key, sp, first_slot: int,
                  first_level: int, offset: int):
  """Levels ``first_level..max_depth - 1`` of tree drafting, one draft forward each
  over the level's expanding nodes (``lax.scan``: equal shapes at every level).

  Args:
    run: (tokens i32[B, W], offsets i32[W], new_mask, pending NewKV) ->
      (logits f32[B, W, V], NewKV of the W tokens).
    buf: the round buffer (pending KV), node u at slot ``first_slot + u``.
    offset: position offset of depth 0 (relative to the cache's lengths).
  """
  table = tree.expand_table
  D, W = table.shape
  if first_level >= D:
    return tokens, q_nodes, buf
  n_slots = buf.k.shape[2]
  masks = jnp.asarray(_level_masks(tree, first_slot, n_slots))

  def level(carry, d):
    tokens, q_nodes, buf, key = carry
    nodes = jnp.asarray(table)[d]  # [W]
    inputs = jnp.take(tokens, jnp.maximum(nodes, 0), axis=1)
    logits, new = run(inputs, jnp.full((W,), offset, jnp.int32) + d, masks[d], buf)
    slots = jnp.where(nodes >= 0, first_slot + nodes, n_slots)
    buf = jax.tree.map(lambda b, x: b.at[:, :, slots].set(x, mode="drop"), buf, new)
    key, sub = jax.random.split(key)
    tokens, q_nodes = _grow(tree, tokens, q_nodes, nodes, logits, sub, sp)
    return (tokens, q_nodes, buf, key), None

  (tokens, q_nodes, buf, _), _ = jax.lax.scan(level, (tokens, q_nodes, buf, key),
                                              jnp.arange(first_level, D))
  return tokens, q_nodes, buf


def _empty_round(first: jax.Array, n: int, vocab: int):
  tokens = jnp.zeros((first.shape[0], n), jnp.int32).at[:, 0].set(first)
  return tokens, jnp.zeros((first.shape[0], n, vocab), jnp.float32)


def draft_self(params, cfg: ModelConfig, cache: KVCache, first: jax.Array, key: jax.Array,
               spec: SpecConfig, sp: sampling.SamplingParams,
               prefix_idx: jax.Array | None = None,
               ) -> tuple[jax.Array, jax.Array]:
  """Self-speculation: the target over a sparse prefix drafts the tree level by level.

  Level d runs the expanding nodes at depth d at positions ``lengths + d``; they see
  the sparse prefix, their ancestors' draft KV (the round buffer, ``pending``) and
  themselves::

    target cache                        round buffer (node u at slot u)   itself
    [sinks][ .. skipped .. ][recent]    ancestors of the node             node
    [selected (SnapKV)]     [recent]

  Args:
    first: i32[B] the pending token (accepted, not yet in the cache): the root.
    prefix_idx: i32[L, B, K, n] SnapKV's kept positions, or None for streaming.

  Returns:
    tokens i32[B, n] and q f32[B, n, V] (see :func:`propose`).
  """
  tree = spec.shape
  B, n = first.shape[0], tree.size
  shape = (cfg.num_layers, B, n, cfg.num_kv_heads, cfg.head_dim)
  buf = NewKV(k=jnp.zeros(shape, cache.k.dtype), v=jnp.zeros(shape, cache.v.dtype))
  run = lambda tokens, offsets, mask, pending: model_lib.forward(
      params, cfg, tokens, cache, offsets=offsets, new_mask=mask,
      window=spec.prefix_window, prefix_idx=prefix_idx, pending=pending)
  tokens, q_nodes = _empty_round(first, n, cfg.vocab_size)
  tokens, q_nodes, _ = _draft_levels(run, tree, tokens, q_nodes, buf, key, sp,
                                     first_slot=0, first_level=0, offset=0)
  return tokens, q_nodes


def draft_model(draft_params, state: DraftModelState, first: jax.Array, key: jax.Array,
                spec: SpecConfig, sp: sampling.SamplingParams
                ) -> tuple[jax.Array, jax.Array, DraftModelState]:
  """A separate draft model drafts the tree level by level over its own ring cache.

  The first forward feeds two tokens, the last committed one (whose draft KV is
  missing, see DraftModelState) and the root (the pending token); level d >= 1 feeds
  its expanding nodes. The ring is only read: the round's draft KV waits in
  ``round_kv`` until :func:`after_verify` knows which path the target accepted, so
  rejected drafts never evict anything::

    ring (sinks + window)       round_kv (last, then node u at slot 1 + u)   itself
    positions < lengths         last + the node's ancestors                  node

  Returns:
    tokens i32[B, n], q f32[B, n, V] (see :func:`propose`), and the state with this
    round's KV and tokens.
  """
  dcfg, tree = spec.draft_cfg, spec.shape
  ring = state.ring
  B, n = first.shape[0], tree.size
  view = ring.as_kv_cache()
  run = lambda tokens, offsets, mask, pending: model_lib.forward(
      draft_params, dcfg, tokens, view, window=spec.prefix_window, slot_pos=ring.pos,
      offsets=offsets, new_mask=mask, pending=pending)
  logits, new = model_lib.forward(draft_params, dcfg, jnp.stack([state.last, first], axis=1),
                                  view, window=spec.prefix_window, slot_pos=ring.pos,
                                  logits_at=jnp.ones((B, 1), jnp.int32))
  buf = jax.tree.map(lambda z, x: jax.lax.dynamic_update_slice_in_dim(z, x, 0, axis=2),
                     state.round_kv, new)
  tokens, q_nodes = _empty_round(first, n, dcfg.vocab_size)
  key, sub = jax.random.split(key)
  tokens, q_nodes = _grow(tree, tokens, q_nodes, jnp.zeros((1,), jnp.int32), logits, sub, sp)
  tokens, q_nodes, buf = _draft_levels(run, tree, tokens, q_nodes, buf, key, sp,
                                       first_slot=1, first_level=1, offset=1)
  return tokens, q_nodes, dataclasses.replace(state, round_kv=buf, round_tokens=tokens)
