"""The bundled questions preset: committed files, the preset contract, recorded accuracies reproduced with plain
transformers + peft (not coremerge's evaluation), and a CLI merge with the preset's settings that works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from coremerge.bundled import questions, strings
from coremerge.presets import check_manifest, find_preset, list_presets

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "presets" / "questions"


@pytest.fixture(scope="module")
def preset():
    return find_preset("questions")


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load((ROOT / "presets" / "questions.yaml").read_text())


@pytest.fixture(scope="module")
def recorded():
    return json.loads((FOLDER / "accuracy.json").read_text())


@pytest.fixture(scope="module")
def rows():
    return questions.read_test_rows(FOLDER / "test.jsonl")


def test_files_match_the_manifest():
    check_manifest(FOLDER)


def test_preset_file_follows_the_contract(raw, preset):
    assert raw["kind"] == "text-generation" and raw["bundled"] is True
    assert (ROOT / "presets" / raw["base_model"]).is_dir()
    assert [a["task"] for a in raw["adapters"]] == list(questions.TASKS)
    for adapter in raw["adapters"]:
        assert (ROOT / "presets" / adapter["source"] / "adapter_config.json").is_file()
    assert set(raw["merge"]) == {"method", "space", "alpha"}
    text_presets = [p.name for p in list_presets() if p.kind == "text-generation"]
    assert text_presets[0] == "questions" and "strings" in text_presets  # offered first; strings kept


def test_merge_settings_are_the_ones_chosen_on_validation(raw, recorded):
    assert raw["merge"] == recorded["merge"]


def test_test_rows_are_the_held_out_split(rows):
    assert {row["task"] for row in rows} == set(questions.TASKS) and len(questions.TASKS) >= 4
    for task in questions.TASKS:
        mine = [(r["prompt"], r["answer"]) for r in rows if r["task"] == task]
        assert len(mine) >= 50
        assert mine == questions.examples(task, "test", len(mine))
        assert sum(answer == "yes" for _, answer in mine) == len(mine) // 2  # balanced labels
    for row in rows:
        text = row["prompt"].rstrip("\n").split(" ")[-1]
        assert questions.split_of(text) == "test" and set(row) == {"task", "prompt", "answer"}


@pytest.mark.parametrize("task, text, answer", [
    ("even", "4821", "no"), ("even", "130", "yes"), ("vowel", "banana", "yes"), ("vowel", "kiwis", "no"),
    ("hasq", "KIWQI", "yes"), ("hasq", "MUZ", "no"), ("star", "+*=", "yes"), ("star", "+-=", "no"),
])
def test_questions_by_hand(task, text, answer):
    spec = questions.TASKS[task]
    assert spec.prompt(text) == f"{spec.question} {text}\n" and spec.answer(text) == answer


def test_tokenizer_is_plain_bytes():
    text = "has a Q? KIWQI\n*é"
    ids = questions.tokenizer()(text).input_ids  # no special tokens added
    assert ids == strings.tokenizer()(text, add_special_tokens=False).input_ids == [b + 3 for b in text.encode()]


# Scoring with plain transformers and peft, as anyone can check the preset.


@pytest.fixture(scope="module")
def plain():
    tokenizer = AutoTokenizer.from_pretrained(str(FOLDER / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(FOLDER / "base"), dtype=torch.float32).eval()
    return tokenizer, model


@torch.no_grad()
def plain_exact_match(tokenizer, model, rows) -> float:
    """Greedy answers to the rows' prompts (one left-padded batch), first line stripped, against the answers."""
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True, padding_side="left")
    output = model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(answer.split("\n")[0].strip() == row["answer"].split("\n")[0].strip()
               for answer, row in zip(answers, rows)) / len(rows)


def first_rows(rows, task, n=questions.CHECK_SIZE):
    return [r for r in rows if r["task"] == task][:n]


def test_recorded_accuracies_meet_the_targets(recorded):
    assert all(recorded["adapters"][task] >= 0.95 for task in questions.TASKS)
    assert all(recorded["base"][task] <= 0.10 for task in questions.TASKS)
    assert recorded["merged_normalized"]["average"] >= 0.80 and recorded["merged_normalized"]["worst"] >= 0.60


def test_base_and_adapters_reproduce_the_recorded_figures(plain, rows, recorded):
    """On the first CHECK_SIZE test rows of each task, plain greedy decoding gives the recorded quick figures."""
    tokenizer, base = plain
    quick = recorded["quick"]
    for task in questions.TASKS:
        assert plain_exact_match(tokenizer, base, first_rows(rows, task)) == pytest.approx(quick["base"][task])
    model = None
    for task in questions.TASKS:
        folder = str(FOLDER / "adapters" / task)
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=task).eval()
        else:
            model.load_adapter(folder, adapter_name=task)
        model.set_adapter(task)
        assert plain_exact_match(tokenizer, model, first_rows(rows, task)) == pytest.approx(quick["adapters"][task])
    model.unload()


def test_cli_merge_with_the_preset_settings_meets_the_targets(raw, rows, recorded, tmp_path):
    """`python -m coremerge merge --preset questions` (which takes the YAML's merge settings), scored on every test
    row."""
    subprocess.run([sys.executable, "-m", "coremerge", "merge", "--preset", "questions",
                    "--output", str(tmp_path / "merged")],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    chosen = raw["merge"]
    assert (report["method"], report["space"], report["alpha"]) == (chosen["method"], chosen["space"], chosen["alpha"])
    tokenizer = AutoTokenizer.from_pretrained(str(FOLDER / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(FOLDER / "base"), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "merged")).eval()
    merged = {task: plain_exact_match(tokenizer, model, [r for r in rows if r["task"] == task])
              for task in questions.TASKS}
    assert merged == pytest.approx(recorded["merged"], abs=0.011)  # the build's merge, up to one answer in 100
    normalized = [merged[task] / recorded["adapters"][task] for task in questions.TASKS]
    assert sum(normalized) / len(normalized) >= 0.80 and min(normalized) >= 0.60, merged


@pytest.mark.skipif(not os.environ.get("COREMERGE_SLOW"), reason="a rebuild from scratch takes about 15 minutes; "
                    "set COREMERGE_SLOW=1")
def test_rebuild_from_scratch_writes_the_same_files(tmp_path):
    """Base, adapters, test rows and recorded accuracies, rebuilt from scratch, byte for byte."""
    output = tmp_path / "questions"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_questions_preset.py"), "--output", str(output)],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    committed = json.loads((FOLDER / "manifest.json").read_text())
    assert json.loads((output / "manifest.json").read_text()) == committed


def test_build_presets_rebuilds_questions_with_its_own_script():
    """scripts/build_presets.py runs build_questions_preset.py for presets/questions, beside the other two."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_presets
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert list(build_presets.BUILDS) == ["digits", "strings", "questions"]
    assert build_presets.BUILDS["questions"] == ["build_questions_preset.py"]  # it fixes its own thread count
    assert all((ROOT / "scripts" / script).is_file() for script, *_ in build_presets.BUILDS.values())


def test_the_build_hashes_every_written_file(tmp_path):
    """The digest the build prints to compare two rebuilds changes with any file's bytes or name."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from build_questions_preset import file_digests
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"12")
    first = file_digests(tmp_path)
    assert file_digests(tmp_path) == first
    (tmp_path / "a" / "x.bin").write_bytes(b"13")
    assert file_digests(tmp_path) != first
    (tmp_path / "a" / "x.bin").rename(tmp_path / "a" / "y.bin")
    (tmp_path / "a" / "y.bin").write_bytes(b"12")
    assert file_digests(tmp_path) != first
