"""How good a merge is on a bundled preset: per-task accuracy and normalized accuracy (the paper's metric).

Normalized accuracy of task t = accuracy of the merged model on t / accuracy of task t's own adapter
on t; the benchmark reports its average over tasks, for every method x space, with alpha and
density chosen on the validation split (as the authors do) and accuracy on the test split.
"""

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Protocol, Sequence

from ..errors import CoreMergeError
from ..merging.methods import METHODS
from ..merging.options import SPACES, MergeOptions
from ..merging.to_folder import merge_to_folder
from ..presets import Preset

ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0)
DENSITIES = {"ties": (0.1, 0.2, 0.4, 0.7), "dare": (0.3, 0.5, 0.7, 0.9), "dare_ties": (0.3, 0.5, 0.7, 0.9)}


class Evaluator(Protocol):
    tasks: list[str]

    def accuracy(self, task: str, adapter: Optional[str] = None, split: str = "test", scale: float = 1.0) -> float:
        """`scale` multiplies the adapter's update."""

    def forget(self, adapter: str) -> None: ...


def evaluator_for(preset: Preset) -> Evaluator:
    """The evaluator of a bundled preset's kind, with the base model loaded once."""
    if not preset.bundled:
        raise CoreMergeError(f"preset {preset.name}: accuracy is measured on bundled presets only")
    if preset.kind == "image-classification":
        from ..bundled.digits import DigitsEvaluator

        return DigitsEvaluator(preset.base_model_path, {a.task: preset.resolve(a.source) for a in preset.adapters})
    if preset.kind == "text-generation":
        from ..bundled import questions
        from ..bundled.strings import StringsEvaluator

        tasks = [a.task for a in preset.adapters]
        if set(tasks) <= set(questions.TASKS):
            return questions.QuestionsEvaluator(preset.base_model_path, tasks=tasks)

        return StringsEvaluator(preset.base_model_path, tasks=[a.task for a in preset.adapters])
    raise CoreMergeError(f"preset {preset.name}: no evaluation for kind {preset.kind}")


@dataclass
class Scores:
    """Per-task accuracies of the base model, each task's own adapter, and a merge."""

    base: dict[str, float]
    individual: dict[str, float]
    merged: dict[str, float] = field(default_factory=dict)

    @property
    def normalized(self) -> dict[str, float]:
        return {t: self.merged[t] / self.individual[t] for t in self.merged}

    @staticmethod
    def mean(values: dict[str, float]) -> float:
        return sum(values.values()) / len(values)


def reference_scores(preset: Preset, evaluator: Evaluator, split: str = "test") -> Scores:
    """Accuracy of the base model and of each task's own adapter on that task."""
    own = {a.task: preset.resolve(a.source) for a in preset.adapters}
    return Scores(
        base={task: evaluator.accuracy(task, None, split) for task in own},
        individual={task: evaluator.accuracy(task, folder, split) for task, folder in own.items()},
    )


def merged_accuracies(evaluator: Evaluator, folder: str, split: str, scales: Sequence[float] = (1.0,)
                      ) -> list[dict[str, float]]:
    """Per-task accuracy of a merged adapter, once per scale, then unload it."""
    try:
        return [{task: evaluator.accuracy(task, folder, split, scale) for task in evaluator.tasks} for scale in scales]
    finally:
        evaluator.forget(folder)


@dataclass
class Cell:
    """One method x space of the benchmark: chosen parameters and test scores."""

    method: str
    space: str
    options: MergeOptions
    validation: float  # average normalized accuracy on the validation split
    test: dict[str, float]  # per-task merged accuracy on the test split
    merge_seconds: float


def tune_and_score(preset: Preset, evaluator: Evaluator, method: str, space: str, validation: Scores,
                   workdir: Path) -> Cell:
    """Choose alpha (and density) on the validation split, then score the choice on the test split.

    The merged update is linear in alpha (SPEC 2, step 5), so each density is merged once at
    alpha 1 and every alpha is evaluated by scaling the loaded adapter.
    """
    sources, folder = preset.adapter_sources, workdir / f"{method}-{space}"
    best, best_score = None, -1.0
    for density in DENSITIES.get(method, (None,)):
        options = MergeOptions.create(method=method, space=space, **({} if density is None else {"density": density}))
        merge_to_folder(sources, options, folder)
        for alpha, accuracies in zip(ALPHAS, merged_accuracies(evaluator, str(folder), "validation", ALPHAS)):
            score = Scores.mean({t: a / validation.individual[t] for t, a in accuracies.items()})
            if score > best_score:
                best, best_score = replace(options, alpha=alpha), score
    report = merge_to_folder(sources, best, folder)
    seconds = report["seconds"]["loading"] + report["seconds"]["merging"]
    [test] = merged_accuracies(evaluator, str(folder), "test")
    return Cell(method, space, best, best_score, test, seconds)


def benchmark(preset: Preset, methods: Sequence[str] = tuple(METHODS), spaces: Sequence[str] = SPACES,
              progress=None) -> tuple[Scores, list[Cell]]:
    """Every method x space on a bundled preset: test reference scores and one tuned cell each.

    `progress(cell, test_reference)` is called after each cell.
    """
    evaluator = evaluator_for(preset)
    test, validation = reference_scores(preset, evaluator, "test"), reference_scores(preset, evaluator, "validation")
    cells = []
    with tempfile.TemporaryDirectory(prefix="coremerge-eval-") as workdir:
        for space in spaces:
            for method in methods:
                cells.append(tune_and_score(preset, evaluator, method, space, validation, Path(workdir)))
                if progress is not None:
                    progress(cells[-1], test)
    return test, cells
