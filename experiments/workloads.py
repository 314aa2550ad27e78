"""Real long text for benchmarks, available offline on every machine.

The Python standard library's own source files are a long, natural corpus of code and
English comments that every machine running specjax already has.
"""

from __future__ import annotations

import pathlib
import sysconfig


def stdlib_files() -> list[pathlib.Path]:
  """The standard library's top-level .py files, sorted by name (deterministic)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(p for p in root.glob("*.py") if p.is_file())


def stdlib_prompts(tokenizer, num_rows: int, length: int) -> list[list[int]]:
  """``num_rows`` different token sequences of exactly ``length`` tokens each.

  Row r starts at file r * 7 (mod the file count) and reads on through the following
  files until it has ``length`` tokens, so rows differ from their first token.
  """
  files = stdlib_files()
  if not files:
    raise RuntimeError("no standard-library .py files found; cannot build the workload.")
  rows = []
  for r in range(num_rows):
    ids: list[int] = []
    i = (r * 7) % len(files)
    while len(ids) < length:
      text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
      ids.extend(tokenizer.encode(text))
      i += 1
    rows.append(ids[:length])
  return rows
