"""An independent float64 NumPy Llama forward pass, written from the equations.

It shares no code with specjax: full-sequence causal attention with an explicit
[T, T] mask, RoPE by complex rotation of (i, i + D/2) pairs, per-head loops for GQA.
"""

import numpy as np


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _inv_freq(cfg):
  D = cfg.head_dim
  inv = 1.0 / cfg.rope_theta ** (np.arange(D // 2) * 2.0 / D)
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  out = []
  for f in inv:
    wavelen = 2 * np.pi / f
    if wavelen < sc.original_max_position / sc.high_freq_factor:
      out.append(f)
    elif wavelen > sc.original_max_position / sc.low_freq_factor:
      out.append(f / sc.factor)
    else:
      s = (sc.original_max_position / wavelen - sc.low_freq_factor) / (
          sc.high_freq_factor - sc.low_freq_factor)
      out.append((1 - s) * f / sc.factor + s * f)
  return np.array(out)


def _rope(x, positions, inv_freq):
  """x: [T, N, D] -> rotated, pairing dim i with i + D/2 as a complex number."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  z = z * np.exp(1j * positions[:, None, None] * inv_freq[None, None, :])
  return np.concatenate([z.real, z.imag], axis=-1)


def forward(cfg, params, tokens, window=None):
  """Logits f64[T, V] for one sequence of token ids (positions 0..T-1).

  window: optional (sinks, recent); query t then sees key s iff s == t, or s < t and
  (s < sinks or s >= t - recent) -- the draft budget over the prefix before t.
  """
  p = {k: np.asarray(v, np.float64) for k, v in vars(params.layers).items()}
  emb = np.asarray(params.embedding, np.float64)
  x = emb[np.asarray(tokens)]
  T = len(tokens)
  pos = np.arange(T, dtype=np.float64)
  inv_freq = _inv_freq(cfg)
  mask = np.tril(np.ones((T, T), bool))
  if window is not None:
    sinks, recent = window
    s_idx, t_idx = np.meshgrid(np.arange(T), np.arange(T))
    mask = (s_idx == t_idx) | ((s_idx < t_idx) & ((s_idx < sinks) | (s_idx >= t_idx - recent)))
  G = cfg.num_heads // cfg.num_kv_heads
  for l in range(cfg.num_layers):
    h = _rms_norm(x, p["attn_norm"][l], cfg.rms_eps)
    q = _rope(np.einsum("te,ehd->thd", h, p["wq"][l]), pos, inv_freq)
    k = _rope(np.einsum("te,ekd->tkd", h, p["wk"][l]), pos, inv_freq)
    v = np.einsum("te,ekd->tkd", h, p["wv"][l])
    o = np.zeros_like(q)
    for head in range(cfg.num_heads):
      kv = head // G
      s = q[:, head] @ k[:, kv].T / np.sqrt(cfg.head_dim)
      s = np.where(mask, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      o[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + np.einsum("thd,hde->te", o, p["wo"][l])
    h = _rms_norm(x, p["mlp_norm"][l], cfg.rms_eps)
    g = h @ p["w_gate"][l]
    x = x + (g / (1 + np.exp(-g)) * (h @ p["w_up"][l])) @ p["w_down"][l]
  x = _rms_norm(x, np.asarray(params.final_norm, np.float64), cfg.rms_eps)
  head = emb.T if params.lm_head is None else np.asarray(params.lm_head, np.float64)
  return x @ head
