"""Uploaded adapters: a peft pair, a single file and a zipped peft folder merge like any other row; zips that
point outside, hold links or unpack to far more than their size are refused; uploads live in the request's folder."""

import shutil
import stat
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from coremerge import METHODS
from coremerge.presets import PRESETS_DIR, find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache
from coremerge.webapp.uploads import MAX_FILES, unpack_uploads

DIGITS = find_preset("digits")
TWO_ROWS = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]]
ROTATE90 = PRESETS_DIR / "digits/adapters/rotate90"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> ResultCache:
    cache = ResultCache(capacity=4, root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    return cache


def merge(rows, uploaded):
    values = [METHODS["ta"].defaults().get(p.name, p.default) for p in handlers.PARAMETERS]
    return handlers.merge_and_compare("digits", rows, "ta", "core", 0.5, False, None, "", None, uploaded,
                                      lambda fraction, desc=None: None, *values)


def upload_folder(tmp_path: Path, name: str) -> Path:
    """Where gradio keeps an upload: a folder of its own, the file under its original name."""
    folder = tmp_path / "gradio" / name
    folder.mkdir(parents=True)
    return folder


def zipped(tmp_path: Path, name: str, members: dict) -> Path:
    path = upload_folder(tmp_path, name) / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, content in members.items():
            if isinstance(content, zipfile.ZipInfo):
                archive.writestr(content, "target")
            else:
                archive.writestr(member, content)
    return path


def test_a_peft_pair_and_a_zipped_folder_merge_and_get_their_columns(fresh_cache, tmp_path):
    weights = upload_folder(tmp_path, "a") / "adapter_model.safetensors"
    config = upload_folder(tmp_path, "b") / "adapter_config.json"
    shutil.copy(ROTATE90 / "adapter_model.safetensors", weights)
    shutil.copy(ROTATE90 / "adapter_config.json", config)
    members = {f"my-rotate90/{p.name}": p.read_bytes() for p in ROTATE90.iterdir() if p.is_file()}
    archive = zipped(tmp_path, "mine.zip", members)

    rows = handlers.add_upload_rows([str(weights), str(config), str(archive)], TWO_ROWS)
    assert rows[2:] == [["upload:adapter_model.safetensors", "adapter_model", 1.0], ["upload:mine.zip", "mine", 1.0]]
    outputs = merge(rows, [str(weights), str(config), str(archive)])
    assert "<th>adapter_model</th>" in outputs[1] and "<th>mine</th>" in outputs[1]
    assert "| mine | `upload:mine.zip` |" in outputs[3]
    assert str(tmp_path) not in outputs[3] + outputs[8]
    assert list(fresh_cache.root.rglob("mine.zip")) == [] and list(fresh_cache.root.rglob("my-rotate90"))


def test_adapters_of_a_model_no_preset_runs_merge_without_a_side_by_side(fresh_cache, adapters, tmp_path):
    members = {f"llama/{p.name}": p.read_bytes() for p in adapters["plain"].iterdir() if p.is_file()}
    archive = zipped(tmp_path, "llama.zip", members)
    outputs = merge([["upload:llama.zip", "Llama", 1.0]], [str(archive)])
    assert outputs[1] == ('<p id="cm-no-comparison">No side by side: these adapters are for '
                          "coremerge-tests/tiny-llama, and preset digits runs coremerge/digits-vit; no preset here runs "
                          "that model. The merged adapter, its report and the download are ready.</p>")
    assert Path(outputs[7]).is_file() and "Merged 1 adapters" in outputs[0]


def test_hostile_zips_and_uploads_are_refused(fresh_cache, tmp_path):
    link = zipfile.ZipInfo("peft/adapter_config.json")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    cases = {
        "slip.zip": ({"../../evil.json": b"{}"}, "entry '../../evil.json' points outside the zip; refused"),
        "absolute.zip": ({"/etc/evil.json": b"{}"}, "entry '/etc/evil.json' points outside the zip; refused"),
        "link.zip": ({"peft/adapter_config.json": link}, "entry 'peft/adapter_config.json' is a link; refused"),
        "bomb.zip": ({"peft/adapter_model.safetensors": b"\0" * (20 * 2**20)}, "unpacks to 20 MB from 0.0 MB"),
        "empty.zip": ({"notes.txt": b"hello"}, "expected one peft folder"),
    }
    for name, (members, expected) in cases.items():
        archive = zipped(tmp_path, name, members)
        with pytest.raises(gr.Error) as error:
            merge(TWO_ROWS + [[f"upload:{name}", "X", 1.0]], [str(archive)])
        assert error.value.message.startswith(f"upload {name}: ") and expected in error.value.message, name
    assert not (tmp_path / "evil.json").exists() and not Path("/etc/evil.json").exists()

    with pytest.raises(gr.Error) as error:
        merge(TWO_ROWS + [["upload:other.safetensors", "X", 1.0]], None)
    assert error.value.message.startswith("adapter row 3: no uploaded file named 'other.safetensors' in this request")
    text = upload_folder(tmp_path, "t") / "notes.txt"
    text.write_text("hi")
    with pytest.raises(gr.Error) as error:
        merge(TWO_ROWS, [str(text)])
    assert error.value.message.startswith("upload notes.txt: not a .safetensors file")
    assert fresh_cache.folders() == []
    with pytest.raises(Exception, match=f"at most {MAX_FILES} per merge"):
        unpack_uploads([str(text)] * (MAX_FILES + 1), tmp_path / "x")
