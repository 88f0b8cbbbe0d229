"""The app's trust boundary: a row reaches a preset's own files, an upload or the Hub, nothing else on the server;
a visitor's Hub IDs go out with the visitor's token or none (a stand-in Hub records the Authorization header);
nothing the visitor sees or downloads holds a server path."""

import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from huggingface_hub import constants
from stand_in_hub import COMMIT, StandInHub, point_hub_at, refusing, serve

from coremerge import METHODS
from coremerge.errors import CoreMergeError, HubError
from coremerge.presets import PRESETS_DIR, Preset, PresetAdapter, find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache
from coremerge.webapp.sources import refusal, scrub, trusted_source

DIGITS = find_preset("digits")
TWO_ROWS = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]]
ROTATE90 = PRESETS_DIR / "digits/adapters/rotate90"


def merge(rows, token=None, method="ta"):
    values = [METHODS[method].defaults().get(p.name, p.default) for p in handlers.PARAMETERS]
    return handlers.merge_and_compare("digits", rows, method, "core", 0.5, False, None, "", token, None,
                                      lambda fraction, desc=None: None, *values)


def app_error(*args, **kwargs) -> str:
    with pytest.raises(gr.Error) as error:
        merge(*args, **kwargs)
    return error.value.message


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> ResultCache:
    cache = ResultCache(capacity=4, root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    return cache


def server_paths(tmp_path: Path) -> list[str]:
    return [str(tmp_path), str(PRESETS_DIR.parent), tempfile.gettempdir(), str(Path.home()),
            str(Path(constants.HF_HUB_CACHE))]


def visible_text(outputs) -> str:
    """Everything a merge shows or hands out: page outputs (images' base64 left out) and every file in the zip."""
    summary, comparison, accuracy, report, ranks, spectra, overlap, zip_path, snippet, key = outputs
    texts = [summary, re.sub(r"data:image/png;base64,[^\"]+", "", comparison), report, str(ranks), snippet]
    with zipfile.ZipFile(zip_path) as archive:
        texts += [archive.read(name).decode("utf-8", "replace") for name in archive.namelist()
                  if not name.endswith(".safetensors")]
    return "\n".join(texts)


HOSTILE = ["/etc/passwd", "/etc/no-such-file", "/root", "~/.bashrc", "~root/x", str(ROTATE90),
           "../digits/adapters/rotate90", "digits/../../app.py", "digits/../../no-such-file.py",
           "digits/adapters/../../../README.md", "digits/../strings/adapters/upper", "..\\..\\etc\\passwd",
           "./../x", "digits/adapters/rotate90/../../../../etc"]


@pytest.mark.parametrize("source", HOSTILE)
def test_paths_outside_the_presets_folder_get_one_message_whether_or_not_they_exist(fresh_cache, source):
    assert app_error(TWO_ROWS + [[source, "X", 1.0]]) == str(refusal(3))
    assert fresh_cache.folders() == []  # nothing read, nothing left behind


def test_a_symlink_out_of_the_presets_folder_is_never_followed(tmp_path):
    folder = tmp_path / "presets"
    (folder / "mine").mkdir(parents=True)
    shutil.copytree(ROTATE90, folder / "mine" / "inside")
    shutil.copytree(ROTATE90, tmp_path / "outside")
    (folder / "mine" / "escape").symlink_to(tmp_path / "outside")
    preset = Preset(name="mine", title="t", description="d", kind="image-classification", base_model="mine/base",
                    adapters=[PresetAdapter(name="a", source="mine/inside")], folder=folder)
    inside = trusted_source("mine/inside", 1, preset, {}, None, tmp_path / "in")
    assert (inside.origin, inside.shown, inside.location) == ("preset", "mine/inside", str(folder / "mine/inside"))
    # the escaping link is not a file of the preset: it is taken as a Hub ID, exactly like a name that is not there
    messages = []
    for name in ("mine/escape", "mine/absent"):
        with pytest.raises(HubError) as error:
            trusted_source(name, 1, preset, {}, None, tmp_path / "in")
        messages.append(str(error.value).replace(name, "NAME"))
    assert messages[0] == messages[1] and "offline" in messages[0]


def test_visitor_hub_ids_use_the_visitors_token_or_none_never_the_servers(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_server_secret")  # what a Space's owner sets
    hub = StandInHub()
    hub.add_folder("me/rotate90", ROTATE90)
    hub.add_folder("me/private-rotate90", ROTATE90, token="hf_visitor")
    with serve(hub):
        point_hub_at(monkeypatch, hub.url)
        outputs = merge(TWO_ROWS + [["me/rotate90", "Mine", 1.0]])
        assert set(hub.authorizations) == {None}
        assert "<th>Mine</th>" in outputs[1] and "| Mine | `me/rotate90` |" in outputs[3]

        hub.authorizations.clear()
        assert app_error(TWO_ROWS + [["me/private-rotate90", "Private", 1.0]]) == (
            "me/private-rotate90: repository me/private-rotate90 not found on the Hub (for a private repo, give a "
            "read token that can see it)")
        assert set(hub.authorizations) == {None}

        hub.authorizations.clear()
        outputs = merge(TWO_ROWS + [["me/private-rotate90", "Private", 1.0]], token=" hf_visitor ")
        assert set(hub.authorizations) == {"Bearer hf_visitor"}
    shown = visible_text(outputs)
    assert "hf_visitor" not in shown and "hf_visitor" not in outputs[9] and "hf_server" not in shown
    for path in server_paths(tmp_path):
        assert path not in shown, path
    with zipfile.ZipFile(outputs[7]) as archive:
        import json
        report = json.loads(archive.read("merged-adapter/merge_report.json"))
    assert [s["source"] for s in report["sources"]] == [*(a.source for a in DIGITS.adapters[:2]), "me/private-rotate90"]
    assert report["sources"][2]["origin"] == "hub" and report["sources"][2]["revision"] == COMMIT
    downloads = list((Path(fresh_cache.root)).rglob("models--me--private-rotate90"))
    assert downloads and all(fresh_cache.root in p.parents for p in downloads)  # in the request's folder only


def test_a_visitors_hub_id_that_cannot_be_reached_fails_within_5_s(fresh_cache, monkeypatch):
    point_hub_at(monkeypatch, refusing())
    started = time.perf_counter()
    message = app_error(TWO_ROWS + [["me/anything", "X", 1.0]])
    assert time.perf_counter() - started <= 5.0
    assert message.startswith("me/anything: the Hub could not be reached (") and "\n" not in message
    assert fresh_cache.folders() == []


def test_an_adapter_of_another_base_model_is_named_as_the_visitor_gave_it(fresh_cache, adapters, monkeypatch):
    hub = StandInHub()
    hub.add_folder("me/llama-lora", adapters["plain"])
    with serve(hub):
        point_hub_at(monkeypatch, hub.url)
        message = app_error(TWO_ROWS[:1] + [["me/llama-lora", "Llama LoRA", 1.0]])
    assert message == ("adapter row 2 (me/llama-lora) is for coremerge-tests/tiny-llama, not for coremerge/digits-vit, "
                       "the model of preset digits; remove it, or merge it with adapters of its own model")


def test_scrub_leaves_no_server_path(tmp_path):
    text = (f"{PRESETS_DIR}/digits/adapters/x: bad; {tempfile.gettempdir()}/gradio/abc/f.zip: gone; "
            f"{constants.HF_HUB_CACHE}/models--a--b/snapshots/c/d: missing; {PRESETS_DIR.parent}/app.py")
    assert scrub(text) == ("digits/adapters/x: bad; (server temp): gone; (Hub cache): missing; (coremerge)")


def test_the_preset_own_hub_ids_are_left_to_the_server(tmp_path):
    preset = find_preset("knots-vit-b32")
    own = preset.adapters[0].source
    assert trusted_source(own, 1, preset, {}, None, tmp_path).location == own  # fetched as the server fetches
    with pytest.raises(CoreMergeError):  # any other ID of a Hub preset is the visitor's: offline here
        trusted_source("someone/else", 1, preset, {}, None, tmp_path)
