"""Figures for the merge report and the comparison (matplotlib, no display needed)."""

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and Spaces

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .insights import MergeInsights  # noqa: E402
from .side_by_side import TaskAccuracy  # noqa: E402


def accuracy_chart(accuracy: Sequence[TaskAccuracy]) -> Figure:
    """Per task: test accuracy of the base, the task's own adapter and the merge; normalized accuracy on top."""
    figure, axes = plt.subplots(figsize=(8, 3.4), layout="constrained")
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
    axes.set(xticks=x, ylim=(0, 1.12), ylabel="test accuracy",
             title=f"Per-task accuracy (labels: merged / own adapter; average normalized {mean:.1%})")
    axes.set_xticks(x, tasks, rotation=20, fontsize=8)
    axes.legend(loc="upper right", fontsize=7, ncols=3)
    return figure


def spectra_chart(insights: MergeInsights, names: Sequence[str]) -> Figure:
    """Singular values of the merged update and of each (weighted) input, in the largest merged module."""
    figure, axes = plt.subplots(figsize=(6, 3.4), layout="constrained")
    for name, spectrum in zip(names, insights.input_spectra):
        if spectrum:
            axes.plot(range(1, len(spectrum) + 1), spectrum, marker=".", linewidth=1, alpha=0.7, label=name)
    merged = insights.merged_spectrum
    axes.plot(range(1, len(merged) + 1), merged, color="black", linewidth=2.2, marker="o", markersize=3,
              label="merged")
    axes.set(yscale="log", xlabel="singular value index", ylabel="singular value",
             title=f"Spectra in {insights.module}")
    axes.title.set_fontsize(9)
    axes.legend(fontsize=6, ncols=2)
    return figure


def overlap_chart(insights: MergeInsights, names: Sequence[str]) -> Figure:
    """Pairwise subspace overlap of the input adapters (1 = the same directions, 0 = orthogonal)."""
    size = max(3.4, 0.45 * len(names) + 1.6)
    figure, axes = plt.subplots(figsize=(size + 0.8, size), layout="constrained")
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
