r"""SuffixDecoding benchmark: model-free drafts vs autoregressive, n-gram lookup, MagicDec.

For each workload (``experiments.workloads``: code editing, an agentic stream, open
chat) and batch size, the same requests are decoded greedily by every method and the
tokens are checked equal to the autoregressive ones (lossless, so any mismatch is a
bug and aborts). Printed per cell: tokens/s, the speedup over autoregressive, over
n-gram prompt lookup and over MagicDec measured in the same run, tokens per target
forward (mean accepted length), the host's lookup + index-update time per row per
round (p50 / p99, microseconds) next to the device round time, the suffix index's
bytes per cached token, and the fraction of the memory-bandwidth roofline::

  python -m experiments.suffix_bench
  python -m experiments.suffix_bench --workload=code_edit --batch=1,8,32 \
      --new_tokens=128 --out=experiments/results/suffix_cpu.json

A stream: ``--warm`` earlier requests of the workload are decoded first (untimed) and
their outputs fed to the suffix decoders' global index, as a server would have seen
them; then the timed batches, at least ``--requests`` requests in all, one batch after
another (so batch 1 is not one request's luck). ``--warm=0`` measures the per-request
index alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import sys

from absl import app, flags, logging
import numpy as np

from experiments import bandwidth, plotting, workloads
from specjax import engine, loading, ngram, suffix_index

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A model load_model accepts.")
_WORKLOADS = flags.DEFINE_list("workload", ["code_edit", "agentic", "chat"],
                               "Workloads (experiments.workloads).")
_METHODS = flags.DEFINE_list("method", ["ngram", "suffix", "magicdec", "hybrid"],
                             "Methods besides the autoregressive baseline (always run).")
_BATCH = flags.DEFINE_list("batch", ["1", "8", "32"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per request.")
_REQUESTS = flags.DEFINE_integer("requests", 8, "Timed requests per cell at least: batches"
                                  " of the cell's size run one after another (a stream).")
_WARM = flags.DEFINE_integer("warm", 16, "Earlier requests whose outputs fill the global"
                             " suffix index before the timed batch.")
_GAMMA = flags.DEFINE_integer("gamma", 3, "MagicDec / hybrid self-draft chain length.")
_WINDOW = flags.DEFINE_integer("window", 256, "MagicDec draft KV budget (sinks included).")
_SIZING = flags.DEFINE_enum("sizing", "auto", ["auto", "longest"],
                            "Host drafts' verify size per round (engine.decode_host).")
_TREE = flags.DEFINE_bool("tree", False, "Suffix drafts as best-first trees (else paths).")
_ALPHA = flags.DEFINE_float("alpha", suffix_index.SuffixConfig.alpha,
                            "Suffix drafts: at most alpha * match_len + offset tokens.")
_OFFSET = flags.DEFINE_float("offset", suffix_index.SuffixConfig.offset, "See --alpha.")
_COMPACT = flags.DEFINE_bool("compact_batch", True, "Drop finished rows from the batch"
                             " as they finish, every method alike (generate's compact_batch).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_OUT = flags.DEFINE_string("out", None, "Write results JSON here (and .md, .png beside).")


@dataclasses.dataclass
class Cell:
  workload: str
  method: str
  batch: int
  prompt_tokens: float  # mean per row
  tokens_per_s: float
  decode_s: float
  steps: int
  tokens_per_forward: float  # mean tokens a generating row gains per target forward
  speedup: float = 1.0  # vs autoregressive
  vs_ngram: float | None = None
  vs_magicdec: float | None = None
  host_us_p50: float | None = None  # host drafting + index update, per row per round
  host_us_p99: float | None = None
  device_ms_p50: float | None = None  # device round time
  host_rows: int | None = None  # row-rounds drafted on the host / by the model (hybrid)
  model_rows: int | None = None
  index_bytes_per_token: float | None = None
  roofline_fraction: float | None = None


def _requests(name: str, n: int, seed: int):
  make = {"code_edit": workloads.code_edit_requests, "agentic": workloads.agentic_requests,
          "chat": workloads.chat_requests}
  if name not in make:
    raise app.UsageError(f"--workload={name}; available: {', '.join(make)}.")
  return make[name](n, seed=seed)


def _decoder(tree: bool, warm_prompts, warm_outputs) -> suffix_index.SuffixDecoder:
  """A suffix decoder whose global index has seen the warm-up requests."""
  dec = suffix_index.SuffixDecoder(suffix_index.SuffixConfig(
      tree=tree, alpha=_ALPHA.value, offset=_OFFSET.value))
  for i, (p, o) in enumerate(zip(warm_prompts, warm_outputs)):
    dec.start(f"warm{i}", p)
    dec.extend(f"warm{i}", o)
    dec.finish(f"warm{i}")
  return dec


def run_cell(model, name: str, batch: int, methods, bw_gbps: float) -> list[Cell]:
  cfg = model.config
  n_batches = max(1, -(-_REQUESTS.value // batch))
  reqs = workloads.encode_requests(
      model.tokenizer, _requests(name, _WARM.value + n_batches * batch, _SEED.value))
  warm, timed = reqs[:_WARM.value], reqs[_WARM.value:]
  common = dict(max_new_tokens=_NEW.value, temperature=0.0, compact_batch=_COMPACT.value)
  warm_out = []
  for i in range(0, len(warm), 16):
    warm_out += engine.generate(model, warm[i:i + 16], **common).tokens
  cells, ref = [], None
  mean_prompt = float(np.mean([len(p) for p in timed]))
  for method in ["autoregressive"] + list(methods):
    kw = dict(method=method)
    if method in ("magicdec", "hybrid"):
      kw.update(gamma=_GAMMA.value, window=_WINDOW.value)
    if method in ("suffix", "hybrid"):
      kw.update(proposer=_decoder(_TREE.value, warm, warm_out), host_sizing=_SIZING.value)
    if method == "ngram":
      kw.update(proposer=ngram.NgramProposer(), host_sizing=_SIZING.value)
    runs = [engine.generate(model, timed[i:i + batch], **common, **kw)
            for i in range(0, len(timed), batch)]  # one stream: a proposer keeps learning
    tokens = [t for out in runs for t in out.tokens]
    if ref is None:
      ref = tokens
    elif tokens != ref:
      bad = next(b for b in range(len(ref)) if tokens[b] != ref[b])
      raise RuntimeError(f"{method} on {name} (batch {batch}) differs from autoregressive"
                         f" at request {bad}: lossless speculation is broken.")
    decode_s = sum(o.stats.decode_s for o in runs)
    generated = sum(o.stats.new_tokens - o.stats.batch for o in runs)
    row_rounds = sum((o.stats.new_tokens - o.stats.batch) / o.stats.tokens_per_round
                     for o in runs)
    tps = generated / decode_s
    nbytes = bandwidth.step_bytes(cfg, batch, int(mean_prompt), _NEW.value)
    cell = Cell(workload=name, method=method, batch=batch, prompt_tokens=mean_prompt,
                tokens_per_s=tps, decode_s=decode_s,
                steps=sum(o.stats.decode_steps for o in runs),
                tokens_per_forward=generated / row_rounds,
                roofline_fraction=tps / (batch * bw_gbps * 1e9 / nbytes))
    hosts = [o.stats.host for o in runs if o.stats.host is not None]
    if hosts:
      host_us = 1e6 * np.concatenate([h.host_s_per_row for h in hosts])
      cell.host_us_p50, cell.host_us_p99 = (float(np.percentile(host_us, q)) for q in (50, 99))
      cell.device_ms_p50 = float(1e3 * np.median(np.concatenate([h.device_s for h in hosts])))
      cell.host_rows = sum(h.host_rows for h in hosts)
      cell.model_rows = sum(h.model_rows for h in hosts)
    if method in ("suffix", "hybrid"):
      s = kw["proposer"].stats()
      cell.index_bytes_per_token = s.get("bytes_per_token")
    cells.append(cell)
    logging.info("%s", cell)
  by = {c.method: c.tokens_per_s for c in cells}
  for c in cells:
    c.speedup = c.tokens_per_s / by["autoregressive"]
    c.vs_ngram = c.tokens_per_s / by["ngram"] if "ngram" in by else None
    c.vs_magicdec = c.tokens_per_s / by["magicdec"] if "magicdec" in by else None
  return cells


def format_table(cells) -> str:
  f = lambda x, spec: "-" if x is None else format(x, spec)
  lines = ["| workload | method | batch | tok/s | speedup vs AR | vs n-gram | vs MagicDec |"
           " tokens/forward | host us/row p50 / p99 | device ms/round | host / model rows |"
           " index B/token | roofline |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for c in cells:
    lines.append(
        f"| {c.workload} | {c.method} | {c.batch} | {c.tokens_per_s:.1f} | {c.speedup:.2f}x |"
        f" {f(c.vs_ngram, '.2f')} | {f(c.vs_magicdec, '.2f')} | {c.tokens_per_forward:.2f} |"
        f" {f(c.host_us_p50, '.0f')} / {f(c.host_us_p99, '.0f')} |"
        f" {f(c.device_ms_p50, '.0f')} |"
        f" {'-' if c.host_rows is None else f'{c.host_rows} / {c.model_rows}'} |"
        f" {f(c.index_bytes_per_token, '.0f')} | {100 * c.roofline_fraction:.1f}% |")
  return "\n".join(lines)


def plot(cells, path: pathlib.Path) -> None:
  """Speedup vs batch, one panel per workload, one line per method."""
  plotting.speedup_panels(
      {w: {m: [(c.batch, c.speedup) for c in cells if c.workload == w and c.method == m]
           for m in dict.fromkeys(c.method for c in cells if c.workload == w)}
       for w in dict.fromkeys(c.workload for c in cells)}, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  bw = bandwidth.measure()
  model = loading.load_model(_MODEL.value)
  cells = []
  for name in _WORKLOADS.value:
    for batch in (int(b) for b in _BATCH.value):
      cells += run_cell(model, name, batch, _METHODS.value, bw["roofline_gbps"])
      write(cells, bw, model)  # after every cell: a long run keeps what it measured
  print(format_table(cells))


def write(cells, bw, model) -> None:
  table = format_table(cells)
  if _OUT.value:
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m experiments.suffix_bench " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": bandwidth.machine_description(), "model": model.config.name,
            "new_tokens": _NEW.value, "warm": _WARM.value, "gamma": _GAMMA.value,
            "window": _WINDOW.value, "sizing": _SIZING.value, "tree": _TREE.value,
            "alpha": _ALPHA.value, "offset": _OFFSET.value, "compact_batch": _COMPACT.value,
            "bandwidth": bw}
    out.write_text(json.dumps({**meta, "cells": [dataclasses.asdict(c) for c in cells]},
                              indent=1))
    md = [f"# SuffixDecoding benchmark ({model.config.name})", "",
          f"- command: `{meta['command']}`", f"- date: {meta['date']}",
          f"- machine: {meta['machine']['device']}; {meta['machine']['cpu']};"
          f" jax {meta['machine']['jax']}",
          f"- greedy, {_NEW.value} new tokens per request, {_WARM.value} warm-up requests in"
          f" the global index; MagicDec/hybrid gamma={_GAMMA.value}, window={_WINDOW.value};"
          f" host sizing {_SIZING.value}; suffix drafts as {'trees' if _TREE.value else 'paths'}"
          f" of at most {_ALPHA.value:g} * match_len + {_OFFSET.value:g} tokens;"
          f" batch compaction {'on' if _COMPACT.value else 'off'}",
          "", table, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    plot(cells, out.with_suffix(".png"))
    logging.info("wrote %s, %s and %s", out, out.with_suffix(".md"), out.with_suffix(".png"))


if __name__ == "__main__":
  app.run(main)
