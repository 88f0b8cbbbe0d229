"""One merge as the app runs it: merge, explain (spectra, overlaps), compare side by side, package.

Only the comparison runs on a GPU (`run_comparison`, ZeroGPU's function): its job and its result pickle.
Everything else runs in the calling process, on CPU. Everything it writes lies in the `workdir` the caller
gives; a failure raises CoreMergeError and the caller removes `workdir`.
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

from ..comparison.clip_zero_shot import SAMPLES_PER_TASK, compare_zero_shot
from ..comparison.images import GenerationSettings, ImageGrid, LoraEntry, compare_images
from ..comparison.insights import MergeInsights, merge_insights
from ..comparison.limits import LIMITS, Limits
from ..comparison.runners import RUNNER_LOCK, parameter_count, runner_for
from ..comparison.side_by_side import (ClassificationComparison, TextComparison, Variant, compare_classification,
                                       compare_text, sample_images, variants_of, warm_up_classification)
from ..errors import CoreMergeError
from ..formats.checks import check_module_shapes, check_same_base_model, check_same_family
from ..formats.loading import load_adapter, load_adapters
from ..merging.options import MergeOptions
from ..merging.to_folder import merge_to_folder
from ..presets import Preset
from .package import base_model_of, code_snippet, model_card, write_model_card, zip_folder
from .portable import portable_report
from .validation import fit_to_preset


class Progress(Protocol):
    """gr.Progress's call: a fraction done and what is being done (a gr.Progress pickles, for ZeroGPU)."""

    def __call__(self, fraction: float, desc: str = "") -> None: ...


def no_progress(fraction: float, desc: str = "") -> None:
    pass


@dataclass(frozen=True)
class AdapterRow:
    """One row of the app's adapter list."""

    source: str  # Hub ID, or a path (relative paths start at the preset file)
    name: str
    weight: float = 1.0
    shown: str = ""  # the source as the visitor gave it, if `source` is where the app put it (webapp.sources)
    revision: Optional[str] = None  # the commit of a Hub ID the app downloaded


@dataclass(frozen=True)
class MergeRequest:
    preset: Preset  # whose model the comparison runs on, with its samples
    adapters: tuple[AdapterRow, ...]
    options: MergeOptions
    prompts: tuple[str, ...] = ()  # text presets: the prompts to compare on
    no_comparison: str = ""  # why the side by side is left out (adapters of another model); "" = compare

    def key(self) -> str:
        """Identical requests give identical results: the cache key."""
        return json.dumps({
            "preset": self.preset.name,
            "adapters": [[self.preset.resolve(a.source), a.name, a.weight] for a in self.adapters],
            "options": {**self.options.as_dict(), "weights": None},  # the weights are in the rows
            "prompts": list(self.prompts),
        }, sort_keys=True)


@dataclass
class MergeOutcome:
    """Everything the app shows after a merge."""

    report: dict
    names: list[str]
    sources: list[str]  # as the rows gave them (preset-relative paths stay short)
    comparison: Union[ClassificationComparison, TextComparison, ImageGrid, None]  # None: not for this preset yet
    insights: MergeInsights
    adapter_folder: Path  # the merged peft folder, with its model card
    zip_path: Path
    snippet: str
    seconds: dict[str, float] = field(default_factory=dict)  # merge, explain, compare, package, total


def check_request(request: MergeRequest, limits: Limits = LIMITS) -> None:
    """Raises CoreMergeError naming the first row or prompt that is out of bounds."""
    if not request.adapters:
        raise CoreMergeError("adapters: the list is empty; add at least one adapter (Hub ID or path)")
    if len(request.adapters) > limits.adapters:
        raise CoreMergeError(f"adapters: {len(request.adapters)} given; at most {limits.adapters} per merge")
    for number, row in enumerate(request.adapters, 1):
        if not row.source.strip():
            raise CoreMergeError(f"adapter row {number}: the source is empty; give a Hub ID or a path")
    if request.preset.kind in ("text-generation", "image-generation"):
        if not request.prompts:
            raise CoreMergeError("prompts: none given; write one prompt per line")
        if len(request.prompts) > limits.prompts:
            raise CoreMergeError(f"prompts: {len(request.prompts)} given; at most {limits.prompts}")
        for prompt in request.prompts:
            if len(prompt) > limits.prompt_chars:
                raise CoreMergeError(f"prompt {prompt[:30]!r}...: {len(prompt)} characters; at most "
                                     f"{limits.prompt_chars}")


def check_rows(request: MergeRequest) -> str:
    """Every row read (it exists, is readable, is a LoRA format coremerge loads) and checked against the preset's
    model and the other rows, before the merge takes the merge slot; the rows' sources are where the app put
    them. Returns "" if the side by side can run on the preset's model, else why not.

    Raises:
        CoreMergeError: the first row that cannot be read, or does not fit the preset's model or the other rows.
    """
    check_request(request)
    adapters = [load_adapter(row.source) for row in request.adapters]
    preset, why_not = request.preset, ""
    if has_comparison(preset) and not uses_preset_adapters(request):
        reference = load_adapter(preset.adapter_sources[0]) if preset.bundled else None
        why_not = fit_to_preset(preset, adapters, reference, [row.shown or row.source for row in request.adapters])
    check_same_base_model(adapters)
    check_same_family(adapters)
    check_module_shapes(adapters)
    return why_not or ""


def run_merge(request: MergeRequest, workdir: Path, progress: Progress = no_progress,
              compare: Optional[Callable[["ComparisonJob", Progress], object]] = None) -> MergeOutcome:
    """Merge the request's adapters into `workdir`, explain and compare the merge, and package it.

    Only `compare` needs a GPU: the app passes the ZeroGPU-decorated `run_comparison`, which ZeroGPU runs in a
    forked worker process. The merge, the explanation and the packaging run here, in the calling process, and
    the comparison's model is loaded here too (before the fork), so that the worker inherits it.
    """
    check_request(request)
    compare = compare or run_comparison
    preset, rows = request.preset, request.adapters
    sources = [preset.resolve(row.source.strip()) for row in rows]
    names = [row.name.strip() or f"adapter {i}" for i, row in enumerate(rows, 1)]
    tasks = _tasks_of(preset, sources)
    options = replace(request.options, weights=tuple(float(row.weight) for row in rows))
    seconds, started = {}, time.perf_counter()

    progress(0.0, desc="loading and merging the adapters")
    folder = Path(workdir) / "merged-adapter"
    report = merge_to_folder(sources, options, folder,
                             lambda done, total: progress(0.3 * done / total, desc=f"merging module {done}/{total}"))
    shown = [row.shown or row.source.strip() for row in rows]
    report = portable_report(report, sources, shown, [row.revision for row in rows], folder)
    seconds["merge"] = time.perf_counter() - started

    progress(0.3, desc="computing spectra and subspace overlaps")
    clock = time.perf_counter()
    insights = merge_insights(load_adapters(sources), load_adapter(str(folder)), options.weights_for(len(rows)))
    seconds["explain"] = time.perf_counter() - clock

    comparison = None
    if has_comparison(preset) and not request.no_comparison:
        progress(0.4, desc=f"loading {preset.base_model} (once per preset)")
        clock = time.perf_counter()
        # The lock is held across the GPU call: a worker forked meanwhile must not find it taken by another thread.
        with RUNNER_LOCK:
            runner = runner_for(preset.name, preset.folder)
            seconds["load"] = time.perf_counter() - clock
            clock = time.perf_counter()
            job = ComparisonJob(preset, tuple(names), tuple(sources), tuple(tasks), str(folder), request.prompts,
                                parameter_count(runner))
            comparison = compare(job, progress)
        seconds["compare"] = time.perf_counter() - clock

    progress(0.95, desc="writing the model card and the zip")
    clock = time.perf_counter()
    on_preset_model = not request.no_comparison
    base = base_model_of(preset, report, on_preset_model)
    task_type = json.loads((folder / "adapter_config.json").read_text()).get("task_type") \
        if (folder / "adapter_config.json").exists() else None
    snippet = code_snippet(report, "merged-adapter", preset.kind if on_preset_model else None, base.load_from,
                           task_type)
    write_model_card(folder, model_card(report, names, f"Merge of {preset.title}" if uses_preset_adapters(request)
                                        else "Merged LoRA adapter", snippet, base))
    zip_path = zip_folder(folder, Path(workdir) / f"coremerge-{report['method']}-{report['space']}")
    seconds["package"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started
    progress(1.0, desc="done")
    return MergeOutcome(report, names, shown, comparison, insights, folder, zip_path,
                        snippet, {k: round(v, 3) for k, v in seconds.items()})


def uses_preset_adapters(request: MergeRequest) -> bool:
    """The rows are exactly the preset's own adapters (in its order)."""
    return [row.shown or row.source for row in request.adapters] == [a.source for a in request.preset.adapters]


def _tasks_of(preset: Preset, sources: Sequence[str]) -> list[Optional[str]]:
    """The preset task of each source (None for an adapter the user added: it gets a column, not an accuracy)."""
    tasks_by_source = {preset.resolve(a.source): a.task for a in preset.adapters}
    return [tasks_by_source.get(source) for source in sources]


def generation_settings(preset: Preset, limits: Optional[Limits] = None) -> GenerationSettings:
    """The preset's image generation settings, within the limits on size and steps (the app's, by default)."""
    limits = limits or LIMITS
    settings = GenerationSettings(**preset.samples.generation)
    return replace(settings, num_inference_steps=min(settings.num_inference_steps, limits.steps),
                   width=min(settings.width, limits.image_side), height=min(settings.height, limits.image_side))


def has_comparison(preset: Preset) -> bool:
    """Side by side runs for text and image generation, for the bundled classification presets (their heads) and
    for Hub classification presets that name sample datasets (CLIP zero-shot heads)."""
    return preset.kind != "image-classification" or preset.bundled or bool(preset.samples.datasets)


@dataclass(frozen=True)
class ComparisonJob:
    """The side by side's work, as the GPU function receives it (it pickles: only names, paths and numbers).

    The model it runs on is not in it: that one was loaded in the main process, which ZeroGPU's worker forks."""

    preset: Preset
    names: tuple[str, ...]
    sources: tuple[str, ...]
    tasks: tuple[Optional[str], ...]
    merged: str  # the merged adapter's folder
    prompts: tuple[str, ...]
    parameters: int  # of the model the comparison runs on

    @property
    def variants(self) -> list[Variant]:
        return variants_of(self.names, self.sources, self.tasks, self.merged)


# Rough speeds on a ZeroGPU device (an A100 slice), per billion parameters of the model that runs.
SECONDS_PER_TOKEN = 0.02  # one generated token of one prompt
SECONDS_PER_STEP = 0.06  # one denoising step of one 512 x 512 image (classifier-free guidance included)
SECONDS_PER_IMAGE = 0.002  # one image through a vision encoder
SECONDS_PER_ADAPTER = 2.0  # loading one adapter onto the model
GPU_SECONDS = (15, 300)  # asked for at least / at most


def comparison_seconds(job: ComparisonJob, progress: object = None) -> int:
    """ZeroGPU time to ask for, from the work: variants x prompts x tokens or steps (or images), by model size."""
    variants = len(job.names) + 2  # base, each adapter, merged
    billions = max(job.parameters / 1e9, 0.05)
    preset = job.preset
    if preset.kind == "text-generation":
        tokens = min(int(preset.samples.generation.get("max_new_tokens", 64)), LIMITS.new_tokens)
        work = variants * len(job.prompts) * tokens * SECONDS_PER_TOKEN * billions
    elif preset.kind == "image-generation":
        settings = generation_settings(preset)
        pixels = settings.width * settings.height / 512 ** 2
        work = variants * len(job.prompts) * settings.num_inference_steps * SECONDS_PER_STEP * billions * pixels
    else:
        images = max(len(preset.samples.images), SAMPLES_PER_TASK * len(preset.samples.datasets))
        work = variants * images * SECONDS_PER_IMAGE * billions
    low, high = GPU_SECONDS
    return int(min(high, max(low, low + work + SECONDS_PER_ADAPTER * (variants - 1))))


def run_comparison(job: ComparisonJob, progress: Progress = no_progress):
    """Side by side on the preset's model, already loaded: sample images (classification), prompts (text) or
    generated images. This is the GPU function: the caller holds RUNNER_LOCK."""
    preset = job.preset
    runner = runner_for(preset.name, preset.folder)
    report = lambda text: progress(0.45, desc=text)  # noqa: E731
    if preset.kind == "image-classification" and not preset.bundled:
        return compare_zero_shot(runner, job.variants, report)
    if preset.kind == "image-classification":
        return compare_classification(runner, sample_images(preset.folder, preset.samples.images), job.variants,
                                      report)
    if preset.kind == "text-generation":
        return compare_text(runner, job.prompts, job.variants, report)
    if preset.kind == "image-generation":
        report("generating images: base, each LoRA, merged")
        triggers = {preset.resolve(a.source): a.trigger or "" for a in preset.adapters}
        loras = [LoraEntry(name, source, triggers.get(source, "")) for name, source in zip(job.names, job.sources)]
        return compare_images(runner.pipe, loras, Path(job.merged), job.prompts, generation_settings(preset),
                              merged_name="Merged")
    raise CoreMergeError(f"preset {preset.name}: comparison of {preset.kind} is not available yet")


def warm_up(preset: Preset) -> None:
    """Load the preset's model (in the main process) and, for bundled presets, compute the base's and each
    adapter's results, so that the first merge only has the merged adapter left to run."""
    if not has_comparison(preset):
        return
    with RUNNER_LOCK:
        runner = runner_for(preset.name, preset.folder)
        if preset.bundled and preset.kind == "image-classification":
            variants = [Variant("Base"), *(Variant(a.name, preset.resolve(a.source), a.task) for a in preset.adapters)]
            warm_up_classification(runner, sample_images(preset.folder, preset.samples.images), variants)


def prompts_from_text(text: str) -> tuple[str, ...]:
    """One prompt per non-empty line; `\\n` in a line stands for a newline (the bundled text tasks end with one)."""
    return tuple(line.replace("\\n", "\n") for line in text.splitlines() if line.strip())


def default_prompts_text(preset: Preset) -> str:
    return "\n".join(p.replace("\n", "\\n") for p in preset.samples.prompts)
