r"""Measure the positional acceptance vector of a draft on real text (Sequoia §3.1).

The target continues standard-library source prompts (greedy or sampled, as the
flags say); at each generated position the draft (the target over its streaming or
SnapKV budget) proposes ``width`` ranked children and the engine's verifier accepts
one or none. ``accept[r]`` = accepted / tried at rank r is what
``specjax.sequoia.optimal_tree`` (and ``generate(method="sequoia", acceptance=...)``)
takes::

  python -m experiments.acceptance --out=experiments/results/acceptance_smollm2.json

One forward per side scores all generated positions: the target over the prompt +
generated tokens, the draft with its prefix restricted to the budget. The generated
tokens see each other in full, as a draft's own tokens do in a round; with
``new_tokens`` <= the recent window they are inside the draft's window anyway.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bandwidth, workloads
from specjax import drafts, engine, kv_cache, loading, model as model_lib, sampling, sequoia

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model name or path (see launch).")
_DRAFT_KV = flags.DEFINE_enum("draft_kv", "streaming", list(drafts.DRAFT_KV_POLICIES),
                              "Self-speculation draft policy.")
_SINKS = flags.DEFINE_integer("sinks", 16, "Draft sink positions.")
_WINDOW = flags.DEFINE_integer("window", 512, "Draft prefix budget (sinks included).")
_WIDTH = flags.DEFINE_integer("width", 8, "Children per position: the vector's length.")
_ROWS = flags.DEFINE_integer("rows", 8, "Different prompts.")
_PROMPT = flags.DEFINE_integer("prompt_len", 2048, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated positions measured per row.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Write the vector and its counts (JSON) here.")


def measure(model, spec: drafts.SpecConfig, prompts: list[list[int]], new_tokens: int,
            width: int, sp: sampling.SamplingParams, seed: int):
  """(accept f64[width], tried i64[width]) over every generated position of every row."""
  cfg = model.config
  gen = engine.generate(model, prompts, max_new_tokens=new_tokens, temperature=sp.temperature,
                        top_k=sp.top_k, top_p=sp.top_p, seed=seed, eos_ids=())
  B, P = len(prompts), len(prompts[0])
  size = engine.plan_cache_size(cfg, [P], np.array([new_tokens]), None)
  cache, _, _ = engine.prefill(model.params, cfg, kv_cache.init_cache(cfg, B, size), prompts)
  # Position t's input is the token before it: the last prompt token, then generated.
  inputs = jnp.asarray([[p[-1]] + g[:-1] for p, g in zip(prompts, gen.tokens)])
  view = dataclasses.replace(cache, lengths=cache.lengths - 1)  # re-run the last prompt token
  prefix_idx = None
  if spec.draft_kv == "snapkv":
    tail, tail_n = drafts.prompt_tails(prompts, spec.prompt_tail, cfg.pad_id)
    prefix_idx = drafts.init_state(spec, model.params, cfg, cache, jnp.asarray(tail),
                                   jnp.asarray(tail_n)).prefix_idx
  forward = jax.jit(lambda params, cache, tokens, window, idx: model_lib.forward(
      params, cfg, tokens, cache, window=window, prefix_idx=idx)[0], static_argnums=3)
  target = forward(model.params, view, inputs, None, None)
  draft = forward(model.params, view, inputs, spec.prefix_window, prefix_idx)
  V = cfg.vocab_size
  ranks, accepted = sequoia.acceptance_events(jax.random.key(seed), target.reshape(-1, V),
                                              draft.reshape(-1, V), width, sp)
  tried = np.bincount(ranks, minlength=width)
  return sequoia.estimate_acceptance_vector(ranks, accepted, width), tried


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model = loading.load_model(_MODEL.value)
  spec = engine.spec_config("magicdec", gamma=1, draft_kv=_DRAFT_KV.value, sinks=_SINKS.value,
                            window=_WINDOW.value)
  sp = sampling.SamplingParams(temperature=_TEMPERATURE.value)
  prompts = workloads.stdlib_prompts(model.tokenizer, _ROWS.value, _PROMPT.value)
  accept, tried = measure(model, spec, prompts, _NEW.value, _WIDTH.value, sp, _SEED.value)
  print("rank      " + " ".join(f"{r:6d}" for r in range(len(accept))))
  print("accept    " + " ".join(f"{a:6.3f}" for a in accept))
  print("tried     " + " ".join(f"{t:6d}" for t in tried))
  print("m (rank r is the accepted child) " +
        " ".join(f"{m:.3f}" for m in sequoia.rank_probabilities(accept)))
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m experiments.acceptance " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": bandwidth.machine_description(), "model": model.config.name,
        "draft": dataclasses.asdict(spec), "sampling": dataclasses.asdict(sp),
        "rows": _ROWS.value, "prompt_len": _PROMPT.value, "new_tokens": _NEW.value,
        "accept": accept.tolist(), "tried": tried.tolist()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
