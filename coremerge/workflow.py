"""One merge as the app runs it: merge, explain (spectra, overlaps), compare side by side, package.

Everything it returns pickles (ZeroGPU runs it in another process) and everything it writes lies in
the `workdir` the caller gives; a failure raises CoreMergeError and the caller removes `workdir`.
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence, Union

from .compare import (ClassificationComparison, TextComparison, compare_classification, compare_text,
                      sample_images, variants_of)
from .errors import CoreMergeError
from .insights import MergeInsights, merge_insights
from .merge import load_adapter, load_adapters
from .options import MergeOptions
from .package import code_snippet, model_card, write_model_card, zip_folder
from .pipeline import merge_to_folder
from .presets import Preset
from .runners import RUNNER_LOCK, runner_for

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (stated in the UI)."""

    adapters: int = 10
    prompts: int = 8
    prompt_chars: int = 400


LIMITS = Limits()


@dataclass(frozen=True)
class AdapterRow:
    """One row of the app's adapter list."""

    source: str  # Hub ID, or a path (relative paths start at the preset file)
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class MergeRequest:
    preset: Preset  # whose model the comparison runs on, with its samples
    adapters: tuple[AdapterRow, ...]
    options: MergeOptions
    prompts: tuple[str, ...] = ()  # text presets: the prompts to compare on

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
    comparison: Union[ClassificationComparison, TextComparison]
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
    if request.preset.kind == "text-generation":
        if not request.prompts:
            raise CoreMergeError("prompts: none given; write one prompt per line")
        if len(request.prompts) > limits.prompts:
            raise CoreMergeError(f"prompts: {len(request.prompts)} given; at most {limits.prompts}")
        for prompt in request.prompts:
            if len(prompt) > limits.prompt_chars:
                raise CoreMergeError(f"prompt {prompt[:30]!r}...: {len(prompt)} characters; at most "
                                     f"{limits.prompt_chars}")


def run_merge(request: MergeRequest, workdir: Path, progress: Progress = lambda fraction, text: None
              ) -> MergeOutcome:
    """Merge the request's adapters into `workdir`, explain and compare the merge, and package it."""
    check_request(request)
    preset, rows = request.preset, request.adapters
    sources = [preset.resolve(row.source.strip()) for row in rows]
    names = [row.name.strip() or f"adapter {i}" for i, row in enumerate(rows, 1)]
    options = replace(request.options, weights=tuple(float(row.weight) for row in rows))
    seconds, started = {}, time.perf_counter()

    progress(0.0, "loading and merging the adapters")
    folder = Path(workdir) / "merged-adapter"
    report = merge_to_folder(sources, options, folder,
                             lambda done, total: progress(0.3 * done / total, f"merging module {done}/{total}"))
    seconds["merge"] = time.perf_counter() - started

    progress(0.3, "computing spectra and subspace overlaps")
    clock = time.perf_counter()
    insights = merge_insights(load_adapters(sources), load_adapter(str(folder)), options.weights_for(len(rows)))
    seconds["explain"] = time.perf_counter() - clock

    clock = time.perf_counter()
    comparison = _compare(preset, rows, sources, names, folder, request.prompts,
                          lambda text: progress(0.45, text))
    seconds["compare"] = time.perf_counter() - clock

    progress(0.95, "writing the model card and the zip")
    clock = time.perf_counter()
    base_path = preset.base_model_path if preset.bundled else None
    snippet = code_snippet(report["base_model"] or preset.base_model, "merged-adapter", preset.kind, base_path)
    write_model_card(folder, model_card(report, names, f"Merge of {preset.title}" if _is_preset_set(preset, rows)
                                        else "Merged LoRA adapter", snippet))
    zip_path = zip_folder(folder, Path(workdir) / f"coremerge-{report['method']}-{report['space']}")
    seconds["package"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started
    progress(1.0, "done")
    return MergeOutcome(report, names, comparison, insights, folder, zip_path, snippet,
                        {k: round(v, 3) for k, v in seconds.items()})


def _is_preset_set(preset: Preset, rows: Sequence[AdapterRow]) -> bool:
    return [r.source for r in rows] == [a.source for a in preset.adapters]


def _compare(preset: Preset, rows: Sequence[AdapterRow], sources: Sequence[str], names: Sequence[str],
             merged: Path, prompts: Sequence[str], progress: Callable[[str], None]):
    """Side by side on the preset's model: sample images (classification) or prompts (text)."""
    tasks_by_source = {preset.resolve(a.source): a.task for a in preset.adapters}
    tasks = [tasks_by_source.get(source) for source in sources]
    variants = variants_of(names, sources, tasks, str(merged))
    with RUNNER_LOCK:
        runner = runner_for(preset.name, preset.folder)
        if preset.kind == "image-classification":
            unknown = [name for name, task in zip(names, tasks) if task is None]
            if unknown:
                raise CoreMergeError(f"adapter {unknown[0]}: not one of preset {preset.name}'s adapters; image "
                                     "classification needs each adapter's task head, so only the preset's adapters "
                                     "can be compared here")
            return compare_classification(runner, sample_images(preset.folder, preset.samples.images), variants,
                                          progress)
        if preset.kind == "text-generation":
            return compare_text(runner, prompts, variants, progress)
    raise CoreMergeError(f"preset {preset.name}: comparison of {preset.kind} is not available yet")


def prompts_from_text(text: str) -> tuple[str, ...]:
    """One prompt per non-empty line; `\\n` in a line stands for a newline (the bundled text tasks end with one)."""
    return tuple(line.replace("\\n", "\n") for line in text.splitlines() if line.strip())


def default_prompts_text(preset: Preset) -> str:
    return "\n".join(p.replace("\n", "\\n") for p in preset.samples.prompts)
