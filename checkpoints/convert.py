r"""Converts a model (GGUF, Hugging Face directory or a name) to a specjax checkpoint.

  python -m checkpoints.convert --source=smollm2-135m \
      --out=checkpoints/store/smollm2-135m [--param_dtype=bfloat16] [--overwrite]

The result is an orbax checkpoint of the params plus ``specjax_config.json`` and the
tokenizer's files; ``specjax.loading.load_model(out)`` loads it back, without the
GGUF's dequantization or metadata parsing.
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax

from specjax import loading
from specjax import params as params_lib

_SOURCE = flags.DEFINE_string(
    "source", None, "'smollm2-135m', a .gguf file, a Hugging Face Llama directory or a"
    " specjax checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Checkpoint directory to write, e.g."
                           " checkpoints/store/smollm2-135m.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"],
                                 "Storage dtype of the saved weights.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32",
                                   ["float32", "bfloat16", "float16"],
                                   "Activation dtype recorded in the saved config.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None,
                                    "Cap the context length recorded in the config.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint.")

flags.mark_flags_as_required(["source", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO.
  start = time.perf_counter()
  model = loading.load_model(_SOURCE.value, param_dtype=_PARAM_DTYPE.value,
                             compute_dtype=_COMPUTE_DTYPE.value,
                             max_seq_len=_MAX_SEQ_LEN.value)
  loaded = time.perf_counter()
  loading.save_checkpoint(_OUT.value, model, overwrite=_OVERWRITE.value)
  saved = time.perf_counter()
  n = sum(x.size for x in jax.tree.leaves(model.params))
  print(f"{model.config.name}: {n / 1e6:.1f}M params,"
        f" {params_lib.param_bytes(model.config) / 2**20:.0f} MiB in {_PARAM_DTYPE.value},"
        f" tokenizer {'saved' if model.tokenizer is not None else 'absent'}")
  print(f"loaded in {loaded - start:.1f} s, saved to {_OUT.value} in {saved - loaded:.1f} s")


if __name__ == "__main__":
  app.run(main)
