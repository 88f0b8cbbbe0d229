"""The bundled text preset: committed files, string tasks, exact match, recorded accuracies, the rebuild."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coremerge import load_adapter
from coremerge.bundled import strings
from coremerge.comparison.evaluation import evaluator_for, reference_scores
from coremerge.presets import check_manifest, find_preset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def preset():
    return find_preset("strings")


@pytest.fixture(scope="module")
def evaluator(preset) -> strings.StringsEvaluator:
    return evaluator_for(preset)


@pytest.fixture(scope="module")
def recorded(preset):
    return json.loads((preset.folder / "strings" / "accuracy.json").read_text())


def test_files_match_the_manifest(preset):
    check_manifest(preset.folder / "strings")


def test_preset_is_bundled_with_four_task_adapters(preset):
    assert preset.bundled and preset.kind == "text-generation"
    assert [a.task for a in preset.adapters] == list(strings.TASKS)
    for adapter in map(load_adapter, preset.adapter_sources):
        assert adapter.base_model == strings.BASE_NAME
        assert set(adapter.ranks.values()) == {8} and len(adapter.modules) == 4 * 7
    longest = 2 * strings.MAX_LENGTH + 1  # `double` of the longest word, and its newline
    assert preset.samples.generation["max_new_tokens"] >= longest
    for prompt in preset.samples.prompts:
        task, word = prompt.split(": ")
        assert task in list(strings.TASKS) + ["copy"] and word.endswith("\n"), prompt
        assert strings.split_of(word.rstrip("\n")) == "test", f"{prompt!r}: sample words are held out"


@pytest.mark.parametrize("task, word, answer", [
    ("upper", "abz", "ABZ\n"), ("caesar", "abz", "bca\n"), ("double", "abz", "aabbzz\n"),
    ("atbash", "abz", "zya\n"), ("copy", "abz", "abz\n"),
])
def test_tasks_by_hand(task, word, answer):
    spec = strings.task_spec(task)
    assert spec.prompt(word) == f"{task}: {word}\n" and spec.answer(word) == answer


def test_splits_are_fixed_disjoint_and_seeded():
    test = strings.task_words("upper", "test", 20)
    assert test == strings.task_words("upper", "test", 20)  # the same inputs every time
    assert len(set(test)) == 20 and all(strings.split_of(w) == "test" for w in test)
    assert not set(test) & set(strings.task_words("upper", "train", 200))
    assert all(strings.MIN_LENGTH <= len(w) <= strings.MAX_LENGTH for w in test)
    with pytest.raises(ValueError, match="split 'dev'"):
        strings.task_words("upper", "dev", 3)


def test_exact_match_by_hand():
    expected = ["ABC\n", "bcd\n", "xx\n", "q\n"]
    assert strings.exact_match(["ABC", "bcd", "x", "Q"], expected) == 0.5
    assert strings.exact_match(["ABC", "bcd", "xx", "q"], expected) == 1.0
    with pytest.raises(ValueError, match="3 answers for 4 expected"):
        strings.exact_match(["ABC", "bcd", "xx"], expected)


def test_bad_tasks_are_named(evaluator, preset):
    with pytest.raises(ValueError, match="task 'reverse'"):
        evaluator.accuracy("reverse")
    with pytest.raises(ValueError, match="'reverse'"):
        strings.StringsEvaluator(preset.base_model_path, tasks=["upper", "reverse"])


def test_recorded_accuracies_meet_the_targets(recorded):
    assert recorded["split"] == "test" and recorded["n"] == strings.EVAL_SIZE
    assert min(recorded["adapters"].values()) >= 0.95
    assert max(recorded["base"].values()) <= 0.05  # the base does none of the tasks: it copies
    assert recorded["base_copy"] >= 0.9


def test_adapters_reproduce_recorded_accuracies(preset, evaluator, recorded):
    quick = recorded["quick"]  # the first CHECK_SIZE test inputs per task: a few seconds instead of a minute
    evaluator.n = quick["n"]
    try:
        scores = reference_scores(preset, evaluator, "test")
    finally:
        evaluator.n = strings.EVAL_SIZE
    # greedy decoding is deterministic; the tolerance covers a rare float tie on other CPUs
    assert scores.individual == pytest.approx(quick["adapters"], abs=0.051)
    assert scores.base == pytest.approx(quick["base"], abs=0.051)


def test_sample_prompts_answered_by_their_adapter(preset, evaluator):
    upper = preset.resolve("strings/adapters/upper")
    caesar = preset.resolve("strings/adapters/caesar")
    assert evaluator.generate(["upper: banana", "caesar: matrix\n"], upper)[0] == "BANANA"
    assert evaluator.generate(["caesar: matrix\n"], caesar) == ["nbusjy"]


@pytest.mark.skipif(not os.environ.get("COREMERGE_SLOW"),
                    reason="all 100 test words per task (78 s on the shared 2-core machine); COREMERGE_SLOW=1")
def test_adapters_reproduce_recorded_accuracies_on_the_full_test_set(preset, evaluator, recorded):
    scores = reference_scores(preset, evaluator, "test")
    assert scores.individual == pytest.approx(recorded["adapters"], abs=1e-9)
    assert scores.base == pytest.approx(recorded["base"], abs=1e-9)


@pytest.mark.skipif(not os.environ.get("COREMERGE_SLOW"), reason="rebuilds the preset (about 30 min); COREMERGE_SLOW=1")
def test_build_script_reproduces_the_preset(tmp_path, recorded):
    output = tmp_path / "strings"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_text_preset.py"), "--output", str(output),
                    "--threads", "1"], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    check_manifest(output)
    rebuilt = json.loads((output / "accuracy.json").read_text())
    assert rebuilt["adapters"] == pytest.approx(recorded["adapters"], abs=0.05)
    assert rebuilt["base"] == pytest.approx(recorded["base"], abs=0.05)
