r"""Tree-attention kernel vs the XLA attention: time, bytes moved, achieved bandwidth.

Meant for a GPU or TPU, where ``pallas_kernels.tree_attention`` runs compiled (Triton
on GPU, Mosaic on TPU). Every cell is one attention call of a decoder layer: ``batch``
rows, each with ``context`` cached positions, ``tree`` new tokens (the ancestor mask of
a binary tree in heap order; 1 = decode), ``gqa`` query heads per KV head::

  python -m experiments.kernel_bench --batch=64 --context=8192 --tree=16
  python -m experiments.kernel_bench --batch=1,16,64 --context=1024,8192 \
      --tree=1,4,16,64 --gqa=1,4,8 --window=16,496

Per cell it checks the kernel against the XLA path (``specjax.attention.attention``,
float32 matmul precision) and reports the time per call of both, the bytes one call
must move (the cache's visible K/V, the queries, new keys/values and the output; the
kernel's partial results are its own overhead and not counted), the achieved GB/s
and its fraction of the HBM copy bandwidth measured in the same run
(``experiments/bandwidth.py``). Results go to ``--out`` (JSON + a .md table beside it;
default ``experiments/results/kernel_bench_<device>.json``), with the device named.

On a CPU the kernel only runs in Pallas interpret mode, which says nothing about
speed: ``--smoke`` runs a tiny grid that way to check the program end to end and
writes nothing unless ``--out`` is given (the file is then marked interpret mode).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
import re
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bandwidth
from pallas_kernels import tree_attention
from specjax import attention

_BATCH = flags.DEFINE_list("batch", ["1", "16", "64"], "Batch sizes (rows).")
_CONTEXT = flags.DEFINE_list("context", ["1024", "8192"],
                             "Cached positions per row (the cache has exactly these slots).")
_TREE = flags.DEFINE_list("tree", ["1", "4", "16", "64"],
                          "New tokens per row (1 = decode; > 1 = a tree verify).")
_GQA = flags.DEFINE_list("gqa", ["1", "4", "8"], "Query heads per KV head.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads per layer.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head width.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Dtype of q, k, v and the cache.")
_WINDOW = flags.DEFINE_list("window", [], "sinks,recent: read only that prefix budget"
                            " (MagicDec draft); default: the whole prefix.")
_BLOCK_K = flags.DEFINE_integer("block_k", None, "Kernel prefix block (default: the"
                                " kernel's).")
_SPLITS = flags.DEFINE_integer("num_splits", None, "Kernel splits per (row, KV head)"
                               " (default: the kernel's).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per cell (the best is kept).")
_INNER = flags.DEFINE_integer("inner", 10, "Calls per timed repeat (dispatched back to"
                              " back, so launch overhead overlaps).")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU: a tiny grid in Pallas interpret mode"
                           " (a program check, not a measurement).")
_OUT = flags.DEFINE_string("out", None, "Results JSON (and a .md beside it); default"
                           " experiments/results/kernel_bench_<device>.json, none with"
                           " --smoke.")

_SMOKE_GRID = dict(batch=[2], context=[40], tree=[1, 4], gqa=[1, 2], kv_heads=2,
                   head_dim=32, dtype="float32", block_k=16)
_TOLERANCE = {"bfloat16": 2e-2, "float32": 2e-5}  # as tests/test_tree_attention_kernel.py


@dataclasses.dataclass
class Cell:
  batch: int
  context: int
  tree: int
  gqa: int
  window: str  # "sinks+recent" or "full"
  kernel_ms: float
  xla_ms: float
  bytes_per_call: float
  kernel_gbps: float
  xla_gbps: float
  kernel_copy_fraction: float  # kernel GB/s / measured copy GB/s
  max_abs_err: float  # kernel vs the XLA path
  ok: bool  # max_abs_err within the dtype's tolerance


def heap_tree_mask(n: int) -> np.ndarray:
  """bool[n, n] ancestor-or-self mask of the binary tree with parent (i - 1) // 2."""
  mask = np.eye(n, dtype=bool)
  for i in range(1, n):
    mask[i] |= mask[(i - 1) // 2]
  return mask


def call_bytes(batch, context, tree, gqa, kv_heads, head_dim, itemsize, window) -> float:
  """Bytes one call must move: visible cache K/V + q + new K/V + output."""
  visible = context if window is None else min(context, window[0] + window[1])
  cache = 2 * batch * kv_heads * visible * head_dim
  tokens = batch * tree * head_dim * (2 * gqa * kv_heads + 2 * kv_heads)  # q, out, k, v
  return float((cache + tokens) * itemsize)


def time_per_call(fn, args, repeats: int, inner: int) -> float:
  """Seconds per call: the best of ``repeats`` runs of ``inner`` back-to-back calls."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(inner)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - t0) / inner)
  return best


def run_cell(batch, context, tree, gqa, *, kv_heads, head_dim, dtype, window, block_k,
             num_splits, interpret, copy_gbps, repeats, inner, seed=0) -> Cell:
  heads = gqa * kv_heads
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  args = (normal(keys[0], (batch, tree, heads, head_dim)),
          normal(keys[1], (batch, tree, kv_heads, head_dim)),
          normal(keys[2], (batch, tree, kv_heads, head_dim)),
          normal(keys[3], (batch, kv_heads, context, head_dim)),
          normal(keys[4], (batch, kv_heads, context, head_dim)),
          jnp.full((batch,), context, jnp.int32),
          jnp.asarray(heap_tree_mask(tree)))
  sinks, recent = window if window is not None else (None, None)
  knobs = {k: v for k, v in dict(block_k=block_k, num_splits=num_splits).items()
           if v is not None}
  kernel = jax.jit(functools.partial(tree_attention.tree_attention, sinks=sinks,
                                     recent=recent, interpret=interpret, **knobs))
  xla = jax.jit(functools.partial(
      attention.attention, window=None if window is None else attention.Window(*window)))
  got = kernel(*args)
  with jax.default_matmul_precision("float32"):  # GPUs' default f32 dot is TF32
    expected = xla(*args)  # (a trace of its own: the precision is part of the key)
  err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32))))
  t_kernel = time_per_call(kernel, args, repeats, inner)
  t_xla = time_per_call(xla, args, repeats, inner)
  nbytes = call_bytes(batch, context, tree, gqa, kv_heads, head_dim,
                      jnp.dtype(dtype).itemsize, window)
  return Cell(batch=batch, context=context, tree=tree, gqa=gqa,
              window="full" if window is None else f"{window[0]}+{window[1]}",
              kernel_ms=1e3 * t_kernel, xla_ms=1e3 * t_xla, bytes_per_call=nbytes,
              kernel_gbps=nbytes / t_kernel / 1e9, xla_gbps=nbytes / t_xla / 1e9,
              kernel_copy_fraction=nbytes / t_kernel / 1e9 / copy_gbps,
              max_abs_err=err, ok=err <= _TOLERANCE[jnp.dtype(dtype).name])


def format_table(cells: list[Cell]) -> str:
  lines = ["| batch | context | tree | GQA | window | kernel ms | XLA ms | kernel speedup |"
           " MB/call | kernel GB/s | XLA GB/s | kernel / copy BW | max abs err |",
           "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for c in cells:
    lines.append(f"| {c.batch} | {c.context} | {c.tree} | {c.gqa} | {c.window} |"
                 f" {c.kernel_ms:.3f} | {c.xla_ms:.3f} | {c.xla_ms / c.kernel_ms:.2f}x |"
                 f" {c.bytes_per_call / 1e6:.1f} | {c.kernel_gbps:.0f} | {c.xla_gbps:.0f} |"
                 f" {100 * c.kernel_copy_fraction:.1f}% |"
                 f" {c.max_abs_err:.1e}{'' if c.ok else ' FAIL'} |")
  return "\n".join(lines)


def _ints(values, name) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected integers.") from None
  if not out or min(out) < 1:
    raise app.UsageError(f"--{name}: expected integers >= 1.")
  return out


def _default_out(machine: dict[str, str]) -> pathlib.Path:
  slug = re.sub(r"[^a-z0-9]+", "_", machine["device"].split(" x ", 1)[-1].lower()).strip("_")
  return pathlib.Path("experiments/results") / f"kernel_bench_{slug}.json"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  platform = jax.default_backend()
  interpret = platform not in ("gpu", "tpu")
  if interpret and not _SMOKE.value:
    raise app.UsageError(
        f"kernel_bench measures the compiled kernel on a GPU or TPU; this is {platform!r},"
        " where Pallas only interprets (no meaningful timing). Pass --smoke for a tiny"
        " interpret-mode check of the program.")
  if _SMOKE.value:
    grid = dict(_SMOKE_GRID)
    repeats, inner = 1, 1
  else:
    grid = dict(batch=_ints(_BATCH.value, "batch"), context=_ints(_CONTEXT.value, "context"),
                tree=_ints(_TREE.value, "tree"), gqa=_ints(_GQA.value, "gqa"),
                kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value, dtype=_DTYPE.value,
                block_k=_BLOCK_K.value)
    repeats, inner = _REPEATS.value, _INNER.value
  window = None
  if _WINDOW.value:
    try:
      sinks, recent = (int(v) for v in _WINDOW.value)
    except ValueError:
      raise app.UsageError("--window: expected sinks,recent (e.g. 16,496).") from None
    if min(sinks, recent) < 0 or sinks + recent == 0:
      raise app.UsageError("--window: sinks, recent >= 0 and not both 0.")
    window = (sinks, recent)

  machine = bandwidth.machine_description()
  bw = bandwidth.measure(size_mib=16 if _SMOKE.value else 512)
  mode = "Pallas interpret mode (not a performance result)" if interpret else "compiled"
  print(f"{machine['device']}; jax {machine['jax']}; kernel {mode}")
  print(f"memory bandwidth: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s")
  cells = []
  for b in grid["batch"]:
    for s in grid["context"]:
      for t in grid["tree"]:
        for g in grid["gqa"]:
          cell = run_cell(b, s, t, g, kv_heads=grid["kv_heads"], head_dim=grid["head_dim"],
                          dtype=jnp.dtype(grid["dtype"]), window=window,
                          block_k=grid["block_k"], num_splits=_SPLITS.value,
                          interpret=interpret, copy_gbps=bw["copy_gbps"], repeats=repeats,
                          inner=inner)
          print(format_table([cell]).splitlines()[-1], flush=True)
          cells.append(cell)
  table = format_table(cells)
  print(table)
  if any(not c.ok for c in cells):
    print("FAIL: the kernel disagrees with the XLA attention beyond the tolerance.")

  out = pathlib.Path(_OUT.value) if _OUT.value else (
      None if _SMOKE.value else _default_out(machine))
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m experiments.kernel_bench " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "mode": mode, "bandwidth": bw,
            "shape": {k: grid[k] for k in ("kv_heads", "head_dim", "dtype", "block_k")},
            "num_splits": _SPLITS.value}
    out.write_text(json.dumps({**meta, "cells": [dataclasses.asdict(c) for c in cells]},
                              indent=1))
    md = ["# Tree-attention kernel vs XLA attention", "",
          f"- command: `{meta['command']}`", f"- date: {meta['date']}",
          f"- machine: {machine['device']}; {machine['cpu']}; jax {machine['jax']}",
          f"- kernel: {mode}; KV heads {grid['kv_heads']}, head_dim {grid['head_dim']},"
          f" {grid['dtype']}", f"- bandwidth: read {bw['read_gbps']:.1f} GB/s, copy"
          f" {bw['copy_gbps']:.1f} GB/s (the fraction is of copy)", "", table, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')}")
  if any(not c.ok for c in cells):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
