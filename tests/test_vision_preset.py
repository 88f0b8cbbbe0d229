"""The bundled vision preset: committed files, recorded accuracies, and a merge that beats the base."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coremerge import MergeOptions, load_adapter, merge_to_folder
from coremerge.bundled.digits import BASE_NAME, TASKS, DigitsEvaluator, load_head, task_head
from coremerge.comparison.evaluation import Scores, evaluator_for, merged_accuracies, reference_scores
from coremerge.presets import check_manifest, find_preset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def preset():
    return find_preset("digits")


@pytest.fixture(scope="module")
def evaluator(preset) -> DigitsEvaluator:
    return evaluator_for(preset)


@pytest.fixture(scope="module")
def recorded(preset):
    return json.loads((preset.folder / "digits" / "accuracy.json").read_text())


def test_files_match_the_manifest(preset):
    check_manifest(preset.folder / "digits")


def test_preset_is_bundled_with_eight_task_adapters(preset):
    assert preset.bundled and preset.kind == "image-classification"
    assert [a.task for a in preset.adapters] == list(TASKS)
    for adapter in map(load_adapter, preset.adapter_sources):
        assert adapter.base_model == BASE_NAME
        assert set(adapter.ranks.values()) == {8} and len(adapter.modules) == 4 * 6
    for image in preset.samples.images:
        assert (preset.folder / image.path).is_file() and image.label in TASKS[image.task].labels


def test_adapters_reproduce_recorded_accuracies(preset, evaluator, recorded):
    scores = reference_scores(preset, evaluator, "test")
    assert scores.individual == pytest.approx(recorded["adapters"], abs=1e-9)
    assert scores.base == pytest.approx(recorded["base"], abs=1e-9)
    assert min(scores.individual.values()) >= 0.95
    weak = [t for t in TASKS if scores.base[t] < scores.individual[t] - 0.2]
    assert len(weak) >= 6, scores.base  # the base is weak on most tasks


def test_each_task_keeps_its_own_frozen_head(preset, evaluator):
    heads = [load_head(preset.resolve(a.source)) for a in preset.adapters]
    for adapter, head in zip(preset.adapters, heads):
        expected = task_head(adapter.task, head.in_features)
        # the saved head is the one task_head draws (up to the last bits of a QR on other thread counts)
        assert torch.allclose(head.weight, expected.weight, atol=1e-6) and torch.equal(head.bias, expected.bias)
    embeddings = torch.cat([head.weight for head in heads])  # every class of every task: one orthonormal set
    assert torch.allclose(embeddings @ embeddings.T, torch.eye(len(embeddings)), atol=1e-5)


def test_a_merge_beats_the_base_on_average(preset, evaluator, recorded, tmp_path):
    merge_to_folder(preset.adapter_sources, MergeOptions.create(method="tsv", alpha=0.5), tmp_path / "merged")
    [merged, doubled] = merged_accuracies(evaluator, str(tmp_path / "merged"), "test", scales=(1.0, 2.0))
    assert Scores.mean(merged) > Scores.mean(recorded["base"]) + 0.1
    assert str(tmp_path / "merged") not in evaluator.loaded  # merged adapters are unloaded after scoring
    # scaling the loaded adapter by 2 is the same as merging with alpha 2 * 0.5
    merge_to_folder(preset.adapter_sources, MergeOptions.create(method="tsv", alpha=1.0), tmp_path / "alpha1")
    [alpha1] = merged_accuracies(evaluator, str(tmp_path / "alpha1"), "test")
    assert doubled == pytest.approx(alpha1, abs=0.01)


def test_predictions_name_the_task_labels(evaluator, preset):
    import numpy as np
    import torch
    from PIL import Image

    image = preset.samples.images[0]
    pixels = np.asarray(Image.open(preset.folder / image.path), dtype=np.float32) / 255
    own = next(preset.resolve(a.source) for a in preset.adapters if a.task == image.task)
    [label] = evaluator.predict(image.task, torch.from_numpy(pixels)[None, None], own)
    assert label == image.label


@pytest.mark.skipif(not os.environ.get("COREMERGE_SLOW"), reason="rebuilds the preset (about 15 min); COREMERGE_SLOW=1")
def test_build_script_reproduces_the_preset(tmp_path, recorded):
    output = tmp_path / "digits"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_vision_preset.py"), "--output", str(output)],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    check_manifest(output)
    rebuilt = json.loads((output / "accuracy.json").read_text())
    assert rebuilt["adapters"] == pytest.approx(recorded["adapters"], abs=0.03)
    assert rebuilt["base"] == pytest.approx(recorded["base"], abs=0.05)
