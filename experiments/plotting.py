"""Speedup plots for the benchmark programs (matplotlib, no display needed)."""

from __future__ import annotations

import pathlib


def speedup_panels(panels: dict[str, dict[str, list[tuple[int, float]]]],
                   path: pathlib.Path) -> None:
  """One panel per title, one line per label: speedup vs autoregressive over batch.

  Args:
    panels: title -> label -> [(batch, speedup), ...].
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  for ax, (title, lines) in zip(axes[0], panels.items()):
    for label, pts in lines.items():
      ax.plot(*zip(*sorted(pts)), marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel="batch", ylabel="speedup vs autoregressive")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
