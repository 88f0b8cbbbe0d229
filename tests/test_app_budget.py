"""Bounded merges: every row is read and checked before a request takes the merge slot, so a bad row fails fast
even while another merge holds the slot; a request past its time budget stops with one line and keeps nothing.
Real Hub stand-ins (one that refuses, one that never answers, one that serves an adapter of another model)."""

import threading
import time
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from stand_in_hub import StandInHub, never_answering, point_hub_at, refusing, serve

from coremerge import METHODS
from coremerge.presets import find_preset
from coremerge.webapp import budget, handlers
from coremerge.webapp.cache import ResultCache

DIGITS = find_preset("digits")
TWO_ROWS = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]]


def merge(rows, uploaded=None, progress=lambda fraction, desc=None: None):
    values = [METHODS["ta"].defaults().get(p.name, p.default) for p in handlers.PARAMETERS]
    return handlers.merge_and_compare("digits", rows, "ta", "core", 0.5, False, None, "", None, uploaded, progress,
                                      *values)


def app_error(*args, **kwargs) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(gr.Error) as error:
        merge(*args, **kwargs)
    return error.value.message, time.perf_counter() - started


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> ResultCache:
    cache = ResultCache(capacity=4, root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    return cache


@pytest.fixture
def slot_taken():
    """Another merge holds the merge slot for the whole test."""
    assert budget.MERGE_SLOT.acquire(timeout=60)
    yield
    budget.MERGE_SLOT.release()


@pytest.fixture
def no_merge_work(monkeypatch) -> list:
    """Fails the test if any merge work starts (run_merge is the first thing the slot's holder does)."""
    calls = []
    monkeypatch.setattr(handlers, "run_merge", lambda *args, **kwargs: calls.append(args) or pytest.fail("merged"))
    return calls


def test_bad_rows_fail_within_5_s_before_the_merge_slot(fresh_cache, slot_taken, no_merge_work, adapters, tmp_path,
                                                        monkeypatch):
    broken = tmp_path / "gradio" / "broken.safetensors"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    hub = StandInHub()
    hub.add_folder("me/llama-lora", adapters["plain"])
    with serve(hub):
        point_hub_at(monkeypatch, hub.url)
        other_model, seconds = app_error(TWO_ROWS + [["me/llama-lora", "Llama", 1.0]])
        assert other_model.startswith("adapter row 3 (me/llama-lora) is for coremerge-tests/tiny-llama, not for "
                                      "coremerge/digits-vit") and seconds < 5
    unreadable, seconds = app_error(TWO_ROWS + [["upload:broken.safetensors", "Broken", 1.0]], uploaded=[str(broken)])
    assert unreadable.startswith("upload:broken.safetensors: ") and seconds < 5
    point_hub_at(monkeypatch, refusing())
    refused, seconds = app_error(TWO_ROWS + [["me/anything", "X", 1.0]])
    assert refused.startswith("me/anything: the Hub could not be reached (") and seconds <= 5
    with never_answering() as silent:
        point_hub_at(monkeypatch, silent)
        silence, seconds = app_error(TWO_ROWS + [["me/anything", "X", 1.0]])
    assert silence == "me/anything: the Hub did not answer within 3 s; try again later" and seconds <= 5
    for message in (other_model, unreadable, refused, silence):
        assert "\n" not in message and "busy" not in message
    assert no_merge_work == [] and fresh_cache.folders() == []


def test_waiting_for_the_slot_past_the_budget_is_one_line_and_keeps_nothing(fresh_cache, slot_taken, no_merge_work,
                                                                              monkeypatch):
    monkeypatch.setattr(budget, "REQUEST_SECONDS", 1.5)
    message, seconds = app_error(TWO_ROWS)
    assert message == ("the server is busy: other merges held it for the whole 1.5 s this request may take; nothing "
                       "was kept. Try again in a minute")
    assert 1.4 <= seconds < 5 and no_merge_work == [] and fresh_cache.folders() == []


def test_a_merge_past_its_budget_stops_at_its_next_step_and_keeps_nothing(fresh_cache, monkeypatch):
    monkeypatch.setattr(budget, "REQUEST_SECONDS", 4.0)
    steps = []

    def slow_progress(fraction, desc=None):  # each merged module takes 0.5 s more
        steps.append(desc)
        if desc and desc.startswith("merging module"):
            time.sleep(0.5)

    message, seconds = app_error(TWO_ROWS, progress=slow_progress)
    assert message.startswith("this merge took longer than the 4 s a request may take (stopped while merging module ")
    assert message.endswith("); nothing was kept. Try fewer adapters or prompts") and "\n" not in message
    assert 4 <= seconds < 10 and "writing the model card and the zip" not in steps
    assert fresh_cache.folders() == []


def test_the_server_checks_a_bad_row_while_a_merge_holds_the_slot(app_server):
    """The merge event runs more than one request at once; only the merge itself waits for the slot."""
    from test_app_server import merge as server_merge

    client = Client(app_server, verbose=False)
    assert budget.MERGE_SLOT.acquire(timeout=60)
    try:
        waiting = client.submit("digits", {"headers": handlers.ADAPTER_COLUMNS, "data": TWO_ROWS, "metadata": None},
                                "ta", "core", 0.45, False, None, "", "", None,
                                *[p.default for p in handlers.PARAMETERS], api_name="/merge_and_compare")
        time.sleep(1.0)  # the good request has passed its checks and waits for the slot
        started = time.perf_counter()
        with pytest.raises(AppError) as error:
            server_merge(Client(app_server, verbose=False), TWO_ROWS + [["digits/adapters/nowhere", "X", 1]])
        assert time.perf_counter() - started < 5 and not waiting.done()
        assert str(error.value).startswith("digits/adapters/nowhere")
    finally:
        budget.MERGE_SLOT.release()
    assert waiting.result(timeout=240)[0].startswith("Merged 2 adapters")
