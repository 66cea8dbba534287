"""Pictures of an evaluation: accuracy by length x depth, and by the number of facts.

matplotlib is optional (the `eval` extra); `--plot` says so clearly when it is missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from memsvc.eval.facts import DEPTH_BUCKETS, FactResult, accuracy, depth_bucket


def pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'memsvc[eval]' (or matplotlib)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(length: int) -> str:
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if length % size == 0:
            return f"{length // size}{unit}"
    return str(length)


def plot_results(results: Sequence[FactResult], path: Path, title: str) -> None:
    """Two panels: a length x depth heat map and accuracy against the number of facts
    (one line per length)."""
    plt = pyplot()
    lengths = sorted({r.length for r in results})
    grid = [[float("nan")] * DEPTH_BUCKETS for _ in lengths]
    cells: dict[tuple[int, int], list[FactResult]] = defaultdict(list)
    for r in results:
        cells[(r.length, depth_bucket(r.depth))].append(r)
    for i, length in enumerate(lengths):
        for j in range(DEPTH_BUCKETS):
            if cells[(length, j)]:
                grid[i][j] = accuracy(cells[(length, j)])

    figure, (heat, lines) = plt.subplots(1, 2, figsize=(11, 4.2))
    image = heat.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    heat.set_xticks(range(DEPTH_BUCKETS))
    heat.set_xticklabels([f"{100 * j // DEPTH_BUCKETS}-{100 * (j + 1) // DEPTH_BUCKETS}%"
                          for j in range(DEPTH_BUCKETS)])  # fmt: skip
    heat.set_yticks(range(len(lengths)))
    heat.set_yticklabels([_label(n) for n in lengths])
    heat.set_xlabel("depth of the fact in the stream")
    heat.set_ylabel("stream length (tokens)")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                heat.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=heat, label="exact match")

    for length in lengths:
        by_n: dict[int, list[FactResult]] = defaultdict(list)
        for r in results:
            if r.length == length:
                by_n[r.n_facts].append(r)
        ns = sorted(by_n)
        lines.plot(ns, [accuracy(by_n[n]) for n in ns], marker="o", label=_label(length))
    lines.set_xscale("log", base=2)
    lines.set_ylim(-0.02, 1.02)
    lines.set_xlabel("facts in the stream")
    lines.set_ylabel("exact match per fact")
    lines.legend(title="length")
    lines.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
