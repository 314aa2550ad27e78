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

DRAFT_KV_POLICIES = ("streaming", "snapkv")
# SnapKV's 1-D max-pool over positions: a chosen position brings its neighbours, which
# keeps the selection in contiguous pieces of text rather than isolated tokens.
SNAPKV_POOL = 7


@dataclasses.dataclass(frozen=True)
class SpecConfig:
  """How a round drafts (static under jit).

  Attributes:
    gamma: drafted tokens per round; 0 is plain autoregressive decoding.
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

  def __post_init__(self):
    if self.gamma < 0:
      raise ValueError(f"gamma={self.gamma} must be >= 0.")
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
      if self.gamma and self.window - self.sinks < self.gamma + 1:
        raise ValueError(
            f"window={self.window} leaves {self.window - self.sinks} ring slots after"
            f" {self.sinks} sinks, fewer than the gamma + 1 = {self.gamma + 1} tokens a"
            f" round appends; use window >= sinks + gamma + 1 = "
            f"{self.sinks + self.gamma + 1}.")
    elif self.draft_kv == "snapkv" and not (
        self.obs_window >= 1 and self.sinks + self.obs_window < self.window):
      raise ValueError(
          f"draft_kv='snapkv' keeps window - obs_window = {self.window - self.obs_window}"
          f" selected positions, sinks ({self.sinks}) included; need obs_window >= 1 and"
          f" window > sinks + obs_window ({self.sinks + self.obs_window}).")

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
  round_kv: NewKV  # [Ld, B, gamma + 1, Kd, Dd]: draft KV of last, x_0, d_1..d_{gamma-1}
  round_tokens: jax.Array  # i32[B, gamma + 1]: x_0, d_1..d_gamma (positions lengths + i)


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
  dcfg = spec.draft_cfg
  size = prefill.size if spec.window is None else spec.window
  ring = kv_cache.ring_from_cache(prefill, lengths - 1, _ring_sinks(spec), size)
  B, G = lengths.shape[0], spec.gamma
  shape = (dcfg.num_layers, B, G + 1, dcfg.num_kv_heads, dcfg.head_dim)
  return DraftModelState(
      ring=ring, last=last.astype(jnp.int32),
      round_kv=NewKV(k=jnp.zeros(shape, prefill.k.dtype), v=jnp.zeros(shape, prefill.v.dtype)),
      round_tokens=jnp.zeros((B, G + 1), jnp.int32))


def for_gamma(state, spec: SpecConfig):
  """The draft state for rounds of ``spec.gamma`` drafts (``gamma="auto"`` changes it
  between rounds). Only a draft model's round buffers have a gamma-sized shape; they
  hold nothing between rounds (see DraftModelState), so they are simply reallocated."""
  if not isinstance(state, DraftModelState) or state.round_tokens.shape[1] == spec.gamma + 1:
    return state
  Ld, B, _, Kd, Dd = state.round_kv.k.shape
  shape = (Ld, B, spec.gamma + 1, Kd, Dd)
  return dataclasses.replace(
      state, round_kv=NewKV(k=jnp.zeros(shape, state.round_kv.k.dtype),
                            v=jnp.zeros(shape, state.round_kv.v.dtype)),
      round_tokens=jnp.zeros((B, spec.gamma + 1), jnp.int32))


def _ring_sinks(spec: SpecConfig) -> int:
  return 0 if spec.window is None else spec.sinks


def propose(params, cfg: ModelConfig, cache: KVCache, state, pending: jax.Array,
            key: jax.Array, spec: SpecConfig, sp: sampling.SamplingParams,
            draft_params=None):
  """Draft ``spec.gamma`` tokens after each row's pending token.

  Args:
    params, cfg, cache: the target's (self-speculation reads them).
    state: the draft state (:func:`init_state`).
    pending: i32[B] each row's accepted token not yet in the target cache.
    draft_params: the draft model's weights (draft-model methods only).

  Returns:
    drafts i32[B, gamma], their distributions f32[B, gamma, V], and the draft state.
  """
  if spec.draft_cfg is not None:
    return draft_model(draft_params, state, pending, key, spec, sp)
  prefix_idx = state.prefix_idx if spec.draft_kv == "snapkv" else None
  drafted, q = draft_self(params, cfg, cache, pending, key, spec, sp, prefix_idx=prefix_idx)
  return drafted, q, state


def after_verify(state, spec: SpecConfig, cache: KVCache, n_kept: jax.Array):
  """Update the draft state once the target committed ``n_kept[b]`` tokens per row
  (0 for rows that have stopped)."""
  del cache
  if spec.draft_cfg is None:
    return state
  # The round's inputs last, x_0, d_1.. sit at positions ring.lengths + i: keeping the
  # first n_kept of them leaves the new last committed token without draft KV again.
  ring = kv_cache.ring_commit(state.ring, state.round_kv, n_kept, _ring_sinks(spec))
  new_last = jnp.take_along_axis(state.round_tokens, jnp.maximum(n_kept - 1, 0)[:, None],
                                 axis=1)[:, 0]
  return dataclasses.replace(state, ring=ring,
                             last=jnp.where(n_kept > 0, new_last, state.last))


def _draw(key: jax.Array, logits: jax.Array, sp: sampling.SamplingParams):
  """One draft token per row and the distribution it came from (f32[B, V])."""
  q = sampling.probabilities(logits, sp)
  return jax.random.categorical(key, jnp.log(q), axis=-1).astype(jnp.int32), q


def draft_self(params, cfg: ModelConfig, cache: KVCache, first: jax.Array, key: jax.Array,
               spec: SpecConfig, sp: sampling.SamplingParams,
               prefix_idx: jax.Array | None = None,
               ) -> tuple[jax.Array, jax.Array]:
  """Self-speculation: gamma draft steps of the target over a sparse prefix.

  Args:
    first: i32[B] the pending token (accepted, not yet in the cache): draft input x_0.
    prefix_idx: i32[L, B, K, n] SnapKV's kept positions, or None for streaming.

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
                                    window=spec.prefix_window, prefix_idx=prefix_idx,
                                    pending=pending)
    pending = NewKV(k=jax.lax.dynamic_update_slice_in_dim(pending.k, new.k, j, axis=2),
                    v=jax.lax.dynamic_update_slice_in_dim(pending.v, new.v, j, axis=2))
    key, sub = jax.random.split(key)
    d, q = _draw(sub, logits[:, 0], sp)
    return (d, pending, key), (d, q)

  _, (drafts, q) = jax.lax.scan(step, (first, pending, key), jnp.arange(G))
  return drafts.T, jnp.swapaxes(q, 0, 1)


def draft_model(draft_params, state: DraftModelState, first: jax.Array, key: jax.Array,
                spec: SpecConfig, sp: sampling.SamplingParams
                ) -> tuple[jax.Array, jax.Array, DraftModelState]:
  """A separate draft model: gamma steps over its own ring cache.

  Step 0 feeds two tokens, the last committed one (whose draft KV is missing, see
  DraftModelState) and the pending one x_0; step j >= 1 feeds d_j. The ring is only
  read: the round's draft KV waits in ``round_kv`` until :func:`after_verify` knows
  how much of it the target accepted, so rejected drafts never evict anything::

    ring (sinks + window)       round_kv (pending)          itself
    positions < lengths         last, x_0, d_1..d_{j-1}     d_j

  Returns:
    drafts i32[B, gamma], their distributions f32[B, gamma, V], and the state with
    this round's KV and tokens.
  """
  dcfg = spec.draft_cfg
  ring = state.ring
  B, G = first.shape[0], spec.gamma
  view = ring.as_kv_cache()
  run = lambda tokens, **kw: model_lib.forward(draft_params, dcfg, tokens, view,
                                               window=spec.prefix_window, slot_pos=ring.pos,
                                               **kw)
  logits, new = run(jnp.stack([state.last, first], axis=1),
                    logits_at=jnp.ones((B, 1), jnp.int32))
  buf = jax.tree.map(lambda z, n: jax.lax.dynamic_update_slice_in_dim(z, n, 0, axis=2),
                     state.round_kv, new)
  key, sub = jax.random.split(key)
  d1, q1 = _draw(sub, logits[:, 0], sp)

  def step(carry, j):  # feeds d_j at position ring.lengths + j + 1 (buffer entry j + 1)
    tok, buf, key = carry
    mask = jnp.concatenate([(jnp.arange(G + 1) <= j)[None, :], jnp.ones((1, 1), bool)],
                           axis=1)
    logits, new = run(tok[:, None], offsets=(j + 1)[None].astype(jnp.int32),
                      new_mask=mask, pending=buf)
    buf = jax.tree.map(lambda z, n: jax.lax.dynamic_update_slice_in_dim(z, n, j + 1, axis=2),
                       buf, new)
    key, sub = jax.random.split(key)
    d, q = _draw(sub, logits[:, 0], sp)
    return (d, buf, key), (d, q)

  (_, buf, _), (ds, qs) = jax.lax.scan(step, (d1, buf, key), jnp.arange(1, G))
  drafted = jnp.concatenate([d1[:, None], ds.T], axis=1)  # [B, G]
  q = jnp.concatenate([q1[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)  # [B, G, V]
  state = dataclasses.replace(state, round_kv=buf,
                              round_tokens=jnp.concatenate([first[:, None], drafted], 1))
  return drafted, q, state
