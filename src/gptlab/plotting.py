"""Saving figures without touching matplotlib's global state.

Figures are built from ``matplotlib.figure.Figure`` with their own Agg canvas, not through ``pyplot``,
so a library call never switches the process's backend (a notebook keeps its inline plots) and
never leaves a figure open. Each figure is written atomically.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gptlab.files import atomic_write


def new_figure(width: float = 6.0, height: float = 4.0, dpi: int = 110):
    """A figure that belongs to no pyplot state; draw on it, then ``save_figure`` it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def save_figure(fig, path: str | Path) -> None:
    """Lay the figure out and write it as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself as the figure's canvas
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_lines(path: str | Path, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], title: str,
               xlabel: str, ylabel: str, decorate: Callable | None = None) -> None:
    """One line per ``(label, [(x, y), ...])`` series (empty ones are skipped), written as a PNG."""
    fig = new_figure()
    ax = fig.add_subplot()
    for label, points in series:
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if decorate is not None:
        decorate(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    save_figure(fig, path)
