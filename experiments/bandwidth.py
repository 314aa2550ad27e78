"""Measure the memory bandwidth of the device at hand, for roofline fractions."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def _best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def measure(size_mib: int = 512, repeats: int = 7) -> dict[str, float]:
  """Streaming bandwidths in GB/s (1e9 bytes/s), best of ``repeats``.

  * ``read``: a sum over a large float32 array (bytes read / time) -- decode steps are
    read-bound (weights and KV cache), so this is the roofline we compare against;
  * ``copy``: y = 2 x (bytes read + written / time), the usual "HBM copy" figure.

  Returns:
    {"read_gbps", "copy_gbps", "roofline_gbps"}, the last being the larger of the two,
    i.e. the strictest denominator for a roofline fraction.
  """
  n = size_mib * 2**20 // 4
  x = jnp.ones((n,), jnp.float32)
  read = x.nbytes / _best_seconds(jax.jit(jnp.sum), x, repeats=repeats) / 1e9
  copy = 2 * x.nbytes / _best_seconds(jax.jit(lambda a: a * 2), x, repeats=repeats) / 1e9
  del x
  return {"read_gbps": read, "copy_gbps": copy, "roofline_gbps": max(read, copy)}
