"""Figures for the merge report and the comparison (matplotlib, no display needed), each with a one-line caption
on how to read it.

The figures are plain `Figure` objects, never registered with pyplot: nothing keeps them once the page has them,
so a server that merges all day holds no figures (pyplot keeps every figure it made until it is closed).
"""

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and Spaces

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .insights import MergeInsights  # noqa: E402
from .side_by_side import TaskAccuracy  # noqa: E402

CAPTIONS = {
    "accuracy": ("Test accuracy per task of the base model (grey), the task's own adapter (blue) and the merge "
                 "(green); the percentage over each green bar is the merge's accuracy relative to the own adapter's "
                 "(normalized accuracy)."),
    "spectra": ("Singular values, largest first (log scale), of the merged update (black) and each weighted input "
                "adapter, in the module with the largest merged update: a curve that falls fast means a few "
                "directions carry that update."),
    "overlap": ("How much two adapters' updates share directions, mean over the modules both adapt: 1 = the same "
                "directions, 0 = orthogonal; high values off the diagonal mean two tasks compete for the same "
                "directions."),
}


def new_figure(width: float, height: float):
    """A figure and its axes, outside pyplot (freed with its last reference)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots()


def accuracy_chart(accuracy: Sequence[TaskAccuracy]) -> Figure:
    """Per task: test accuracy of the base, the task's own adapter and the merge; normalized accuracy on top."""
    figure, axes = new_figure(8, 3.6)
    tasks = [a.task for a in accuracy]
    x, width = np.arange(len(tasks)), 0.27
    for offset, (label, values, colour) in zip((-width, 0, width), (
        ("base", [a.base for a in accuracy], "#b0b0b0"),
        ("own adapter", [a.individual for a in accuracy], "#4c72b0"),
        ("merged", [a.merged for a in accuracy], "#55a868"),
    )):
        axes.bar(x + offset, values, width, label=label, color=colour)
    for position, a in zip(x, accuracy):
        axes.annotate(f"{a.normalized:.0%}", (position + width, a.merged), ha="center", va="bottom", fontsize=7)
    mean = sum(a.normalized for a in accuracy) / max(1, len(accuracy))
    axes.set(xticks=x, ylim=(0, 1.12), ylabel="test accuracy")
    axes.set_title(f"Per-task accuracy (average normalized {mean:.1%})", fontsize=10)
    axes.set_xticks(x, tasks, rotation=20, fontsize=8)
    figure.legend(loc="outside lower center", fontsize=7, ncols=3, frameon=False)  # off the bars and the title
    return figure


def spectra_chart(insights: MergeInsights, names: Sequence[str]) -> Figure:
    """Singular values of the merged update and of each (weighted) input, in the largest merged module."""
    figure, axes = new_figure(6.4, 3.6)
    for name, spectrum in zip(names, insights.input_spectra):
        if spectrum:
            axes.plot(range(1, len(spectrum) + 1), spectrum, marker=".", linewidth=1, alpha=0.7, label=name)
    merged = insights.merged_spectrum
    axes.plot(range(1, len(merged) + 1), merged, color="black", linewidth=2.2, marker="o", markersize=3,
              label="merged")
    axes.set(yscale="log", xlabel="singular value index", ylabel="singular value")
    axes.set_title(f"Spectra in {insights.module}", fontsize=9)
    figure.legend(loc="outside right upper", fontsize=6, frameon=False)  # off the curves and the title
    return figure


def overlap_chart(insights: MergeInsights, names: Sequence[str]) -> Figure:
    """Pairwise subspace overlap of the input adapters (1 = the same directions, 0 = orthogonal)."""
    size = max(3.4, 0.45 * len(names) + 1.6)
    figure, axes = new_figure(size + 0.8, size + 0.3)
    values = np.asarray(insights.overlap)
    image = axes.imshow(values, vmin=0, vmax=1, cmap="viridis")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                      color="black" if values[i, j] > 0.5 else "white")
    axes.set_title("Subspace overlap between adapters (mean over modules)", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure
