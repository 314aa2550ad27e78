"""specjax: speculative decoding in JAX for the high-throughput, long-context regime.

Public entry points::

  model = specjax.load_model("smollm2-135m")          # or a .gguf / HF dir / checkpoint
  out = specjax.generate(model, ["def fib(n):"], max_new_tokens=64)
  logits = specjax.logits(model, token_ids)           # f32[T, V], for parity checks
"""

from specjax.config import ModelConfig, RopeScaling, tiny_config
from specjax.engine import GenerateOutput, GenerateStats, generate, logits
from specjax.loading import Model, load_model, save_checkpoint
from specjax.sampling import SamplingParams

__all__ = [
    "GenerateOutput", "GenerateStats", "Model", "ModelConfig", "RopeScaling",
    "SamplingParams", "generate", "load_model", "logits", "save_checkpoint", "tiny_config",
]
