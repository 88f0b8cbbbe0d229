"""Base, each adapter and the merged adapter side by side, on one loaded base model.

A runner holds the base model (loaded once) and switches adapters on it by folder; see
`coremerge.runners` for the runners of each preset kind. The merged adapter is unloaded again
after the comparison, since its folder is temporary.
"""

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Variant:
    """One column of the comparison."""

    name: str
    adapter: Optional[str] = None  # adapter folder; None is the base model alone
    task: Optional[str] = None  # the task an individual adapter was trained for


def variants_of(names: Sequence[str], folders: Sequence[str], tasks: Sequence[Optional[str]], merged: str
                ) -> list[Variant]:
    """Base, then each adapter, then the merged adapter."""
    individual = [Variant(name, folder, task) for name, folder, task in zip(names, folders, tasks)]
    return [Variant("Base"), *individual, Variant("Merged", merged)]


class Classifier(Protocol):
    def predict(self, task: str, images: torch.Tensor, adapter: Optional[str] = None) -> list[str]: ...

    def accuracy(self, task: str, adapter: Optional[str] = None, split: str = "test", scale: float = 1.0
                 ) -> float: ...

    def forget(self, adapter: str) -> None: ...


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], adapter: Optional[str] = None) -> list[str]: ...

    # Optional: `expected(prompt) -> Optional[str]`, the right answer to a prompt (bundled presets), and
    # `task_of(prompt) -> Optional[str]`, the task that asks it (the cross-task table).

    def forget(self, adapter: str) -> None: ...


@dataclass(frozen=True)
class LabelledImage:
    path: str
    task: str
    label: str


@dataclass(frozen=True)
class TaskAccuracy:
    """Test accuracy on one task: base model, the task's own adapter, and the merge."""

    task: str
    base: float
    individual: float
    merged: float

    @property
    def normalized(self) -> float:
        """The paper's metric: merged accuracy / the task's own adapter's accuracy."""
        return self.merged / self.individual if self.individual else 0.0


@dataclass(frozen=True)
class ClassificationComparison:
    variants: list[str]
    images: list[LabelledImage]
    predictions: list[list[str]]  # image x variant
    accuracy: list[TaskAccuracy]

    @property
    def average_normalized(self) -> float:
        return sum(a.normalized for a in self.accuracy) / len(self.accuracy) if self.accuracy else 0.0


@dataclass(frozen=True)
class TextComparison:
    variants: list[str]
    prompts: list[str]
    outputs: list[list[str]]  # prompt x variant
    expected: Optional[list[Optional[str]]] = None  # per prompt, for presets whose prompts have one right answer
    tasks: Optional[list[Optional[str]]] = None  # per prompt, the task that asks it (bundled text presets)
    variant_tasks: Optional[list[Optional[str]]] = None  # per variant, the task its adapter was trained for

    def right(self, prompt: int, variant: int) -> Optional[bool]:
        """Whether a variant's answer (first line, stripped) is the expected one; None without an expected answer."""
        want = self.expected[prompt] if self.expected else None
        if want is None:
            return None
        return self.outputs[prompt][variant].split("\n")[0].strip() == want.split("\n")[0].strip()

    @property
    def scores(self) -> Optional[list[float]]:
        """Each variant's exact match on the prompts that have an expected answer; None if none has."""
        scored = [p for p in range(len(self.prompts)) if self.right(p, 0) is not None]
        if not scored:
            return None
        return [sum(self.right(p, v) for p in scored) / len(scored) for v in range(len(self.variants))]

    @property
    def by_task(self) -> dict[str, list[float]]:
        """The cross-task table: for each task (in prompt order), each variant's exact match on that task's
        prompts. An adapter's row entries off its own task show what it does to the others' inputs."""
        prompts: dict[str, list[int]] = {}
        for p, task in enumerate(self.tasks or ()):
            if task is not None and self.right(p, 0) is not None:
                prompts.setdefault(task, []).append(p)
        return {task: [sum(self.right(p, v) for p in ps) / len(ps) for v in range(len(self.variants))]
                for task, ps in prompts.items()}


def grayscale_pixels(path: str) -> torch.Tensor:
    """A grayscale image as the (1, 1, H, W) float tensor in [0, 1] that the bundled vision model reads."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None, None]


def _unload_merged(runner, variants: Sequence[Variant]) -> None:
    runner.forget(variants[-1].adapter)


_REFERENCE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _reference(runner, key: tuple, compute: Callable[[], object]) -> object:
    """The base model's and the individual adapters' results do not change from merge to merge:
    computed once per runner and kept (the merged adapter, in a new folder each time, never is)."""
    memo = _REFERENCE.setdefault(runner, {})
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _column(runner: Classifier, images: Sequence[LabelledImage], adapter: Optional[str], remember: bool
            ) -> list[str]:
    """One variant's label for every image, each with its task's head (one batch per task)."""
    labels = [""] * len(images)
    by_task: dict[str, list[int]] = {}
    for index, image in enumerate(images):
        by_task.setdefault(image.task, []).append(index)
    for task, indices in by_task.items():
        paths = tuple(images[i].path for i in indices)

        def predict(task=task, paths=paths):
            return runner.predict(task, torch.cat([grayscale_pixels(p) for p in paths]), adapter)

        predicted = _reference(runner, ("predict", adapter, task, paths), predict) if remember else predict()
        for i, label in zip(indices, predicted):
            labels[i] = label
    return labels


def _reference_accuracy(runner: Classifier, task: str, adapter: Optional[str]) -> float:
    return _reference(runner, ("accuracy", adapter, task), lambda: runner.accuracy(task, adapter))


def warm_up_classification(runner: Classifier, images: Sequence[LabelledImage], variants: Sequence[Variant]) -> None:
    """Compute and keep the base's and the individual adapters' results before the first merge."""
    for variant in variants:
        _column(runner, images, variant.adapter, remember=True)
        if variant.task is not None:
            _reference_accuracy(runner, variant.task, None)
            _reference_accuracy(runner, variant.task, variant.adapter)


def compare_classification(runner: Classifier, images: Sequence[LabelledImage], variants: Sequence[Variant],
                           progress: Progress = lambda stage: None) -> ClassificationComparison:
    """Every variant's label for every sample image (with the image's task head), and per-task test
    accuracy of the base, each task's own adapter and the merge. `variants[-1]` is the merge."""
    merged = variants[-1].adapter
    try:
        columns = []
        for variant in variants:
            progress(f"classifying the samples: {variant.name}")
            columns.append(_column(runner, images, variant.adapter, remember=variant.adapter != merged))
        accuracy = []
        for variant in variants[1:-1]:
            if variant.task is not None:
                progress(f"test accuracy: {variant.task}")
                accuracy.append(TaskAccuracy(
                    task=variant.task,
                    base=_reference_accuracy(runner, variant.task, None),
                    individual=_reference_accuracy(runner, variant.task, variant.adapter),
                    merged=runner.accuracy(variant.task, merged),
                ))
    finally:
        _unload_merged(runner, variants)
    predictions = [list(row) for row in zip(*columns)]
    return ClassificationComparison([v.name for v in variants], list(images), predictions, accuracy)


def compare_text(runner: Generator, prompts: Sequence[str], variants: Sequence[Variant],
                 progress: Progress = lambda stage: None) -> TextComparison:
    """Every variant's answer to every prompt (greedy, so the same prompt gives the same answer), and the
    expected answers when the runner knows them (`runner.expected(prompt)`, bundled presets)."""
    try:
        columns = []
        for variant in variants:
            progress(f"generating: {variant.name}")
            columns.append(runner.generate(list(prompts), variant.adapter))
    finally:
        _unload_merged(runner, variants)
    expected = [runner.expected(p) for p in prompts] if hasattr(runner, "expected") else None
    tasks = [runner.task_of(p) for p in prompts] if hasattr(runner, "task_of") else None
    return TextComparison([v.name for v in variants], list(prompts), [list(row) for row in zip(*columns)],
                          expected if expected and any(e is not None for e in expected) else None,
                          tasks if tasks and any(t is not None for t in tasks) else None,
                          [v.task for v in variants])


def sample_images(folder: Path, samples) -> list[LabelledImage]:
    """A preset's sample images with absolute paths."""
    return [LabelledImage(str(Path(folder) / s.path), s.task, s.label) for s in samples]
