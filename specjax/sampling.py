"""Token sampling: temperature, top-k and top-p (nucleus) on float32 logits.

:func:`probabilities` is the one definition of the distribution a sampler draws from;
speculative verification compares target and draft probabilities built by the same
function, so stochastic speculation preserves exactly what :func:`sample` would draw.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the next token.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p
      (1.0 = all).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0.")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1].")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filtered_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """Logits [..., V] after temperature, top-k and top-p (removed tokens are -inf)."""
  x = logits.astype(jnp.float32) / sp.temperature
  V = x.shape[-1]
  if 0 < sp.top_k < V:
    kth = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if sp.top_p < 1.0:
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
    sorted_p = jax.nn.softmax(sorted_x, axis=-1)
    # Mass strictly before each sorted token; keep tokens whose preceding mass < top_p
    # (the most likely token is always kept).
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    n_keep = jnp.sum(before < sp.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_x, n_keep - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def probabilities(logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """The sampling distribution f32[..., V]; one-hot on the argmax when greedy."""
  if sp.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filtered_logits(logits, sp), axis=-1)


def sample(key: jax.Array, logits: jax.Array, sp: SamplingParams) -> jax.Array:
  """Draw token ids i32[...] from logits [..., V]."""
  if sp.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filtered_logits(logits, sp), axis=-1).astype(jnp.int32)


def sample_without_replacement(key: jax.Array, q: jax.Array, k: int) -> jax.Array:
  """Draw k distinct tokens i32[..., k] from q f32[..., V], in draw order.

  Sequential sampling without replacement: the first token is drawn from q, each next
  one from q with the earlier ones removed and renormalised. This is how tree drafting
  proposes a node's ranked children (Sequoia), and what
  :func:`specjax.verify.verify_tree` assumes. Done in one shot by Gumbel-top-k: the k
  largest of ``log q + Gumbel noise`` are such a sample, largest first.

  If k exceeds q's support, the support comes first and the rest are zero-probability
  tokens, lowest id first (``lax.top_k`` keeps ties in index order); verification
  treats those as point-mass proposals, which stays lossless.

  Args:
    key: PRNG key.
    q: f32[..., V] probabilities (need not be normalised).
    k: static number of tokens, 0 <= k <= V.
  """
  V = q.shape[-1]
  if not 0 <= k <= V:
    raise ValueError(f"k={k} distinct tokens cannot be drawn from a vocabulary of {V}.")
  scores = jnp.log(q.astype(jnp.float32)) + jax.random.gumbel(key, q.shape, jnp.float32)
  return jax.lax.top_k(scores, k)[1].astype(jnp.int32)
