"""The experiment launcher runs end to end on the real model and records what it measured."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_launcher_small_grid_writes_results_and_trace(smollm2_path, tmp_path):
  del smollm2_path  # ensures the model is fetched (or the test skipped) first
  out = tmp_path / "r.json"
  cmd = [sys.executable, "-m", "experiments.launch", "--batch=1,2", "--context=48,96",
         "--new_tokens=4", "--repeats=1", f"--out={out}", f"--profile_dir={tmp_path / 'prof'}"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| autoregressive | 2 | 96 |" in proc.stdout
  result = json.loads(out.read_text())
  assert result["command"].startswith("python -m experiments.launch --batch=1,2")
  assert {(c["batch"], c["context"]) for c in result["cells"]} == {
      (1, 48), (1, 96), (2, 48), (2, 96)}
  for cell in result["cells"]:
    assert cell["steps"] == 3 and cell["speedup"] == 1.0
    assert len(cell["decode_s_runs"]) == 1 and cell["spread"] == 0.0
    assert 0 < cell["roofline_fraction"] < 1.5
    assert cell["tokens_per_s"] > 0
  assert out.with_suffix(".md").read_text().count("| autoregressive |") == 4
  assert list((tmp_path / "prof").rglob("*.xplane.pb")), "no XLA trace was written"


def test_launcher_runs_auto_gamma_and_sequoia_trees(smollm2_path, tmp_path):
  del smollm2_path
  out = tmp_path / "s.json"
  cmd = [sys.executable, "-m", "experiments.launch", "--method=magicdec,sequoia",
         "--gamma=2,auto", "--tree=6,auto", "--tree_depth=2", "--batch=2", "--context=160",
         "--new_tokens=12", "--repeats=1", "--window=64", f"--out={out}"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  cells = {c["method"]: c for c in result["cells"]}
  assert set(cells) == {"autoregressive", "magicdec/streaming/g2", "magicdec/streaming/gauto",
                        "sequoia/streaming/n6", "sequoia/streaming/nauto"}
  for label in ("magicdec/streaming/gauto", "sequoia/streaming/nauto"):
    assert cells[label]["segments"] and cells[label]["auto_choice"]
  assert cells["sequoia/streaming/n6"]["predicted_speedup"] > 0
  assert cells["magicdec/streaming/g2"]["auto_choice"] in ("g0", "g2")
  assert 1 <= cells["sequoia/streaming/n6"]["mean_accepted"] <= 3  # depth 2
  adaptive = {r["adaptive"]: r for r in result["adaptive_vs_fixed"]}
  assert set(adaptive) == {"magicdec/streaming/gauto", "sequoia/streaming/nauto"}
  best = max((c for m, c in cells.items() if m not in adaptive), key=lambda c: c["tokens_per_s"])
  for label, row in adaptive.items():
    assert row["best_fixed"] == best["method"]
    assert row["ratio"] == cells[label]["tokens_per_s"] / best["tokens_per_s"]
  assert "| within noise |" in out.with_suffix(".md").read_text()


def test_repeats_are_interleaved_across_methods():
  from experiments import launch
  order = []
  results = launch.interleaved_runs(["autoregressive", "g2", "n8"], 3,
                                    lambda m: order.append(m) or len(order))
  assert order == ["autoregressive", "g2", "n8"] * 3
  assert results == {"autoregressive": [1, 4, 7], "g2": [2, 5, 8], "n8": [3, 6, 9]}
