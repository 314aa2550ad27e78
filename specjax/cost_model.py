"""A cost model for chain and tree speculation, calibrated on the machine at hand.

MagicDec (arXiv 2408.11049, §3) and Sequoia (arXiv 2402.12374) predict the speedup of
a round that drafts a token tree of n nodes and depth D (a chain of gamma drafts: n =
gamma + 1, D = gamma) and verifies it in one target forward::

  E[tokens per round] = 1 + F(tree, accept)       (sequoia.expected_accepted)
  T_round             = D * T_draft(tree) + T_verify(n)
  speedup             = E[tokens] * T_target(1) / T_round

For a chain with i.i.d. acceptance a, ``1 + F = (1 - a^(gamma + 1)) / (1 - a)``
(:func:`expected_tokens`); ``accept = (a,)`` is that chain's positional vector.

Rather than modelling bytes and FLOPs, the times are *measured*: the same jitted
forward passes the engine runs (the target over n new tokens after S prefix tokens,
one draft level over its sparse budget), each timed after compilation, so the fixed
per-forward latency, the machine's bandwidth and its compute limits are all inside
the numbers. :class:`ShapeSchedule` then picks, per (batch, context bucket), the tree
(or chain, or plain decoding) with the best predicted throughput, and refits the
acceptance as the generation reports what it measured.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax import drafts, model as model_lib, sequoia
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache, NewKV, cache_shape
from specjax.tree import TokenTree


def expected_tokens(alpha: float, gamma: int) -> float:
  """Expected tokens per round for a chain with i.i.d. acceptance rate alpha."""
  if alpha >= 1.0:
    return float(gamma + 1)
  return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def fit_first_rank(tree: TokenTree, accept, tokens_per_round: float) -> tuple[float, ...]:
  """``accept`` with its rank-0 entry refit so that the tree's expected tokens per
  round equal the measured ones (bisection: F increases with accept[0]). Rank 0
  carries most of the mass; the shape of the rest of the vector is kept."""
  rest = tuple(float(a) for a in accept[1:])
  value = lambda a0: 1.0 + sequoia.expected_accepted(tree, (a0,) + rest)
  target = min(max(tokens_per_round, value(0.0)), value(1.0))
  lo, hi = 0.0, 1.0
  for _ in range(50):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if value(mid) < target else (lo, mid)
  return ((lo + hi) / 2,) + rest


def acceptance_from_tokens(tokens_per_round: float, gamma: int) -> float:
  """The chain acceptance rate alpha that gives the measured tokens per round."""
  return fit_first_rank(TokenTree.chain(gamma), (0.0,), tokens_per_round)[0]


@dataclasses.dataclass
class Timings:
  """Measured forward times (seconds) for one (batch, context) bucket."""

  batch: int
  context: int
  target: dict[int, float]  # n new tokens -> target forward time
  draft: dict[TokenTree, float]  # tree -> one draft level (its widest) time

  def drafting(self, tree: TokenTree) -> float:
    """A round's draft forwards: one per level."""
    return tree.max_depth * self.draft[tree] if tree.max_depth else 0.0

  def round_time(self, tree: TokenTree) -> float:
    return self.drafting(tree) + self.target[tree.size]

  def scaled(self, factor: float, batch: int) -> Timings:
    """Every time times ``factor``, as the estimate for another batch size (a
    compacted batch: the full batch's calibration rescaled by measured rounds; the
    choices between shapes depend on the ratios of the times, which this keeps)."""
    return Timings(batch=batch, context=self.context,
                   target={n: t * factor for n, t in self.target.items()},
                   draft={u: t * factor for u, t in self.draft.items()})

  def predicted_speedup(self, tree: TokenTree, accept) -> float:
    tokens = 1.0 + (sequoia.expected_accepted(tree, accept) if tree.max_depth else 0.0)
    return tokens * self.target[1] / self.round_time(tree)


def best_time(fn, *args, repeats: int) -> float:
  """Seconds of the fastest of ``repeats`` calls of ``fn(*args)``, after a warm-up call
  (compilation and first-touch allocation excluded)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def calibrate(params, cfg: ModelConfig, batch: int, context: int, trees,
              spec_template: drafts.SpecConfig | None, *, repeats: int = 3, draft_params=None,
              cache_sharding=None) -> Timings:
  """Time the target over 1 and n tokens and one draft level of every tree.

  The target reads a cache of ``context`` slots whose rows hold ``context - n_max``
  valid (random) positions: forward time depends on the shapes and lengths, not the
  values. The draft level is the one ``spec_template`` describes: the target over its
  sparse window (streaming, SnapKV) or the draft model over its ring, feeding the
  tree's widest level with a round buffer of every node.

  Args:
    trees: TokenTrees (``TokenTree.chain(gamma)`` for chains).
    spec_template: the draft to time; None times the target alone (host-built drafts).
    draft_params: the draft model's weights when ``spec_template.draft_cfg`` is set.
    cache_sharding: a KVCache of shardings for the target cache (multi-device).
  """
  trees = list(dict.fromkeys(trees))
  length = max(context - max((t.size for t in trees), default=1), 1)
  cache = _dummy_cache(cfg, batch, context, length)
  if cache_sharding is not None:
    cache = jax.device_put(cache, cache_sharding)

  @jax.jit
  def target(params, cache, tokens):
    return model_lib.forward(params, cfg, tokens, cache)[0]

  timings = Timings(batch=batch, context=context, target={}, draft={})
  for n in sorted({1} | {t.size for t in trees}):
    tokens = jnp.zeros((batch, n), jnp.int32)
    timings.target[n] = best_time(target, params, cache, tokens, repeats=repeats)
  measured: dict[tuple[int, int], float] = {}  # (width, nodes) -> seconds
  for tree in trees:
    if not tree.max_depth or spec_template is None:
      continue
    shape = (tree.expand_table.shape[1], tree.size)
    if shape not in measured:
      step, args = _draft_level(params, cfg, cache, spec_template, batch, context, length,
                                draft_params, *shape)
      measured[shape] = best_time(jax.jit(step), *args, repeats=repeats)
    timings.draft[tree] = measured[shape]
  return timings


def _dummy_cache(cfg: ModelConfig, batch: int, size: int, length: int) -> KVCache:
  shape = cache_shape(cfg, batch, size)
  return KVCache(k=jnp.full(shape, 0.01, cfg.dtype), v=jnp.full(shape, 0.01, cfg.dtype),
                 lengths=jnp.full((batch,), length, jnp.int32))


def _draft_level(params, cfg: ModelConfig, cache: KVCache, spec: drafts.SpecConfig,
                 batch: int, context: int, length: int, draft_params, width: int,
                 nodes: int):
  """One draft level of ``spec`` (``width`` tokens, a round buffer of ``nodes``):
  (fn, args)."""
  tokens = jnp.zeros((batch, width), jnp.int32)
  offsets = jnp.ones((width,), jnp.int32)
  if spec.draft_cfg is None:  # the target over its window (+ SnapKV's selection)
    idx = None
    if spec.draft_kv == "snapkv":
      idx = jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, spec.num_selected),
                      jnp.int32)
    pshape = (cfg.num_layers, batch, nodes, cfg.num_kv_heads, cfg.head_dim)

    def step(params, cache, pending, idx):
      return model_lib.forward(params, cfg, tokens, cache, offsets=offsets,
                               new_mask=jnp.ones((width, nodes + width), bool),
                               window=spec.prefix_window, prefix_idx=idx,
                               pending=pending)[0]

    return step, (params, cache, _zeros_kv(pshape, cfg.dtype), idx)
  dcfg = spec.draft_cfg  # the draft model over its ring (or a full cache)
  ring = context if spec.window is None else spec.window
  dcache = _dummy_cache(dcfg, batch, ring, min(length, ring))
  slot_pos = jnp.broadcast_to(jnp.arange(ring, dtype=jnp.int32), (batch, ring))
  pshape = (dcfg.num_layers, batch, 1 + nodes, dcfg.num_kv_heads, dcfg.head_dim)

  def step(draft_params, dcache, pending, slot_pos):
    return model_lib.forward(draft_params, dcfg, tokens, dcache, offsets=offsets,
                             new_mask=jnp.ones((width, 1 + nodes + width), bool),
                             window=spec.prefix_window, slot_pos=slot_pos,
                             pending=pending)[0]

  return step, (draft_params, dcache, _zeros_kv(pshape, dcfg.dtype), slot_pos)


def _zeros_kv(shape, dtype) -> NewKV:
  return NewKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def choose(timings: Timings, accept, trees) -> TokenTree:
  """The tree with the highest predicted throughput (a lone root = autoregressive)."""
  trees = list(trees)
  if not trees:
    raise ValueError("no tree to choose from.")
  return max(trees, key=lambda t: timings.predicted_speedup(t, accept))


class ShapeSchedule:
  """``gamma="auto"`` / ``tree="auto"``: the round's tree per (batch, context bucket)
  from measured timings and the acceptance measured so far in the same generation.

  The engine decodes in segments (a context bucket, or a few rounds); before each it
  asks :meth:`choose` for the bucket's tree and afterwards reports what the segment
  produced to :meth:`observe`, which refits the vector's rank-0 entry
  (:func:`fit_first_rank`) and, given the segment's wall time, replaces the
  calibrated round time of that (bucket, tree) by the measured one (the mean over
  every segment that ran it there). Calibration runs
  each forward a few times in isolation; on a shared or throttled machine it can be
  off by 2x (and a draft forward timed alone is not one inside the decode loop), and
  the measured rounds of the generation itself are the better estimate: of the trees
  that ran, and through :meth:`draft_scale` of the drafting of those that did not.
  Tokens per round likewise: a tree that ran in the bucket is judged by the tokens its
  rounds gained there (:meth:`tokens_per_round`), the others by the acceptance model.
  The model's i.i.d. rank-0 rate, fitted on a shallow chain, overrates a deep one on
  real text, where rejections come in runs (a chain of 7 predicted 7.5 tokens a round
  at the rate a chain of 4 measured, and gained 6.0).
  Until a speculative segment has run, ``prior`` is used and the choice is never
  plain decoding, so the estimate starts from a measurement: the probe, the prior's
  best tree of depth at most ``probe_depth``. A prior that overrates acceptance picks
  deep trees, and a probe of a few rounds in a generation of a few dozen pays for
  every level it drafts in vain; a shallow tree measures the rank-0 acceptance as well.

  Args:
    timings: bucket -> Timings (calibrated lazily, e.g. cached by the engine, which
      passes (batch, context) buckets).
    trees: the compiled choices (``TokenTree.chain(0)`` = autoregressive allowed).
    prior: the positional acceptance vector to start from.
    probe_depth: the probe's depth limit (None: any).
  """

  def __init__(self, timings, trees, prior=(0.7,), probe_depth: int | None = None):
    self.trees = tuple(dict.fromkeys(trees))
    if not self.trees:
      raise ValueError("a schedule needs at least one tree to choose from.")
    self._probe_depth = probe_depth
    self._timings = timings
    self._prior = tuple(float(a) for a in prior)
    self._weighted = 0.0  # sum of rank-0 fits weighted by row-rounds
    self._row_rounds = 0
    # (bucket, tree) -> (seconds, rounds) over every segment it ran there: one segment
    # is a few rounds, and a single hiccup of the host would otherwise flip the choice.
    self._timed: dict[tuple[int, TokenTree], tuple[float, int]] = {}
    self._gained: dict[tuple[int, TokenTree], tuple[int, int]] = {}  # tokens, row-rounds

  @property
  def accept(self) -> tuple[float, ...]:
    if not self._row_rounds:
      return self._prior
    return (self._weighted / self._row_rounds,) + self._prior[1:]

  def draft_scale(self, context: int) -> float:
    """How far the drafting in this bucket's measured rounds was from its calibration:
    the median over the speculative trees that ran of (measured round time - calibrated
    verify) / calibrated drafting, clipped to [1/4, 4]; 1 before any ran."""
    return self._draft_scale(context, self._timings(context))

  def _draft_scale(self, context: int, t: Timings) -> float:
    ratios = [(seconds - t.target[u.size]) / t.drafting(u)
              for (c, u), seconds in self._measured().items()
              if c == context and t.drafting(u) > 0]
    return float(np.clip(np.median(ratios), 0.25, 4.0)) if ratios else 1.0

  def round_times(self, context: int, trees) -> list[float]:
    """Seconds per round of each tree: measured in this bucket if it ran there, else
    calibrated, with the drafting rescaled by :meth:`draft_scale` (one draft forward
    timed in isolation can be far from one inside the decode loop)."""
    t = self._timings(context)
    scale = self._draft_scale(context, t)
    measured = self._measured()
    return [measured.get((context, u), t.target[u.size] + scale * t.drafting(u))
            for u in trees]

  def _measured(self) -> dict[tuple[int, TokenTree], float]:
    """Seconds per round of every (bucket, tree) that ran: the mean over its segments."""
    return {k: seconds / rounds for k, (seconds, rounds) in self._timed.items()}

  def tokens_per_round(self, context: int, trees) -> list[float]:
    """Tokens a row gains per round with each tree: measured in this bucket if it ran
    there, else expected under :attr:`accept` (1 for plain decoding)."""
    accept, out = self.accept, []
    for u in trees:
      tokens, row_rounds = self._gained.get((context, u), (0, 0))
      if not u.max_depth:
        out.append(1.0)
      elif row_rounds:
        out.append(tokens / row_rounds)
      else:
        out.append(1.0 + sequoia.expected_accepted(u, accept))
    return out

  def choose(self, context: int) -> TokenTree:
    choices = self.trees
    if not self._row_rounds and any(t.max_depth for t in choices):  # the probe
      choices = tuple(t for t in choices if t.max_depth)
      limit = self._probe_depth or max(t.max_depth for t in choices)
      choices = (tuple(t for t in choices if t.max_depth <= limit)
                 or (min(choices, key=lambda t: t.max_depth),))
    tokens = self.tokens_per_round(context, choices)
    rate = [n / s for n, s in zip(tokens, self.round_times(context, choices))]
    return choices[int(np.argmax(rate))]

  def observe(self, tree: TokenTree, tokens: int, row_rounds: int, *,
              context: int | None = None, seconds: float | None = None,
              rounds: int = 0) -> None:
    """A segment drafting ``tree`` gained ``tokens`` over ``row_rounds`` active
    row-rounds (and, if given, ran ``rounds`` rounds in ``seconds`` in ``context``)."""
    if context is not None and seconds is not None and rounds > 0:
      seconds_before, rounds_before = self._timed.get((context, tree), (0.0, 0))
      self._timed[(context, tree)] = (seconds_before + seconds, rounds_before + rounds)
    if not tree.max_depth or not row_rounds:
      return
    if context is not None:
      tokens_before, row_rounds_before = self._gained.get((context, tree), (0, 0))
      self._gained[(context, tree)] = (tokens_before + tokens, row_rounds_before + row_rounds)
    a0 = fit_first_rank(tree, self._prior, tokens / row_rounds)[0]
    self._weighted += a0 * row_rounds
    self._row_rounds += row_rounds
