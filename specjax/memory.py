"""Memory estimates, checked before anything large is allocated."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from specjax import kv_cache
from specjax.config import ModelConfig
from specjax.params import param_bytes


def available_bytes(device=None) -> int | None:
  """Free memory of a device: accelerator memory stats, or host MemAvailable on CPU.

  Returns None when the platform reports nothing (then no check is made).
  """
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # not every backend implements memory_stats
    pass
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def activation_bytes(cfg: ModelConfig, batch: int, tokens: int, cache_size: int,
                     logits_tokens: int) -> int:
  """Peak activations of one forward of ``tokens`` new tokens per row (one layer live).

  Dominated by the float32 attention scores [B, H, T, S + T] (two copies: scores and
  probabilities), the MLP hidden [B, T, F] (gate, up, product) and the logits.
  """
  f32 = 4
  act = jnp.dtype(cfg.dtype).itemsize
  scores = 2 * batch * cfg.num_heads * tokens * (cache_size + tokens) * f32
  mlp = 3 * batch * tokens * cfg.mlp_dim * act
  logits = batch * logits_tokens * cfg.vocab_size * f32
  new_kv = 2 * cfg.num_layers * batch * tokens * cfg.num_kv_heads * cfg.head_dim * act
  return scores + mlp + logits + new_kv


def check_fits(cfg: ModelConfig, batch: int, cache_size: int, tokens_per_step: int,
               num_devices: int = 1) -> int:
  """Estimate the bytes a generation needs and raise ValueError if they do not fit.

  Args:
    batch, cache_size: the KV cache to allocate.
    tokens_per_step: the largest forward (the prefill chunk).
    num_devices: devices the cache and weights are spread over (an even split is
      assumed, which is optimistic for replicated axes).

  Returns:
    The estimated bytes.
  """
  need_new = (kv_cache.cache_bytes(cfg, batch, cache_size) +
              activation_bytes(cfg, batch, tokens_per_step, cache_size, batch))
  total = need_new + param_bytes(cfg)
  free = available_bytes()
  if free is None:
    return total
  per_device_new = need_new // num_devices
  if per_device_new > free:
    raise ValueError(
        f"batch={batch} with a cache of {cache_size} tokens needs about"
        f" {per_device_new / 2**30:.2f} GiB per device (KV cache"
        f" {kv_cache.cache_bytes(cfg, batch, cache_size) / 2**30:.2f} GiB + activations),"
        f" but only {free / 2**30:.2f} GiB is free. Use a smaller batch, a shorter"
        f" context or max_new_tokens, compute_dtype='bfloat16', a smaller prefill chunk,"
        f" or more devices.")
  return total
