"""The page's "Compare methods": every method at the preset's tuned settings in core and full space, its quality
checked against an independent evaluation (transformers + peft, the committed heads), through the real server."""

import json

import gradio as gr
import pytest
import torch
import yaml
from gradio_client import Client
from peft import PeftModel
from safetensors.torch import load_file
from transformers import ViTModel

from coremerge import MergeOptions, merge_to_folder
from coremerge.bundled.digits import task_data
from coremerge.merging.methods import METHODS
from coremerge.presets import PRESETS_DIR, find_preset
from coremerge.webapp import handlers, method_comparison
from coremerge.webapp.method_comparison import COLUMNS, merge_every_method, quality_plan
from coremerge.webapp.sources import refusal
from coremerge.webapp.workflow import AdapterRow, MergeRequest

from test_app_hostile import HOSTILE, Reached, outcome_of

DIGITS = find_preset("digits")
ROWS = [[a.source, a.name, a.weight] for a in DIGITS.adapters]
TUNED = yaml.safe_load((PRESETS_DIR / "digits.yaml").read_text())["tuned"]  # read from the file, not the parser


@torch.no_grad()
def head_accuracy(model, head_folder, task) -> float:
    """Test accuracy of a task: the [CLS] embedding of the last hidden state through the task's committed head."""
    head = load_file(head_folder / "head.safetensors")
    images, labels = task_data(task, "test")
    logits = model(pixel_values=images).last_hidden_state[:, 0] @ head["weight"].T + head["bias"]
    return float((logits.argmax(-1) == labels).double().mean())


def independent_normalized_accuracy(merged_folder) -> float:
    """Average over tasks of merged accuracy / own adapter accuracy, with plain transformers + peft."""
    def accuracy(adapter_folder, task, head_folder):
        base = ViTModel.from_pretrained(str(DIGITS.folder / DIGITS.base_model), add_pooling_layer=False).eval()
        return head_accuracy(PeftModel.from_pretrained(base, str(adapter_folder)).eval(), head_folder, task)

    ratios = []
    for adapter in DIGITS.adapters:
        own = DIGITS.folder / adapter.source
        ratios.append(accuracy(merged_folder, adapter.task, own) / accuracy(own, adapter.task, own))
    return sum(ratios) / len(ratios)


def library_merge(folder, method, space):
    """The library's merge of the preset's adapters at the settings the YAML file gives `method` in `space`."""
    settings = {k: v for k, v in TUNED[method].items() if k not in ("core", "full", "knots")}
    settings.update(TUNED[method].get(space, {}))
    alpha = settings.pop("alpha")
    return merge_to_folder([str(DIGITS.folder / a.source) for a in DIGITS.adapters],
                           MergeOptions.create(method=method, space=space, alpha=alpha, **settings), folder)


def check_row(row, folder, report, method, space):
    """A table row against the library's merge at the same settings and an independent evaluation of it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    rank = max([config["r"], *config.get("rank_pattern", {}).values()])
    assert row[:2] == [METHODS[method].display_name, space]
    assert row[3] == f"{independent_normalized_accuracy(folder):.3f}"
    assert int(row[5]) == rank
    assert row[6] == f"{(folder / 'adapter_model.safetensors').stat().st_size / 1e6:.2f}"
    assert row[6] == f"{report['bytes']['out'] / 1e6:.2f}"


def test_compare_methods_through_the_server(app_server, tmp_path):
    client = Client(app_server, verbose=False)
    summary, table, chart = client.predict("digits", {"headers": handlers.ADAPTER_COLUMNS, "data": ROWS,
                                                      "metadata": None}, "", "", None,
                                           api_name="/compare_methods_button")
    assert table["headers"] == COLUMNS
    rows = table["data"]
    assert [(r[0], r[1]) for r in rows] == [(m.display_name, s) for m in METHODS.values() for s in ("core", "full")]
    assert all(r[3] != "n/a" and float(r[4]) >= 0 and r[7] == "" for r in rows)  # every merge ran and was scored
    assert summary.startswith("**Quality**: average normalized accuracy on the test split of 8 task(s)")
    assert "16 of 16 merges ran on CPU" in summary
    assert chart["type"] == "matplotlib"
    by_cell = {(r[0], r[1]): r for r in rows}
    for method, space in (("ta", "core"), ("ties", "full")):  # ties in full space: its own tuned alpha there
        folder = tmp_path / f"{method}-{space}"
        report = library_merge(folder, method, space)
        check_row(by_cell[(METHODS[method].display_name, space)], folder, report, method, space)
    assert by_cell[("TIES", "full")][2] == "alpha 1, density 0.4"
    assert by_cell[("TIES", "core")][2] == "alpha 1.5, density 0.4"


def test_switching_the_method_through_the_server_applies_its_tuned_settings(app_server):
    client = Client(app_server, verbose=False)
    by_name = dict(zip((p.name for p in handlers.PARAMETERS), range(len(handlers.PARAMETERS))))
    for method, space in (("ta", "core"), ("ties", "core"), ("ties", "full"), ("cart", "core")):
        info, alpha, *parameters = client.predict(method, "digits", space, api_name="/show_method")
        settings = {k: v for k, v in TUNED[method].items() if k not in ("core", "full", "knots")}
        settings.update(TUNED[method].get(space, {}))
        assert alpha == settings.pop("alpha") and "tuned on this preset's validation split" in info
        for name, value in settings.items():
            assert parameters[by_name[name]]["value"] == value and parameters[by_name[name]]["visible"]


def test_compare_methods_refuses_what_the_merge_refuses(cache):
    rows = ROWS[:2] + [["/etc/passwd", "X", 1]]
    for handler, args in ((handlers.merge_and_compare, ("digits", rows, "ta", "core", 0.4, False, None, "", "", None)),
                          (method_comparison.compare_methods_button, ("digits", rows, "", "", None))):
        with pytest.raises(gr.Error) as error:
            handler(*args)
        assert error.value.message == str(refusal(3))
    with pytest.raises(gr.Error) as error:
        method_comparison.compare_methods_button("digits", [ROWS[0], [ROWS[1][0], "B", float("nan")]], "", "", None)
    assert error.value.message == "adapter row 2, weight: nan is out of range; give a number in [-10, 10]"
    assert cache.folders() == []  # nothing left behind


def test_the_merge_budget_skips_the_rest(tmp_path):
    request = MergeRequest(DIGITS, tuple(AdapterRow(s, n, w) for s, n, w in ROWS[:2]), MergeOptions.create())
    runs = merge_every_method(request, [DIGITS.resolve(r[0]) for r in ROWS[:2]], tmp_path, budget=0.0)
    assert len(runs) == 2 * len(METHODS) and runs[0].folder is not None  # the first merge always runs
    assert all(run.folder is None and run.note == "skipped: the 0 s merge budget was used up" for run in runs[1:])
    rows = method_comparison.table_rows(method_comparison.MethodComparison(runs, "q", {}))
    assert rows[1][3:7] == ["n/a", "n/a", "n/a", "n/a"]


def test_image_presets_have_no_quality_and_say_why():
    preset = find_preset("sd15-styles")
    request = MergeRequest(preset, tuple(AdapterRow(a.source, a.name) for a in preset.adapters), MergeOptions.create(),
                           tuple(preset.samples.prompts))
    assert quality_plan(request, preset.adapter_sources) == (
        "n/a: image presets have no expected answers to score generated images against", (), ())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from coremerge.webapp.cache import ResultCache

    cache = ResultCache(root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    monkeypatch.setattr(method_comparison, "CACHE", cache)
    return cache


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:20])
def test_compare_methods_with_a_hostile_value(cache, monkeypatch, value):
    """As the merge button: each argument or table cell hostile gives a result or one clean line (test_app_hostile)."""
    def stop(request, folder, progress=None, score=None, budget=None):
        raise Reached()

    monkeypatch.setattr(method_comparison, "compare_methods", stop)
    args = ["digits", [list(r) for r in ROWS[:2]], "", "", None]
    for position in range(len(args)):
        hostile = list(args)
        hostile[position] = value
        outcome_of(method_comparison.compare_methods_button, *hostile)
    for row in range(2):
        for column in range(3):
            table = [list(r) for r in ROWS[:2]]
            table[row][column] = value
            outcome_of(method_comparison.compare_methods_button, "digits", table, "", "", None)
    assert cache.folders() == []


def test_compare_methods_on_a_text_preset_scores_exact_match(tmp_path):
    """questions: exact match on the page's prompts; TA's row equals plain transformers + peft greedy answers of
    the library's merge at TA's tuned alpha, against the answers in the preset's test.jsonl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset = find_preset("questions")
    rows = [[a.source, a.name, a.weight] for a in preset.adapters]
    answers = {json.loads(line)["prompt"]: json.loads(line)["answer"]
               for line in (preset.folder / "questions" / "test.jsonl").read_text().splitlines()}
    prompts = [p for p in preset.samples.prompts if p in answers][:4]
    assert len(prompts) == 4
    summary, table, _ = method_comparison.compare_methods_button(
        "questions", rows, "\n".join(p.replace("\n", "\\n") for p in prompts), "", None)
    assert summary.startswith("**Quality**: exact match on the 4 prompt(s) on the page with an expected answer")
    alpha = yaml.safe_load((PRESETS_DIR / "questions.yaml").read_text())["tuned"]["ta"]["alpha"]
    merge_to_folder([str(preset.folder / a.source) for a in preset.adapters],
                    MergeOptions.create(method="ta", space="core", alpha=alpha), tmp_path / "ta")
    tokenizer = AutoTokenizer.from_pretrained(str(preset.folder / preset.base_model))
    base = AutoModelForCausalLM.from_pretrained(str(preset.folder / preset.base_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "ta")).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        output = model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    said = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    exact = sum(s.split("\n")[0].strip() == answers[p] for s, p in zip(said, prompts)) / len(prompts)
    assert table[0][:4] == ["Task Arithmetic", "core", f"alpha {alpha:g}", f"{exact:.3f}"]


@pytest.fixture
def zerogpu(monkeypatch, tmp_path):
    """method_comparison re-imported under test_zerogpu's stand-in for spaces.GPU (a forked worker per call);
    model loads and the scoring's use of the model logged with their process."""
    import importlib

    import spaces

    from coremerge.comparison import runners
    from coremerge.webapp.cache import ResultCache
    from test_zerogpu import fork_per_call, logged

    durations, log = [], tmp_path / "processes.log"
    monkeypatch.setattr(spaces, "GPU", fork_per_call(durations))
    monkeypatch.setattr(runners, "build_runner", logged(log, "load", runners.build_runner))
    runners.runner_for.cache_clear()
    importlib.reload(method_comparison)
    monkeypatch.setattr(method_comparison, "CACHE", ResultCache(root=tmp_path / "cache"))
    monkeypatch.setattr(method_comparison, "runner_for", logged(log, "use", method_comparison.runner_for))
    yield durations, log
    monkeypatch.undo()
    importlib.reload(method_comparison)
    runners.runner_for.cache_clear()


def test_under_zerogpu_the_model_loads_once_and_only_the_scoring_runs_in_the_worker(zerogpu):
    import os

    from test_zerogpu import processes

    durations, log = zerogpu
    summary, rows, _ = method_comparison.compare_methods_button("digits", ROWS[:2], "", "", None)
    assert processes(log, "load") == [os.getpid()]  # in the main process, before the fork
    workers = set(processes(log, "use")) - {os.getpid()}
    assert len(workers) == 1  # one GPU call scores every merge
    assert len(durations) == 1 and 15 <= durations[0] <= 300
    assert all(row[3] != "n/a" for row in rows)  # the scores came back through pickle
    assert summary.startswith("**Quality**: average normalized accuracy on the test split of 2 task(s)")


def test_a_method_that_cannot_merge_the_rows_is_one_row_note_not_a_failed_comparison(cache):
    """The same adapter at weights 1 and -1: TA's sum is zero (nothing to write), DARE's random drops are not."""
    source = DIGITS.adapters[0].source
    summary, rows, _ = method_comparison.compare_methods_button(
        "digits", [[source, "A", 1], [source, "minus A", -1]], "", "", None)
    by_cell = {(r[0], r[1]): r for r in rows}
    ta = by_cell[("Task Arithmetic", "core")]
    assert ta[3:] == ["n/a", "n/a", "n/a", "n/a",
                      "failed: the merged update is zero in every module (do the weights cancel?); nothing to write"]
    dare = by_cell[("DARE", "core")]
    assert dare[7] == "" and dare[3] != "n/a" and int(dare[5]) > 0
    assert cache.folders() == []


def test_uploaded_adapters_of_another_model_are_compared_without_a_quality_and_leave_nothing(cache, adapters,
                                                                                              tmp_path):
    """An uploaded zip goes through the same upload checks as for the merge; no preset runs its model, so the
    quality is "n/a" with the merge's own reason, and the merges still run."""
    from test_app_uploads import zipped

    members = {f"llama/{p.name}": p.read_bytes() for p in adapters["plain"].iterdir() if p.is_file()}
    archive = zipped(tmp_path, "llama.zip", members)
    summary, rows, _ = method_comparison.compare_methods_button("digits", [["upload:llama.zip", "Llama", 1.0]], "",
                                                                "", [str(archive)])
    assert summary.startswith("**Quality**: n/a: these adapters are for coremerge-tests/tiny-llama, and preset "
                              "digits runs coremerge/digits-vit; no preset here runs that model")
    assert "16 of 16 merges ran" in summary and all(row[3] == "n/a" for row in rows)
    assert str(tmp_path) not in summary + repr(rows) and cache.folders() == []
