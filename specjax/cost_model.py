"""A cost model for chain speculation, calibrated on the machine at hand.

MagicDec (arXiv 2408.11049, §3) and Sequoia (arXiv 2402.12374) predict the speedup of a
round of gamma drafts + one verification of gamma + 1 tokens as::

  E[tokens per round] = (1 - a^(gamma + 1)) / (1 - a)        (acceptance rate a)
  T_round             = gamma * T_draft + T_verify(gamma + 1)
  speedup             = E[tokens] * T_target(1) / T_round

Rather than modelling bytes and FLOPs, the times are *measured*: the same jitted
forward passes the engine runs (the target over T new tokens after S prefix tokens, the
draft step over its sparse budget), each timed after compilation, so the fixed
per-forward latency, the machine's bandwidth and its compute limits are all inside the
numbers. ``choose_gamma`` then picks the gamma with the best predicted throughput for a
(batch, context) bucket.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from specjax import drafts, model as model_lib
from specjax.config import ModelConfig
from specjax.kv_cache import KVCache, NewKV, cache_shape


def expected_tokens(alpha: float, gamma: int) -> float:
  """Expected tokens per round for a chain with i.i.d. acceptance rate alpha."""
  if alpha >= 1.0:
    return float(gamma + 1)
  return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def acceptance_from_tokens(tokens_per_round: float, gamma: int) -> float:
  """Invert ``expected_tokens``: the alpha that gives the measured tokens per round."""
  target = min(max(tokens_per_round, 1.0), gamma + 1.0)
  lo, hi = 0.0, 1.0
  for _ in range(60):  # bisection; expected_tokens is increasing in alpha
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if expected_tokens(mid, gamma) < target else (lo, mid)
  return (lo + hi) / 2


@dataclasses.dataclass
class Timings:
  """Measured forward times (seconds) for one (batch, context) bucket."""

  batch: int
  context: int
  target: dict[int, float]  # T new tokens -> target forward time
  draft: dict[int, float]  # gamma -> one draft step (T=1, pending gamma) time

  def round_time(self, gamma: int) -> float:
    return gamma * self.draft[gamma] + self.target[gamma + 1]

  def predicted_speedup(self, alpha: float, gamma: int) -> float:
    if gamma == 0:
      return 1.0
    return expected_tokens(alpha, gamma) * self.target[1] / self.round_time(gamma)


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


def calibrate(params, cfg: ModelConfig, batch: int, context: int, gammas,
              spec_template: drafts.SpecConfig, *, repeats: int = 3, draft_params=None,
              cache_sharding=None) -> Timings:
  """Time the target over T = 1 and gamma + 1 tokens and one draft step per gamma.

  The target reads a cache of ``context`` slots whose rows hold ``context - max(gamma)
  - 1`` valid (random) positions: forward time depends on the shapes and lengths, not
  the values. The draft step is the one ``spec_template`` describes: the target over
  its sparse window (streaming, SnapKV) or the draft model over its ring.

  Args:
    draft_params: the draft model's weights when ``spec_template.draft_cfg`` is set.
    cache_sharding: a KVCache of shardings for the target cache (multi-device).
  """
  gammas = sorted(set(int(g) for g in gammas if g > 0))
  length = max(context - max(gammas, default=0) - 1, 1)
  cache = _dummy_cache(cfg, batch, context, length)
  if cache_sharding is not None:
    cache = jax.device_put(cache, cache_sharding)

  @jax.jit
  def target(params, cache, tokens):
    return model_lib.forward(params, cfg, tokens, cache)[0]

  timings = Timings(batch=batch, context=context, target={}, draft={})
  for t in sorted({1} | {g + 1 for g in gammas}):
    tokens = jnp.zeros((batch, t), jnp.int32)
    timings.target[t] = best_time(target, params, cache, tokens, repeats=repeats)
  for g in gammas:
    spec = dataclasses.replace(spec_template, gamma=g)
    step, args = _draft_step(params, cfg, cache, spec, batch, context, length, draft_params)
    timings.draft[g] = best_time(jax.jit(step), *args, repeats=repeats)
  return timings


def _dummy_cache(cfg: ModelConfig, batch: int, size: int, length: int) -> KVCache:
  shape = cache_shape(cfg, batch, size)
  return KVCache(k=jnp.full(shape, 0.01, cfg.dtype), v=jnp.full(shape, 0.01, cfg.dtype),
                 lengths=jnp.full((batch,), length, jnp.int32))


def _draft_step(params, cfg: ModelConfig, cache: KVCache, spec: drafts.SpecConfig,
                batch: int, context: int, length: int, draft_params):
  """One draft step of ``spec`` (T = 1 after a full round buffer): (fn, args)."""
  g = spec.gamma
  token = jnp.zeros((batch, 1), jnp.int32)
  if spec.draft_cfg is None:  # the target over its window (+ SnapKV's selection)
    pshape = (cfg.num_layers, batch, g, cfg.num_kv_heads, cfg.head_dim)
    idx = None
    if spec.draft_kv == "snapkv":
      idx = jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, spec.num_selected),
                      jnp.int32)

    def step(params, cache, pending, idx):
      return model_lib.forward(params, cfg, token, cache, offsets=jnp.full((1,), g - 1),
                               new_mask=jnp.ones((1, g + 1), bool),
                               window=spec.prefix_window, prefix_idx=idx,
                               pending=pending)[0]

    return step, (params, cache, _zeros_kv(pshape, cfg.dtype), idx)
  dcfg = spec.draft_cfg  # the draft model over its ring (or a full cache)
  ring = context if spec.window is None else spec.window
  dcache = _dummy_cache(dcfg, batch, ring, min(length, ring))
  slot_pos = jnp.broadcast_to(jnp.arange(ring, dtype=jnp.int32), (batch, ring))
  pshape = (dcfg.num_layers, batch, g + 1, dcfg.num_kv_heads, dcfg.head_dim)

  def step(draft_params, dcache, pending, slot_pos):
    return model_lib.forward(draft_params, dcfg, token, dcache, offsets=jnp.full((1,), g),
                             new_mask=jnp.ones((1, g + 2), bool),
                             window=spec.prefix_window, slot_pos=slot_pos,
                             pending=pending)[0]

  return step, (draft_params, dcache, _zeros_kv(pshape, dcfg.dtype), slot_pos)


def _zeros_kv(shape, dtype) -> NewKV:
  return NewKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def choose_gamma(timings: Timings, alpha: float, gammas) -> int:
  """The gamma with the highest predicted throughput; 0 (autoregressive) when it is
  among ``gammas`` and no speculation is predicted to pay."""
  candidates = [g for g in gammas if g == 0 or g in timings.draft]
  if not candidates:
    raise ValueError(f"no timings for any of gammas={list(gammas)}; calibrate them first.")
  return int(max(candidates, key=lambda g: timings.predicted_speedup(alpha, g)))


class GammaSchedule:
  """``gamma="auto"``: gamma per (batch, context bucket) from measured timings and the
  acceptance rate measured so far in the same generation.

  The engine decodes in segments (a context bucket, or a few rounds); before each it
  asks :meth:`choose` for the bucket's gamma and afterwards reports what the segment
  produced to :meth:`observe`. Until a speculative segment has run, the acceptance
  rate is ``prior_alpha``; the first choice is never 0, so the estimate always starts
  from a measurement.

  Args:
    timings: context bucket -> Timings (calibrated lazily, e.g. cached by the engine).
    gammas: the compiled choices (0 = autoregressive allowed).
  """

  def __init__(self, timings, gammas, prior_alpha: float = 0.7):
    self.gammas = tuple(sorted(set(int(g) for g in gammas)))
    if not self.gammas or self.gammas[0] < 0:
      raise ValueError(f"gamma choices must be >= 0 and not empty; got {gammas}.")
    self._timings = timings
    self._prior = prior_alpha
    self._weighted = 0.0  # sum of alpha estimates weighted by row-rounds
    self._row_rounds = 0

  @property
  def alpha(self) -> float:
    return self._weighted / self._row_rounds if self._row_rounds else self._prior

  def choose(self, context: int) -> int:
    choices = self.gammas
    if not self._row_rounds and max(choices) > 0:
      choices = tuple(g for g in choices if g > 0)
    return choose_gamma(self._timings(context), self.alpha, choices)

  def observe(self, gamma: int, tokens: int, row_rounds: int) -> None:
    """A segment at ``gamma`` gained ``tokens`` over ``row_rounds`` active row-rounds."""
    if gamma == 0 or row_rounds == 0:
      return
    alpha = acceptance_from_tokens(tokens / row_rounds, gamma)
    self._weighted += alpha * row_rounds
    self._row_rounds += row_rounds


def summary(timings: Timings, alpha: float, gammas) -> dict[int, float]:
  return {int(g): timings.predicted_speedup(alpha, g) for g in gammas}

