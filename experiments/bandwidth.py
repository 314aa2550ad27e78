"""Measure the memory bandwidth of the device at hand, for roofline fractions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from specjax.cost_model import best_time


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
  read = x.nbytes / best_time(jax.jit(jnp.sum), x, repeats=repeats) / 1e9
  copy = 2 * x.nbytes / best_time(jax.jit(lambda a: a * 2), x, repeats=repeats) / 1e9
  del x
  return {"read_gbps": read, "copy_gbps": copy, "roofline_gbps": max(read, copy)}
