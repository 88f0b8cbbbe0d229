"""Compare methods: every registered method at the preset's tuned settings, in core and in full space; one table
and one chart of quality, merge time, output rank and output size.

Bounded in time three ways: the merges run here, on CPU, one after another, and no new merge starts once
MERGE_BUDGET seconds have passed (the rest are listed as skipped; a started merge finishes); all the merges are
scored in one call of `score_merges`, the function the app runs under ZeroGPU like the side by side, with a GPU time
asked for from the work; and the work itself is the preset's evaluation sample: the test split of each task
(bundled classification presets, as the side by side's accuracy) or the prompts on the page that have an expected
answer (bundled text presets). Image presets have no expected answers: their quality is "n/a".
"""

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import gradio as gr
import spaces
from matplotlib.figure import Figure

from ..comparison.runners import RUNNER_LOCK, parameter_count, runner_for
from ..comparison.side_by_side import TextComparison
from ..errors import CoreMergeError
from ..merging.methods import METHODS
from ..merging.options import MergeOptions
from ..merging.to_folder import merge_to_folder
from ..presets import Preset, find_preset
from . import validation
from .budget import REQUEST_SECONDS, Budget, merge_slot
from .handlers import CACHE, build_request, checked_request, user_errors
from .sources import scrub
from .workflow import (GPU_SECONDS, LIMITS, SECONDS_PER_ADAPTER, SECONDS_PER_IMAGE, SECONDS_PER_TOKEN, MergeRequest,
                       Progress, _tasks_of, check_request, has_comparison, no_progress)

SPACES_COMPARED = ("core", "full")
MERGE_BUDGET = 90.0  # seconds of merging per comparison; later merges are skipped
TEST_IMAGES_PER_TASK = 360  # the bundled digits' test split, for the GPU time estimate
COLUMNS = ["Method", "Space", "Settings", "Quality", "Merge s", "Output rank", "Output MB", "Note"]


@dataclass(frozen=True)
class MethodRun:
    """One method in one space: its settings, and the merge's time, rank and size (None where skipped)."""

    method: str
    space: str
    settings: str  # "alpha 0.4, density 0.9"
    tuned: bool  # chosen on the preset's validation split
    folder: Optional[str] = None  # the merged adapter
    merge_seconds: Optional[float] = None  # the merge step itself (loading and writing excluded)
    output_rank: Optional[int] = None  # the largest rank of a merged module
    output_bytes: Optional[int] = None
    quality: Optional[float] = None
    note: str = ""


@dataclass(frozen=True)
class QualityJob:
    """What `score_merges` receives (it pickles for ZeroGPU: names, paths and numbers)."""

    preset: Preset
    folders: tuple[str, ...]  # the merged adapters
    tasks: tuple[tuple[str, str], ...]  # classification: (task, its own adapter), to normalize by
    prompts: tuple[str, ...]  # text: the prompts with an expected answer
    parameters: int  # of the model that scores


@dataclass(frozen=True)
class MethodComparison:
    runs: list[MethodRun]
    quality: str  # what the quality column measures, or why it is "n/a"
    seconds: dict[str, float]


def settings_text(alpha: float, params: dict) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in
                     {"alpha": alpha, **params}.items() if name != "seed")


def merge_every_method(request: MergeRequest, sources: Sequence[str], workdir: Path, progress: Progress = no_progress,
                       budget: float = MERGE_BUDGET) -> list[MethodRun]:
    """Each method at the preset's settings for it (`Preset.settings_for`), in each compared space, with the rows'
    weights; no merge starts after `budget` seconds."""
    weights = tuple(float(row.weight) for row in request.adapters)
    cells = [(method, space) for method in METHODS for space in SPACES_COMPARED]
    runs, started = [], time.perf_counter()
    for number, (method, space) in enumerate(cells):
        settings = request.preset.settings_for(method, space)
        run = MethodRun(method, space, settings_text(settings.alpha, settings.params), settings.tuned)
        if number and time.perf_counter() - started > budget:  # the first merge always runs
            runs.append(replace(run, note=f"skipped: the {budget:g} s merge budget was used up"))
            continue
        progress(0.6 * number / len(cells), desc=f"merging with {method} in {space} space")
        options = MergeOptions.create(method=method, space=space, weights=weights, alpha=settings.alpha,
                                      **settings.params)
        folder = Path(workdir) / f"{method}-{space}"
        try:
            report = merge_to_folder(list(sources), options, folder)
        except CoreMergeError as error:  # this method cannot merge these rows (weights that cancel, say)
            runs.append(replace(run, note=f"failed: {' '.join(str(error).split())}"))
            continue
        ranks = [m["output_rank"] for m in report["modules"].values()]
        runs.append(replace(run, folder=str(folder), merge_seconds=report["seconds"]["merging"],
                            output_rank=max(ranks, default=0), output_bytes=report["bytes"]["out"]))
    return runs


def quality_seconds(job: QualityJob, progress: object = None) -> int:
    """ZeroGPU time to ask for: merges x (test images of every task, or prompts x tokens), by model size."""
    billions = max(job.parameters / 1e9, 0.05)
    merges = len(job.folders)
    if job.tasks:
        work = (merges + 1) * len(job.tasks) * TEST_IMAGES_PER_TASK * SECONDS_PER_IMAGE * billions
    else:
        tokens = min(int(job.preset.samples.generation.get("max_new_tokens", 64)), LIMITS.new_tokens)
        work = merges * len(job.prompts) * tokens * SECONDS_PER_TOKEN * billions
    low, high = GPU_SECONDS
    return int(min(high, max(low, low + work + SECONDS_PER_ADAPTER * merges)))


def score_merges(job: QualityJob, progress: Progress = no_progress) -> list[float]:
    """Quality of each merged adapter on the preset's model (already loaded; the caller holds RUNNER_LOCK):
    average normalized test accuracy over the tasks (merged / the task's own adapter), or exact match on the
    prompts with an expected answer. This is the GPU function."""
    runner = runner_for(job.preset.name, job.preset.folder)
    own = {task: runner.accuracy(task, adapter) for task, adapter in job.tasks}
    scores = []
    for number, folder in enumerate(job.folders):
        progress(0.6 + 0.35 * number / len(job.folders), desc=f"scoring merge {number + 1}/{len(job.folders)}")
        try:
            if job.tasks:
                scores.append(sum(runner.accuracy(task, folder) / own[task] for task in own) / len(own))
            else:
                answers = runner.generate(list(job.prompts), folder)
                expected = [runner.expected(p) for p in job.prompts]
                text = TextComparison(["merged"], list(job.prompts), [[a] for a in answers], expected)
                scores.append(text.scores[0])
        finally:
            runner.forget(folder)
    return scores


# ZeroGPU runs only the scoring, in a forked worker (as the side by side); off ZeroGPU spaces.GPU is a no-op.
score_on_gpu = spaces.GPU(duration=quality_seconds)(user_errors(score_merges))


def quality_plan(request: MergeRequest, sources: Sequence[str]) -> tuple[str, tuple, tuple]:
    """What the quality column measures, the (task, own adapter) pairs or prompts to score, or why it is "n/a"
    (then no tasks and no prompts)."""
    preset = request.preset
    if preset.kind == "image-generation":
        return "n/a: image presets have no expected answers to score generated images against", (), ()
    if request.no_comparison:  # the side by side's reason, in this table's words
        reason = request.no_comparison.removeprefix("No side by side: ").removesuffix(
            " The merged adapter, its report and the download are ready.").rstrip(".")
        return f"n/a: {reason}", (), ()
    if not has_comparison(preset):
        return "n/a: this preset's zero-shot heads are not evaluated in the app yet; the merges are compared", (), ()
    if preset.kind == "image-classification":
        tasks = tuple((task, source) for task, source in zip(_tasks_of(preset, sources), sources) if task)
        if not tasks:
            return "n/a: no row is one of the preset's own adapters, so no task accuracy to normalize by", (), ()
        return (f"average normalized accuracy on the test split of {len(tasks)} task(s) (merged accuracy / the "
                "task's own adapter's)", tasks, ())
    if not preset.bundled:
        return "n/a: this Hub preset's prompts have no expected answers (the bundled text presets' do)", (), ()
    expected = runner_for(preset.name, preset.folder).expected
    prompts = tuple(p for p in request.prompts if expected(p) is not None)
    if not prompts:
        return "n/a: no prompt on the page has an expected answer (write prompts such as the preset's own)", (), ()
    return f"exact match on the {len(prompts)} prompt(s) on the page with an expected answer", (), prompts


def compare_methods(request: MergeRequest, workdir: Path, progress: Progress = no_progress,
                    score: Optional[Callable[[QualityJob, Progress], list[float]]] = None,
                    budget: float = MERGE_BUDGET) -> MethodComparison:
    """Merge the request's rows with every method in core and full space (CPU, here), then score every merge in
    one `score` call (the app passes the ZeroGPU-decorated `score_merges`)."""
    check_request(request)
    score = score or score_merges
    preset = request.preset
    sources = [preset.resolve(row.source.strip()) for row in request.adapters]
    clock = time.perf_counter()
    runs = merge_every_method(request, sources, workdir, progress, budget)
    seconds = {"merging": time.perf_counter() - clock}
    clock = time.perf_counter()
    with RUNNER_LOCK:  # held across the GPU call, as the side by side does
        quality, tasks, prompts = quality_plan(request, sources)
        merged = [run for run in runs if run.folder]
        if (tasks or prompts) and merged:
            progress(0.6, desc=f"loading {preset.base_model} to score the merges")
            job = QualityJob(preset, tuple(run.folder for run in merged), tasks, prompts,
                             parameter_count(runner_for(preset.name, preset.folder)))
            scores = dict(zip((run.folder for run in merged), score(job, progress)))
            runs = [replace(run, quality=scores.get(run.folder)) for run in runs]
    seconds["scoring"] = time.perf_counter() - clock
    progress(1.0, desc="done")
    return MethodComparison(runs, quality, {k: round(v, 2) for k, v in seconds.items()})


def table_rows(comparison: MethodComparison) -> list[list]:
    """One row per method and space, in the order of COLUMNS."""
    def number(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    return [[METHODS[run.method].display_name, run.space, run.settings + ("" if run.tuned else " (defaults)"),
             number(run.quality, 3), number(run.merge_seconds, 3),
             "n/a" if run.output_rank is None else run.output_rank,
             number(None if run.output_bytes is None else run.output_bytes / 1e6, 2), run.note]
            for run in comparison.runs]


def summary_markdown(comparison: MethodComparison) -> str:
    merged = sum(run.folder is not None for run in comparison.runs)
    return (f"**Quality**: {comparison.quality}. Settings: each method's alpha and parameters tuned on this "
            f"preset's validation split where it has them (else the method's defaults, alpha 1). {merged} of "
            f"{len(comparison.runs)} merges ran on CPU in {comparison.seconds['merging']:.1f} s (budget "
            f"{MERGE_BUDGET:g} s), scoring took {comparison.seconds['scoring']:.1f} s. Merge s is the merge step "
            "alone (not loading or writing); output rank is the largest rank of a merged module.")


def comparison_chart(comparison: MethodComparison) -> Figure:
    """Four panels, methods on the x axis, core and full space side by side: quality, merge time, rank, size.

    A bare Figure (not pyplot's): nothing keeps it once the page has it."""
    figure = Figure(figsize=(11, 3.2), layout="constrained")
    axes = figure.subplots(1, 4)
    methods = list(METHODS)
    width = 0.38
    panels = (("quality", "quality", lambda r: r.quality), ("merge s", "merge step (s)", lambda r: r.merge_seconds),
              ("output rank", "largest output rank", lambda r: r.output_rank),
              ("output MB", "output size (MB)", lambda r: None if r.output_bytes is None else r.output_bytes / 1e6))
    by_cell = {(run.method, run.space): run for run in comparison.runs}
    for ax, (title, label, value) in zip(axes, panels):
        for offset, (space, colour) in zip((-width / 2, width / 2), zip(SPACES_COMPARED, ("#4c72b0", "#dd8452"))):
            values = [value(by_cell[(m, space)]) if (m, space) in by_cell else None for m in methods]
            heights = [math.nan if v is None else v for v in values]
            ax.bar([i + offset for i in range(len(methods))], heights, width, label=space, color=colour)
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(title if title != "quality" or any(r.quality is not None for r in comparison.runs)
                     else "quality: n/a", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(fontsize=7, title="space", title_fontsize=7)
    return figure


# The page's "Compare methods" button


@user_errors
def compare_methods_button(preset_name: str, table, prompts_text: str, hub_token: Optional[str] = None,
                           uploaded=None, progress=gr.Progress()):
    """The button: the same checks and trust boundary as "Merge & compare" (each value validated, every row a Hub
    ID fetched with the visitor's token or none, an upload of this request or a preset path), then every method in
    core and full space; returns the summary, the table and the chart. Nothing is kept: the request's folder goes.
    """
    preset = find_preset(validation.preset_name(preset_name))
    request = build_request(preset.name, table, preset.merge.method, preset.merge.space, preset.settings_for(
        preset.merge.method).alpha, False, None, prompts_text, ())
    token = (hub_token or "").strip() or None
    with CACHE.workdir() as folder:
        try:
            request, trusted = checked_request(request, uploaded, token, folder)
            try:
                with merge_slot(Budget(REQUEST_SECONDS, progress)):  # one merge (or comparison of methods) at a time
                    comparison = compare_methods(request, folder / "methods", progress, score=score_on_gpu)
            except CoreMergeError as error:
                raise type(error)(scrub(str(error), trusted)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    comparison = replace(comparison, runs=[replace(run, note=scrub(run.note, trusted)) for run in comparison.runs])
    return summary_markdown(comparison), table_rows(comparison), comparison_chart(comparison)
