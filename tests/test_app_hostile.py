"""Every handler driven with hostile values, one argument (or one table cell) at a time: whatever happens, the
page gets either a result or one line in the app's words: no error class name, no "unexpected", no traceback, no
server path."""

import re
import tempfile
from pathlib import Path

import gradio as gr
import pytest
from huggingface_hub import constants

from coremerge.presets import PRESETS_DIR, find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache

HOSTILE = ["/etc/passwd", "../../../etc/passwd", "~/.ssh/id_rsa", float("nan"), float("inf"), float("-inf"), 1e308,
           -1e308, 10 ** 400, "1e999", "nan", "", None, "   ", "ünïcødé ☃ 😀", "\x00\x1b[31mred\x07", "a" * 100_000,
           [], {}, -1, 0, "org/name/../../x", "upload:../../etc/passwd"]
PARAMETER_VALUES = [p.default for p in handlers.PARAMETERS]
DIGITS = find_preset("digits")
TWO_ROWS = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]]
CLASS_NAME = re.compile(r"\b\w*(Error|Exception)\b|Traceback|unexpected|<class|object at 0x", re.IGNORECASE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    cache = ResultCache(capacity=16, root=tmp_path_factory.mktemp("cache"))
    handlers.CACHE, previous = cache, handlers.CACHE
    yield cache
    handlers.CACHE = previous


def server_paths() -> list[str]:
    return [str(PRESETS_DIR.parent), tempfile.gettempdir(), str(Path.home()), str(Path(constants.HF_HUB_CACHE))]


class Reached(BaseException):  # not an Exception: user_errors would turn it into a page message
    """The request got past every check to the merge itself (which other tests run for real)."""


@pytest.fixture
def checks_only(monkeypatch):
    def stop(request, folder, progress=None, compare=None):
        raise Reached()

    monkeypatch.setattr(handlers, "run_merge", stop)


def outcome_of(handler, *args) -> str:
    """'ok', or the gr.Error's message after checking it is one clean line."""
    try:
        handler(*args)
        return "ok"
    except Reached:
        return "ok"
    except gr.Error as error:
        message = error.message
    assert "\n" not in message and len(message) < 400, message[:400]
    assert not CLASS_NAME.search(message), message
    for path in server_paths():
        assert path not in message, (path, message)
    return message


def merge_args(**changes) -> list:
    args = {"preset": "digits", "table": TWO_ROWS, "method": "ta", "space": "core", "alpha": 0.5,
            "isotropize": False, "rank": None, "prompts": "", "token": None, "uploaded": None}
    args.update(changes)
    return [*args.values(), lambda fraction, desc=None: None, *PARAMETER_VALUES]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:20])
def test_merge_and_compare_with_a_hostile_value_anywhere(cache, checks_only, value):
    outcomes = {}
    for name in ("preset", "method", "space", "alpha", "isotropize", "rank", "prompts", "token", "uploaded"):
        outcomes[name] = outcome_of(handlers.merge_and_compare, *merge_args(**{name: value}))
    for row in range(2):
        for column in range(3):
            table = [list(r) for r in TWO_ROWS]
            table[row][column] = value
            outcomes[f"cell {row},{column}"] = outcome_of(handlers.merge_and_compare, *merge_args(table=table))
    outcomes["table"] = outcome_of(handlers.merge_and_compare, *merge_args(table=value))
    for position in range(len(PARAMETER_VALUES)):
        values = list(PARAMETER_VALUES)
        values[position] = value
        args = merge_args(method="dare_ties")[:-len(PARAMETER_VALUES)] + values
        outcomes[f"parameter {handlers.PARAMETERS[position].name}"] = outcome_of(handlers.merge_and_compare, *args)
    assert outcomes["alpha"] == "ok" or outcomes["alpha"].startswith("alpha: ")


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:20])
def test_the_other_handlers_with_a_hostile_value(cache, checks_only, value):
    outcome_of(handlers.show_preset, value)
    outcome_of(handlers.show_method, value)
    for position in range(4):
        args = [None, "me/merged", "hf_x", True]
        args[position] = value
        outcome_of(handlers.push_to_hub, *args)


def test_nan_and_inf_weights_are_refused_in_the_pages_words(cache):
    table = [list(r) for r in TWO_ROWS]
    table[1][2] = float("nan")
    assert outcome_of(handlers.merge_and_compare, *merge_args(table=table)) == (
        "adapter row 2, weight: nan is out of range; give a number in [-10, 10]")
    assert outcome_of(handlers.merge_and_compare, *merge_args(alpha=float("inf"))) == (
        "alpha: inf is out of range; give a number in (0, 10]")


def test_new_rows_weigh_1_and_duplicates_or_zero_weights_are_flagged_but_merged(cache):
    table = TWO_ROWS + [[TWO_ROWS[0][0] + "/", "Again", None], [DIGITS.adapters[2].source, "Zero", 0]]
    summary = handlers.merge_and_compare(*merge_args(table=table))[0]
    assert summary.startswith(
        "⚠️ adapter rows 1 and 3 are the same adapter (digits/adapters/rotate90/): it counts twice\n\n"
        "⚠️ adapter row 4 has weight 0: it adds nothing to the merge\n\n")
    assert "Merged 4 adapters" in summary
    rows = handlers.adapter_rows(table)
    assert [r.weight for r in rows] == [1.0, 1.0, 1.0, 0.0]  # an empty weight is 1
