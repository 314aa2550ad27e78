"""Lossless verification of a drafted chain (speculative sampling).

Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023 (arXiv 2302.01318):
draft token d_i, drawn from the draft distribution q_i, is accepted with probability
``min(1, p_i(d_i) / q_i(d_i))`` where p_i is the target's distribution at the same
position; at the first rejection the replacement is drawn from the residual
``norm(max(p_i - q_i, 0))``, and if every draft is accepted a bonus token is drawn from
the target's next distribution. The output then has exactly the target's distribution.

Greedy decoding is the same rule with one-hot p and q (``sampling.probabilities`` at
temperature 0): a draft is accepted iff it equals the target's argmax, and the
replacement/bonus is the target's argmax. One code path serves both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def verify_chain(key: jax.Array,
                 drafts: jax.Array,  # i32[B, G]
                 q: jax.Array,  # f32[B, G, V] draft distributions the drafts came from
                 p: jax.Array,  # f32[B, G + 1, V] target distributions
                 ) -> tuple[jax.Array, jax.Array]:
  """Accept a prefix of each row's drafts and pick the token that follows it.

  Returns:
    n_accepted: i32[B] in [0, G], the accepted prefix length;
    next_token: i32[B], the target-distributed token after the accepted prefix
      (the residual sample at the first rejection, or the bonus token).
  """
  B, G = drafts.shape
  key_accept, key_next = jax.random.split(key)
  p_d = jnp.take_along_axis(p[:, :G], drafts[..., None], axis=-1)[..., 0]  # [B, G]
  q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(key_accept, (B, G))
  accept = u * q_d < p_d  # u < p/q without dividing (q_d > 0 for a sampled draft)
  n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # leading accepts
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
  q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_G = 0: bonus = p_G
  q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_n - q_n, 0.0)
  mass = residual.sum(-1, keepdims=True)
  # mass == 0 only where rejection had probability 0, i.e. never on a rejection path.
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_n)
  next_token = jax.random.categorical(key_next, jnp.log(residual), axis=-1)
  return n.astype(jnp.int32), next_token.astype(jnp.int32)
