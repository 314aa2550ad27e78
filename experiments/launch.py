r"""specjax experiment launcher: decoding throughput on real long text.

With no flags it runs the default job: SmolLM2-135M-Instruct on Python standard-library
source code, batch {1, 8} x context {1k, 4k, 8k}, autoregressive greedy decoding, and
prints tokens/s next to the memory-bandwidth roofline measured in the same run::

  python -m experiments.launch
  python -m experiments.launch --batch=1,4,16 --context=2048 --new_tokens=64 \
      --out=experiments/results/ar.json --profile_dir=/tmp/prof

Every cell decodes ``new_tokens`` per row after a prompt of ``context - new_tokens``
tokens, so rows end at exactly ``context`` tokens (8192 fills SmolLM2's window). The
text is prefilled once at the longest prompt (causal attention makes its prefix a valid
cache for every shorter prompt) for ``distinct_rows``
different texts, which are then tiled over the batch. Decoding time does not depend on
the text for autoregressive decoding; speculative methods should raise
``--distinct_rows`` so acceptance varies across rows.

Roofline: one decode step must read every weight once plus each row's valid KV cache;
``roofline tok/s = batch / (bytes per step / bandwidth)`` with the bandwidth measured at
start-up (``experiments/bandwidth.py``). The fraction is measured / roofline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bandwidth, plotting, workloads
from specjax import cost_model, drafts, engine, kv_cache, loading, memory, sampling, sequoia
from specjax import sharding
from specjax.tree import TokenTree

_MODEL = flags.DEFINE_string("model", "smollm2-135m",
                             "smollm2-135m, a .gguf path, an HF directory or a checkpoint.")
_METHODS = flags.DEFINE_list("method", ["autoregressive"],
                             f"Decoding methods to compare; one of {engine.METHODS}."
                             " Autoregressive is always measured first as the baseline.")
_GAMMA = flags.DEFINE_list("gamma", ["4"],
                           "Draft lengths to compare (speculative methods); 'auto' = the"
                           " engine's cost-model choice per context bucket among"
                           f" {engine.AUTO_GAMMAS}.")
_TREE = flags.DEFINE_list("tree", ["16"],
                          "sequoia: tree sizes (root included) to compare; 'auto' = the"
                          " engine's cost-model choice per context bucket among optimal"
                          f" trees of sizes {engine.AUTO_TREE_SIZES} and plain decoding.")
_TREE_DEPTH = flags.DEFINE_integer("tree_depth", 8, "sequoia: the trees' depth limit.")
_ACCEPTANCE = flags.DEFINE_string("acceptance", None,
                                  "sequoia: a JSON file written by experiments.acceptance,"
                                  " or comma-separated values (default: the library's"
                                  " sequoia.DEFAULT_ACCEPTANCE).")
_DRAFT_KV = flags.DEFINE_list("draft_kv", ["streaming"],
                              "Self-speculation draft KV policies (magicdec, sequoia).")
_SINKS = flags.DEFINE_integer("sinks", 16, "Draft sink positions.")
_WINDOW = flags.DEFINE_integer("window", 512, "Draft prefix budget (sinks included); 0 ="
                                " a full draft cache (magicdec_draft only).")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 4,
                                     "magicdec_draft: the draft is the target's first N"
                                     " layers + its head (drafts.truncated_draft).")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_CONTEXT = flags.DEFINE_list("context", ["1024", "4096", "8192"],
                             "Context lengths: tokens per row at the end of decoding"
                             " (prompt = context - new_tokens).")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row in each cell.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Weights and compute; auto = float32 on CPU, bfloat16 on GPU/TPU.")
_ATTENTION = flags.DEFINE_enum("attention_impl", "auto", ["auto", "pallas", "xla"],
                               "Attention: the Pallas kernel on GPU/TPU with auto (XLA on"
                               " CPU), or forced (pallas is interpreted on CPU).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p sampling (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DISTINCT = flags.DEFINE_integer("distinct_rows", 1,
                                 "Different texts prefilled and tiled over the batch.")
_CHUNK = flags.DEFINE_integer("prefill_chunk", engine.DEFAULT_PREFILL_CHUNK,
                              "Prefill chunk length.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per cell, interleaved across the"
                                " methods (the best is kept; the spread of the runs is"
                                " the cell's noise figure).")
_COMPACT = flags.DEFINE_bool("compact_batch", True, "Drop finished rows from the batch as"
                             " they finish (engine.decode's compact_batch).")
_MESH = flags.DEFINE_list("mesh", [], "data,model mesh shape, e.g. 1,8 (default: none).")
_PROFILE = flags.DEFINE_string("profile_dir", None,
                               "Capture an XLA trace (jax.profiler) of the decode runs.")
_OUT = flags.DEFINE_string("out", None, "Write results JSON here (and a .md table beside).")


@dataclasses.dataclass
class Cell:
  method: str
  batch: int
  context: int
  new_tokens: int
  compile_s: float
  decode_s: float
  steps: int
  tokens_per_s: float
  step_ms: float
  bytes_per_step: float
  roofline_tokens_per_s: float
  roofline_fraction: float
  speedup: float | None = None
  mean_accepted: float | None = None
  acceptance_rate: float | None = None  # per-token alpha inverted from mean_accepted
  predicted_speedup: float | None = None  # cost model, calibrated in the same run
  auto_choice: str | None = None  # the cost model's pick: "g<gamma>" or "n<size>d<depth>"
  segments: list | None = None  # (kv_limit, drafts/round, rounds) per decode loop (auto)
  decode_s_runs: list | None = None  # every timed run's decode seconds (the best is kept)
  spread: float | None = None  # slowest run / fastest - 1: the cell's noise figure


def _tile_and_trim(cache: kv_cache.KVCache, batch: int, size: int, prompt: int):
  """A cache of ``batch`` rows (cycling over the prefilled ones) and ``size`` slots,
  with every row's length set to ``prompt``."""
  rows = jnp.arange(batch) % cache.batch
  return kv_cache.KVCache(k=jnp.take(cache.k, rows, axis=1)[:, :, :, :size],
                          v=jnp.take(cache.v, rows, axis=1)[:, :, :, :size],
                          lengths=jnp.full((batch,), prompt, jnp.int32))


def interleaved_runs(methods, repeats: int, run) -> dict[str, list]:
  """``run(method)`` for every method, then again, ``repeats`` times: method -> its
  results in order. This machine's speed drifts over minutes; back-to-back repeats of
  one method would hand the drift to whichever method ran in the fast minutes."""
  results: dict[str, list] = {method: [] for method in methods}
  for _ in range(repeats):
    for method in methods:
      results[method].append(run(method))
  return results


def run_grid(model, batches, contexts, specs, new_tokens, sp, distinct_rows, mesh,
             bw_gbps, repeats, prefill_chunk, draft=None, auto=None,
             acceptance=sequoia.DEFAULT_ACCEPTANCE, on_bucket=None) -> list[Cell]:
  """Measure every (batch, context, method) cell.

  Args:
    specs: label -> SpecConfig; "autoregressive" (gamma 0) must come first, it is the
      baseline each cell's speedup is measured against.
    draft: the draft model of the specs with a ``draft_cfg``, or None.
    auto: label -> the trees ``gamma="auto"`` / ``tree="auto"`` chooses among (their
      spec is the draft template).
    acceptance: the positional acceptance vector the sequoia trees were built for.
    on_bucket: called with the cells so far after each (batch, context) bucket (to
      write partial results of a long grid).
  """
  cfg = model.config
  if min(contexts) <= new_tokens:
    raise ValueError(f"every context must exceed new_tokens={new_tokens}; got {contexts}.")
  max_prompt = max(contexts) - new_tokens
  texts = workloads.stdlib_prompts(model.tokenizer, distinct_rows, max_prompt + 1)
  full_size = engine.plan_cache_size(cfg, [max_prompt], np.array([new_tokens]), None)
  memory.check_fits(cfg, max(batches), full_size, prefill_chunk)
  params = model.params if mesh is None else sharding.shard_params(model.params, cfg, mesh)
  draft_params = None
  if draft is not None:
    draft_params = draft.params if mesh is None else sharding.shard_params(
        draft.params, draft.config, mesh)
  cache = kv_cache.init_cache(cfg, distinct_rows, full_size)
  t0 = time.perf_counter()
  cache, _, compile_s = engine.prefill(params, cfg, cache, [t[:max_prompt] for t in texts],
                                       chunk=prefill_chunk, mesh=mesh)
  jax.block_until_ready(cache)
  prefill_s = time.perf_counter() - t0 - compile_s
  logging.info("prefilled %d x %d tokens in %.1fs (%.0f tok/s)", distinct_rows, max_prompt,
               prefill_s, distinct_rows * max_prompt / prefill_s)
  cells = []
  for batch in batches:
    for context in sorted(contexts):
      prompt = context - new_tokens
      size = engine.plan_cache_size(cfg, [prompt], np.array([new_tokens]), None)
      memory.check_fits(cfg, batch, size, 1)
      first = jnp.asarray([texts[b % distinct_rows][prompt] for b in range(batch)])
      prompts = [texts[b % distinct_rows][:prompt] for b in range(batch)]  # SnapKV, drafts

      def run(method):
        view = _tile_and_trim(cache, batch, size, prompt)
        if mesh is not None:
          view = jax.device_put(view, sharding.cache_shardings(cfg, batch, size, mesh))
        with jax.profiler.TraceAnnotation(f"{method}_b{batch}_s{context}"):
          res = engine.decode(params, cfg, view, first,
                              max_new=np.full((batch,), new_tokens, np.int32), sp=sp,
                              spec=specs[method], key=jax.random.key(_SEED.value),
                              mesh=mesh, prompts=prompts,
                              draft_params=draft_params if specs[method].draft_cfg else None,
                              auto=auto.get(method),
                              acceptance=_prior(specs[method], acceptance),
                              compact_batch=_COMPACT.value)
        del view, res.cache
        return res

      results = interleaved_runs(specs, repeats, run)
      baseline = None
      for method in specs:
        runs = [res.run_s for res in results[method]]
        best = min(results[method], key=lambda res: res.run_s)
        generated = int(best.num.sum()) - batch  # the first token came from the text
        tps = generated / best.run_s
        nbytes = bandwidth.step_bytes(cfg, batch, prompt, new_tokens)
        roof = batch * bw_gbps * 1e9 / nbytes
        cell = Cell(method=method, batch=batch, context=context, new_tokens=new_tokens,
                    compile_s=best.compile_s, decode_s=best.run_s, steps=best.steps,
                    tokens_per_s=tps, step_ms=1e3 * best.run_s / max(best.steps, 1),
                    bytes_per_step=nbytes, roofline_tokens_per_s=roof,
                    roofline_fraction=tps / roof,
                    mean_accepted=best.tokens_per_round, decode_s_runs=runs,
                    spread=max(runs) / min(runs) - 1)
        if method in auto:
          cell.segments = best.segments
          cell.auto_choice = _most_used(best.segments, specs[method])
        if method == "autoregressive":
          baseline = tps
        cell.speedup = tps / baseline
        cells.append(cell)
        logging.info("%s", cell)
      _predict(params, cfg, batch, context, specs, cells[-len(specs):], auto, draft_params,
               acceptance)
      if on_bucket is not None:
        on_bucket(cells)
  return cells


def _prior(spec: drafts.SpecConfig, acceptance) -> tuple[float, ...]:
  """The acceptance vector a method starts from: a chain's rate, or a tree's vector."""
  return tuple(acceptance) if spec.tree is not None else (0.7,)


def shape_label(tree: TokenTree) -> str:
  if tree.size == 1 or tree == TokenTree.chain(tree.size - 1):
    return f"g{tree.size - 1}"
  return f"n{tree.size}d{tree.max_depth}"


def _most_used(segments, spec: drafts.SpecConfig) -> str:
  rounds: dict[int, int] = {}
  for _, drafted, r in segments:
    rounds[drafted] = rounds.get(drafted, 0) + r
  drafted = max(rounds, key=rounds.get)
  return f"g{drafted}" if spec.tree is None or drafted == 0 else f"n{drafted + 1}"


def _predict(params, cfg, batch, context, specs, cells, auto, draft_params, acceptance):
  """Calibrate the cost model for this bucket; fill predicted speedups and the auto pick.

  Per draft policy and kind (chains; trees), the acceptance is fitted to the smallest
  shape's measured tokens per round (rank 0 of the vector; a chain's rate) and every
  other shape of the group is predicted from it; the pick is the shape (or plain
  decoding) the model predicts fastest.
  """
  groups: dict[tuple, list[Cell]] = {}
  for cell in cells:
    spec = specs[cell.method]
    if spec.speculative and cell.method not in auto:
      groups.setdefault((spec.draft_kv, spec.draft_cfg, spec.tree is None), []).append(cell)
  size = engine.plan_cache_size(cfg, [context - cells[0].new_tokens],
                                np.array([cells[0].new_tokens]), None)
  for key, group in groups.items():
    shapes = [specs[c.method].shape for c in group]
    timings = cost_model.calibrate(params, cfg, batch, size, [TokenTree.chain(0)] + shapes,
                                   specs[group[0].method],
                                   draft_params=draft_params if key[1] else None)
    probe = min(group, key=lambda c: specs[c.method].shape.size)
    prior = _prior(specs[probe.method], acceptance)
    fitted = cost_model.fit_first_rank(specs[probe.method].shape, prior, probe.mean_accepted)
    pick = cost_model.choose(timings, fitted, [TokenTree.chain(0)] + shapes)
    for cell in group:
      shape = specs[cell.method].shape
      cell.acceptance_rate = cost_model.fit_first_rank(shape, prior, cell.mean_accepted)[0]
      cell.predicted_speedup = timings.predicted_speedup(shape, fitted)
      cell.auto_choice = shape_label(pick)
    logging.info("cost model b=%d s=%d %s: accept=%s timings=%s -> %s", batch, context,
                 key[0], fitted, timings, shape_label(pick))


def plot_speedups(cells: list[Cell], path: pathlib.Path) -> bool:
  """Speedup vs batch, one line per context length, one panel per speculative method."""
  methods = [m for m in dict.fromkeys(c.method for c in cells) if m != "autoregressive"]
  if not methods:
    return False
  plotting.speedup_panels(
      {m: {f"context {s}": [(c.batch, c.speedup) for c in cells
                            if c.method == m and c.context == s]
           for s in sorted({c.context for c in cells if c.method == m})} for m in methods},
      path)
  return True


def format_table(cells: list[Cell]) -> str:
  head = ("| method | batch | context | tok/s | step ms | speedup vs AR | predicted |"
          " tokens/step/row | alpha | cost-model pick | roofline tok/s | roofline fraction |"
          " repeat spread |")
  lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  fmt = lambda x, f: "-" if x is None else format(x, f)
  for c in cells:
    lines.append(f"| {c.method} | {c.batch} | {c.context} | {c.tokens_per_s:.1f} |"
                 f" {c.step_ms:.1f} | {c.speedup:.2f}x | {fmt(c.predicted_speedup, '.2f')} |"
                 f" {c.mean_accepted:.2f} | {fmt(c.acceptance_rate, '.2f')} |"
                 f" {c.auto_choice or '-'} | {c.roofline_tokens_per_s:.1f} |"
                 f" {100 * c.roofline_fraction:.1f}% |"
                 f" {'-' if c.spread is None else format(100 * c.spread, '.0f') + '%'} |")
  return "\n".join(lines)


def adaptive_vs_fixed(cells: list[Cell], auto) -> list[dict]:
  """Per (batch, context) and ``auto`` method: its throughput over the best fixed
  choice's in the bucket (every other method, plain decoding included), and the noise:
  the larger repeat spread of the two cells."""
  rows = []
  for b, s in dict.fromkeys((c.batch, c.context) for c in cells):
    bucket = [c for c in cells if (c.batch, c.context) == (b, s)]
    fixed = [c for c in bucket if c.method not in auto]
    for a in (c for c in bucket if c.method in auto):
      best = max(fixed, key=lambda c: c.tokens_per_s)
      rows.append(dict(batch=b, context=s, adaptive=a.method, adaptive_tokens_per_s=a.tokens_per_s,
                       choice=a.auto_choice, best_fixed=best.method,
                       best_fixed_tokens_per_s=best.tokens_per_s,
                       ratio=a.tokens_per_s / best.tokens_per_s,
                       noise=max(a.spread or 0.0, best.spread or 0.0)))
  return rows


def format_adaptive(rows: list[dict]) -> str:
  lines = ["| batch | context | adaptive | most used | tok/s | best fixed | tok/s | ratio |"
           " noise (repeat spread) | within noise |",
           "|---:|---:|---|---|---:|---|---:|---:|---:|---|"]
  for r in rows:
    ok = r["ratio"] >= 1 - r["noise"]
    lines.append(f"| {r['batch']} | {r['context']} | {r['adaptive']} | {r['choice']} |"
                 f" {r['adaptive_tokens_per_s']:.1f} | {r['best_fixed']} |"
                 f" {r['best_fixed_tokens_per_s']:.1f} | {r['ratio']:.2f} |"
                 f" {100 * r['noise']:.0f}% | {'yes' if ok else 'no'} |")
  return "\n".join(lines)


def load_acceptance(value: str | None) -> tuple[float, ...]:
  """--acceptance: a JSON file from experiments.acceptance, or comma-separated values."""
  if not value:
    return tuple(sequoia.DEFAULT_ACCEPTANCE)
  if os.path.exists(value):
    return tuple(json.loads(pathlib.Path(value).read_text())["accept"])
  try:
    return tuple(float(x) for x in value.split(","))
  except ValueError:
    raise app.UsageError(f"--acceptance={value}: not a file nor comma-separated numbers.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  on_cpu = jax.devices()[0].platform == "cpu"
  dtype = _DTYPE.value if _DTYPE.value != "auto" else ("float32" if on_cpu else "bfloat16")
  batches = [int(b) for b in _BATCH.value]
  contexts = [int(c) for c in _CONTEXT.value]
  specs = {"autoregressive": engine.spec_config("autoregressive")}
  auto: dict[str, tuple[TokenTree, ...]] = {}
  for g in _GAMMA.value:
    if g != "auto" and not (g.isdigit() and int(g) >= 1):
      raise app.UsageError(f"--gamma={g}: pass integers >= 1 or 'auto'.")
  for n in _TREE.value:
    if n != "auto" and not (n.isdigit() and int(n) >= 2):
      raise app.UsageError(f"--tree={n}: pass sizes >= 2 or 'auto'.")
  acceptance = load_acceptance(_ACCEPTANCE.value)
  chains = tuple(TokenTree.chain(g) for g in engine.AUTO_GAMMAS)
  trees = engine.auto_trees(acceptance, max_depth=_TREE_DEPTH.value)
  for m in _METHODS.value:
    if m not in engine.METHODS:
      raise app.UsageError(f"--method={m}; available: {', '.join(engine.METHODS)}")
    if m in ("autoregressive", "magicdec_draft"):  # the draft needs the loaded model
      continue
    for kv in _DRAFT_KV.value:
      common = dict(draft_kv=kv, sinks=_SINKS.value, window=_WINDOW.value)
      if m == "magicdec":
        for g in _GAMMA.value:
          label = f"{m}/{kv}/g{g}"
          specs[label] = engine.spec_config(
              m, gamma=max(engine.AUTO_GAMMAS) if g == "auto" else int(g), **common)
          if g == "auto":
            auto[label] = chains
      else:  # sequoia
        for n in _TREE.value:
          label = f"{m}/{kv}/n{n}"
          tree = max(trees, key=lambda t: t.size) if n == "auto" else sequoia.optimal_tree(
              int(n), _TREE_DEPTH.value, acceptance)
          specs[label] = engine.spec_config(m, tree=tree, **common)
          if n == "auto":
            auto[label] = trees
  mesh = sharding.make_mesh(*[int(x) for x in _MESH.value]) if _MESH.value else None
  sp = sampling.SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)

  bw = bandwidth.measure()
  print(f"memory bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s"
        f" -> roofline {bw['roofline_gbps']:.1f} GB/s")
  t0 = time.perf_counter()
  model = loading.load_model(_MODEL.value, param_dtype=dtype, compute_dtype=dtype)
  model = dataclasses.replace(model, config=dataclasses.replace(
      model.config, attention_impl=_ATTENTION.value))
  print(f"loaded {model.config.name} ({dtype}, attention {_ATTENTION.value}) in"
        f" {time.perf_counter() - t0:.1f}s")
  draft = None
  if "magicdec_draft" in _METHODS.value:
    draft = drafts.truncated_draft(model, _DRAFT_LAYERS.value)
    for g in _GAMMA.value:
      label = f"magicdec_draft/L{_DRAFT_LAYERS.value}/g{g}"
      specs[label] = engine.spec_config(
          "magicdec_draft", gamma=max(engine.AUTO_GAMMAS) if g == "auto" else int(g),
          sinks=_SINKS.value, window=_WINDOW.value or None, draft_cfg=draft.config)
      if g == "auto":
        auto[label] = tuple(t for t in chains if t.max_depth)

  meta = {"command": "python -m experiments.launch " + " ".join(sys.argv[1:]),
          "methods": {label: dataclasses.asdict(spec) for label, spec in specs.items()},
          "acceptance": acceptance,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": bandwidth.machine_description(), "model": model.config.name,
          "dtype": dtype, "sampling": dataclasses.asdict(sp), "bandwidth": bw,
          "distinct_rows": _DISTINCT.value, "repeats": _REPEATS.value}
  write = None
  if _OUT.value:
    write = lambda cells: write_results(pathlib.Path(_OUT.value), meta, cells, auto)
  if _PROFILE.value:
    jax.profiler.start_trace(_PROFILE.value)
  try:
    cells = run_grid(model, batches, contexts, specs, _NEW.value, sp,
                     _DISTINCT.value, mesh, bw["roofline_gbps"], _REPEATS.value,
                     _CHUNK.value, draft=draft, auto=auto, acceptance=acceptance,
                     on_bucket=write)
  finally:
    if _PROFILE.value:
      jax.profiler.stop_trace()
      print(f"XLA trace written under {_PROFILE.value} (open with xprof or TensorBoard)")

  print(format_table(cells))
  if auto:
    print(format_adaptive(adaptive_vs_fixed(cells, auto)))
  if write is not None:
    out = write(cells)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if plot_speedups(cells, out.with_suffix(".png")):
      print(f"wrote {out.with_suffix('.png')}")


def write_results(out: pathlib.Path, meta: dict, cells: list[Cell], auto) -> pathlib.Path:
  """The JSON (meta + cells) and a Markdown table beside it; rewritten after every bucket
  of the grid, so an interrupted run keeps what it measured."""
  out.parent.mkdir(parents=True, exist_ok=True)
  adaptive = adaptive_vs_fixed(cells, auto)
  out.write_text(json.dumps({**meta, "cells": [dataclasses.asdict(c) for c in cells],
                             "adaptive_vs_fixed": adaptive}, indent=1))
  bw = meta["bandwidth"]
  md = [f"# {meta['model']}: {', '.join(dict.fromkeys(c.method for c in cells))}", "",
        f"- command: `{meta['command']}`", f"- date: {meta['date']}",
        f"- machine: {meta['machine']['device']}; {meta['machine']['cpu']};"
        f" jax {meta['machine']['jax']}",
        f"- dtype: {meta['dtype']}; bandwidth read {bw['read_gbps']:.1f} GB/s, copy"
        f" {bw['copy_gbps']:.1f} GB/s (roofline uses {bw['roofline_gbps']:.1f})", "",
        format_table(cells), ""]
  if adaptive:
    md += ["Adaptive choice against the best fixed choice of its bucket (best of"
           f" {meta['repeats']} runs each, interleaved across the methods; noise: the larger"
           " slowest/fastest - 1 of the two cells' runs):", "", format_adaptive(adaptive), ""]
  out.with_suffix(".md").write_text("\n".join(md))
  return out


if __name__ == "__main__":
  app.run(main)
