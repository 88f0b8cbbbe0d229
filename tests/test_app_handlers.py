"""The app's handlers, called directly (no browser): presets, methods, merge and compare, cache, errors, push."""

import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import peft_deltas

from coremerge import METHODS
from coremerge.bundled.digits import load_backbone
from coremerge.presets import find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache
from coremerge.webapp.sources import refusal

DIGITS = find_preset("digits")
THREE_ROWS = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:3]]


def merge(rows=THREE_ROWS, method="ta", space="core", alpha=0.5, isotropize=False, rank=None, **params):
    values = [params.get(p.name, METHODS[method].defaults().get(p.name, p.default)) for p in handlers.PARAMETERS]
    return handlers.merge_and_compare("digits", rows, method, space, alpha, isotropize, rank, "", None, None,
                                      lambda fraction, desc=None: None, *values)


def app_error(handler, *args, **kwargs) -> str:
    """The message of the gr.Error a handler raises (what the page shows)."""
    with pytest.raises(gr.Error) as error:
        handler(*args, **kwargs)
    return error.value.message


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> ResultCache:
    cache = ResultCache(capacity=2, root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    return cache


def test_preset_view_lists_the_default_preset_and_reads_the_base_model_from_the_adapters():
    assert handlers.default_preset() == "digits"
    assert [name for _, name in handlers.preset_choices()][0] == "digits"  # bundled presets first
    rows, description, base, prompts, is_text = handlers.preset_view("digits")
    assert rows == [[a.source, a.name, 1.0] for a in DIGITS.adapters]
    assert base.startswith("**Base model** `coremerge/digits-vit` (from the adapters' configs) · 8 adapters · rank 8")
    assert "works offline" in description and not is_text
    assert handlers.show_preset("digits")[4:] == ("tsv", "core", 0.7)  # the preset's merge defaults


@pytest.mark.parametrize("method", list(METHODS))
def test_method_controls_follow_the_registry(method):
    info, alpha, *updates = handlers.show_method(method)
    assert METHODS[method].paper_url in info and METHODS[method].display_name in info
    defaults = METHODS[method].defaults()
    shown = {p.name: u["value"] for p, u in zip(handlers.PARAMETERS, updates) if u["visible"]}
    assert shown == defaults and alpha == 1.0  # no preset: the method's defaults


# digits.yaml's tuned block, as the file gives it (core space, chosen on the validation split)
DIGITS_TUNED = {"ta": (0.4, {}), "ties": (1.5, {"density": 0.4}), "dare": (0.4, {"density": 0.9, "seed": 0}),
                "dare_ties": (1.5, {"density": 0.9, "seed": 0}), "tsv": (0.7, {}), "iso_c": (1.5, {}),
                "iso_cts": (1.5, {"common_fraction": 0.8}), "cart": (2.0, {"rank_fraction": 0.04, "cart_lambda": 0.1})}


@pytest.mark.parametrize("method", list(METHODS))
def test_switching_the_method_applies_the_presets_tuned_settings(method):
    info, alpha, *updates = handlers.show_method(method, "digits")
    shown = {p.name: u["value"] for p, u in zip(handlers.PARAMETERS, updates) if u["visible"]}
    assert (alpha, shown) == DIGITS_TUNED[method]
    assert "tuned on this preset's validation split" in info


def test_switching_the_method_on_a_preset_without_tuned_settings_gives_the_defaults():
    info, alpha, *updates = handlers.show_method("ties", "strings")
    assert alpha == 1.0 and "strings has no tuned settings for it" in info
    assert {p.name: u["value"] for p, u in zip(handlers.PARAMETERS, updates) if u["visible"]} == {"density": 0.2}
    assert handlers.show_method("ties", "digits", "full")[1] == 1.0  # full space's search chose another alpha
    assert handlers.show_method("ta", "questions")[1] == 0.8  # questions' own choice
    assert handlers.show_method("tsv", "questions")[1] == 0.9


def test_adapter_rows_skip_blank_rows_and_name_bad_cells():
    rows = handlers.adapter_rows([["org/a", "", ""], ["", "", None], ["./b/", "B", "0.5"]])
    assert [(r.source, r.name, r.weight) for r in rows] == [("org/a", "a", 1.0), ("./b/", "B", 0.5)]
    with pytest.raises(ValueError, match=r"^adapter row 2, weight: 'heavy' is not a number$"):
        handlers.adapter_rows([["org/a", "A", 1], ["org/b", "B", "heavy"]])
    with pytest.raises(ValueError, match=r"^adapter row 1: no source; give a Hub ID, a preset path or upload:file$"):
        handlers.adapter_rows([["", "A", 1]])


def test_merge_and_compare_shows_every_variant_and_a_zip_that_peft_loads_with_the_merged_update(fresh_cache, tmp_path):
    summary, comparison, accuracy, report, ranks, spectra, overlap, zip_path, snippet, key = merge()
    names = ["Base", *[row[1] for row in THREE_ROWS], "Merged"]
    assert all(f"<th>{name}</th>" in comparison for name in names)
    assert comparison.count("<img ") == len(DIGITS.samples.images)
    assert accuracy["visible"] and accuracy["value"] is not None
    assert "Average normalized accuracy of the merge" in summary and "**Task Arithmetic**" in summary
    assert "| merging |" in report and len(ranks) == 24 and spectra is not None and overlap is not None
    assert f"| {THREE_ROWS[0][1]} | `{THREE_ROWS[0][0]}` |" in report  # sources as the rows give them

    zipfile.ZipFile(zip_path).extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / "merged-adapter"  # the folder the snippet loads
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                  "merge_report.json", "README.md"}
    assert json.loads((folder / "merge_report.json").read_text())["method"] == "ta"
    card = (folder / "README.md").read_text()
    assert "ships with coremerge, in the folder `presets/digits/base`" in card and "Task Arithmetic" in card
    assert "Rotated 90°" in card and "base_model:" not in card  # not a Hub ID
    # TA in core space is exact: the merged delta is alpha * the sum of the inputs' deltas, as peft computes them
    base = load_backbone(DIGITS.folder / "digits" / "base")
    inputs = [peft_deltas(base, DIGITS.resolve(row[0])) for row in THREE_ROWS]
    merged = peft_deltas(base, folder)
    assert set(merged) == set(inputs[0])
    for name, delta in merged.items():
        torch.testing.assert_close(delta, 0.5 * sum(d[name] for d in inputs), rtol=1e-4, atol=1e-6)

    # the "use it in code" snippet runs as shown
    namespace = {}
    exec(snippet.replace('"merged-adapter"', repr(str(folder))), namespace)
    assert type(namespace["model"]).__name__ == "ViTModel"


def test_identical_merges_are_cached_and_failures_leave_nothing_behind(fresh_cache):
    first = merge(method="tsv")
    assert len(fresh_cache.folders()) == 1
    again = merge(method="tsv")
    assert again[7] == first[7] and again[9] == first[9]  # the same zip, the same key
    assert "cached result" in again[3] and len(fresh_cache.folders()) == 1
    merge(method="tsv", alpha=0.7)
    merge(method="iso_c")  # capacity 2: the first result is evicted, its folder removed
    assert len(fresh_cache.folders()) == 2 and not Path(first[7]).exists()

    assert app_error(merge, rows=THREE_ROWS + [["/nowhere/adapter", "X", 1.0]]) == str(refusal(4))
    assert app_error(merge, method="ties", density=1.5) == "density: 1.5 is out of range; give a number in (0, 1]"
    assert len(fresh_cache.folders()) == 2


def test_limits_are_enforced(fresh_cache):
    assert app_error(merge, rows=THREE_ROWS * 3 + THREE_ROWS[:2]) == "adapters: 11 given; at most 10 per merge"
    assert app_error(merge, rows=[["", "", ""]]).startswith("adapters: the list is empty")


def test_push_needs_a_merge_a_repo_and_a_token_and_never_echoes_the_token(fresh_cache):
    push = handlers.push_to_hub
    assert app_error(push, None, "me/merged", "hf_secret", True).startswith("push: nothing to push yet")
    key = merge()[9]
    assert app_error(push, key, "not a repo", "hf_secret", True).startswith(
        "repository 'not a repo': give it as owner/name")
    assert app_error(push, key, "me/merged", "  ", True).startswith("Hub token: empty")
    message = app_error(push, key, "me/merged", "hf_secret", True)  # the tests run with HF_HUB_OFFLINE=1
    assert message == "push to me/merged: the Hub is offline here (HF_HUB_OFFLINE=1); download the zip instead"


def test_hub_presets_say_offline_that_they_need_the_hub_and_which_presets_work(fresh_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    needs_hub = "preset tinyllama-tasks needs the Hugging Face Hub: "
    works = "; the bundled presets work offline: digits, questions, strings"
    rows, description, base, prompts, method, space, alpha = handlers.show_preset("tinyllama-tasks")
    assert "needs the Hugging Face Hub" in description and prompts["visible"]
    assert base.startswith(f"⚠️ {needs_hub}") and base.endswith(works)
    message = app_error(handlers.merge_and_compare, "tinyllama-tasks", rows, "tsv", "core", 1.0, False, None,
                        prompts["value"], None, None, lambda fraction, desc=None: None, *[p.default for p in handlers.PARAMETERS])
    assert message.startswith(needs_hub) and message.endswith(works)
    assert fresh_cache.folders() == []


def test_the_gpu_function_arguments_and_result_pickle_for_zerogpu(tmp_path):
    """ZeroGPU runs `run_merge` in another process: what goes in and what comes out must pickle."""
    import pickle

    from coremerge.webapp.workflow import run_merge

    request = handlers.build_request("digits", THREE_ROWS[:2], "dare", "core", 0.5, True, 4, "",
                                     [0.7 if p.name == "density" else p.default for p in handlers.PARAMETERS])
    arguments = pickle.loads(pickle.dumps((request, tmp_path, gr.Progress())))
    assert arguments[0] == request and arguments[0].options.params == {"density": 0.7, "seed": 0}
    outcome = run_merge(request, tmp_path)
    restored = pickle.loads(pickle.dumps(outcome))
    assert restored.report == outcome.report and restored.comparison == outcome.comparison
    assert restored.insights == outcome.insights and restored.zip_path == outcome.zip_path
    assert {m["output_rank"] for m in outcome.report["modules"].values()} == {4}  # the rank control reached it


def test_text_preset_side_by_side_has_a_row_per_prompt_and_each_adapter_solves_its_task(fresh_cache):
    import re

    rows, description, base, prompts, uses_prompts = handlers.preset_view("strings")
    assert uses_prompts and prompts.splitlines()[0] == "upper: banana\\n"
    outputs = handlers.merge_and_compare("strings", rows, "ta", "core", 0.5, False, None, "upper: banana\\n\ndouble: eggs",
                                         None, None, lambda fraction, desc=None: None, *[p.default for p in handlers.PARAMETERS])
    table = outputs[1]
    cells = [[re.sub(r' <span class="cm-mark">.*', "", cell) for cell in re.findall(r'<td class="cm-text[^"]*">(.*?)</td>', row)]
             for row in table.split("</table>")[0].split("<tr>")[2:-1]]  # the last row: each column's exact match
    assert [row[0] for row in cells] == ["upper: banana", "double: eggs"]
    header = re.findall(r"<th>(.*?)</th>", table)[:8]
    assert header == ["prompt", "expected", "Base", "Upper case", "Caesar shift", "Double letters", "Atbash", "Merged"]
    assert [row[1] for row in cells] == ["<b>BANANA</b>", "<b>eeggggss</b>"]
    assert cells[0][header.index("Upper case")] == "BANANA"
    assert cells[1][header.index("Double letters")] == "eeggggss"
    assert not outputs[2]["visible"]  # no accuracy chart for text


def cross_task_table(html: str) -> dict[str, dict[str, str]]:
    """The page's cross-task table as {task: {column: exact match}}."""
    import re

    table = html.split('id="cm-cross-task">')[1].split("</table>")[0]
    header, *rows = table.split("<tr>")[1:]
    columns = re.findall(r"<th>(.*?)</th>", header)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    return {row[0]: dict(zip(columns, row[1:])) for row in cells}


def test_text_side_by_side_shows_each_adapter_on_every_task_so_the_merge_is_explained(fresh_cache):
    """The cross-task table: questions adapters answer their own questions and the merge answers all four;
    strings adapters rewrite every word their way, and the merge answers none."""
    rows, _, _, prompts, _ = handlers.preset_view("questions")
    outputs = handlers.merge_and_compare("questions", rows, "ta", "core", 0.8, False, None, prompts, None, None,
                                         lambda fraction, desc=None: None, *[p.default for p in handlers.PARAMETERS])
    table = cross_task_table(outputs[1])
    names = {a.task: a.name for a in find_preset("questions").adapters}
    assert list(table) == list(names)  # one row per task, in prompt order
    for task, name in names.items():
        assert table[task]["Base"] == "0%" and table[task][name] == "100%" and table[task]["Merged"] != "0%", table
    assert 'class="cm-text cm-own">100%' in outputs[1]  # the diagonal is marked
    assert "the rewrites undo each other" in outputs[1].split('id="cm-cross-task-note">')[1]

    rows, _, _, _, _ = handlers.preset_view("strings")
    outputs = handlers.merge_and_compare("strings", rows, "ta", "core", 0.5, False, None,
                                         "upper: banana\\n\ncaesar: banana\\n\ndouble: eggs", None, None,
                                         lambda fraction, desc=None: None, *[p.default for p in handlers.PARAMETERS])
    table = cross_task_table(outputs[1])
    assert list(table) == ["upper", "caesar", "double"]
    assert table["upper"]["Upper case"] == "100%" and table["double"]["Double letters"] == "100%"
    assert {table[task]["Merged"] for task in table} == {"0%"}


def test_every_preset_kind_has_a_side_by_side():
    from coremerge.webapp.render import comparison_html
    from coremerge.webapp.workflow import has_comparison

    assert has_comparison(find_preset("knots-vit-b32"))  # CLIP zero-shot heads on its Hub datasets
    assert all(has_comparison(find_preset(name)) for name in ("digits", "strings", "tinyllama-tasks", "sdxl-styles"))
    assert comparison_html(None).startswith('<p id="cm-no-comparison">')
