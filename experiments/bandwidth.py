"""The machine at hand: its description and memory bandwidth, for result files and
roofline fractions."""

from __future__ import annotations

import os
import platform

import jax
import jax.numpy as jnp

from specjax.cost_model import best_time
from specjax.params import param_bytes


def machine_description() -> dict[str, str]:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"device": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
          "cpu": f"{cpu}, {os.cpu_count()} cores", "jax": jax.__version__,
          "python": platform.python_version()}


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


def step_bytes(cfg, batch: int, prompt: int, new_tokens: int) -> float:
  """Bytes one decode step must read: all weights + each row's valid KV (mean length)."""
  kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * \
      jnp.dtype(cfg.dtype).itemsize
  return param_bytes(cfg) + batch * kv_per_token * (prompt + (new_tokens - 1) / 2)
