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


def calibrate(params, cfg: ModelConfig, batch: int, context: int, gammas, spec_template:
              drafts.SpecConfig, repeats: int = 3) -> Timings:
  """Time the target over T = 1 and gamma + 1 tokens and one draft step per gamma.

  The cache holds ``context`` valid (random) positions per row: forward time does not
  depend on the values, only on the shapes and lengths.
  """
  gammas = sorted(set(int(g) for g in gammas if g > 0))
  size = context + max(gammas, default=0) + 1
  shape = cache_shape(cfg, batch, size)
  cache = KVCache(k=jnp.ones(shape, cfg.dtype) * 0.01, v=jnp.ones(shape, cfg.dtype) * 0.01,
                  lengths=jnp.full((batch,), context, jnp.int32))

  @jax.jit
  def target(params, cache, tokens):
    return model_lib.forward(params, cfg, tokens, cache)[0]

  timings = Timings(batch=batch, context=context, target={}, draft={})
  for t in sorted({1} | {g + 1 for g in gammas}):
    tokens = jnp.zeros((batch, t), jnp.int32)
    timings.target[t] = best_time(target, params, cache, tokens, repeats=repeats)
  for g in gammas:
    spec = dataclasses.replace(spec_template, gamma=g)
    pshape = (cfg.num_layers, batch, g, cfg.num_kv_heads, cfg.head_dim)
    pending = NewKV(k=jnp.zeros(pshape, cfg.dtype), v=jnp.zeros(pshape, cfg.dtype))
    mask = jnp.ones((1, g + 1), bool)

    @jax.jit
    def draft_step(params, cache, pending, spec=spec, mask=mask):
      return model_lib.forward(params, cfg, jnp.zeros((batch, 1), jnp.int32), cache,
                               offsets=jnp.zeros((1,), jnp.int32), new_mask=mask,
                               window=spec.prefix_window, pending=pending)[0]

    timings.draft[g] = best_time(draft_step, params, cache, pending, repeats=repeats)
  return timings


def choose_gamma(timings: Timings, alpha: float, gammas) -> int:
  """The gamma (0 = autoregressive) with the highest predicted throughput."""
  best = max([0] + [g for g in gammas if g in timings.draft],
             key=lambda g: timings.predicted_speedup(alpha, g))
  return int(best)


def summary(timings: Timings, alpha: float, gammas) -> dict[int, float]:
  return {int(g): timings.predicted_speedup(alpha, g) for g in gammas}

