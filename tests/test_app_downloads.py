"""Downloads that travel: the zip's model card, merge_report.json and snippet name the sources as the user gave
them; the snippet loads the folder the zip holds, and runs as printed against the unzipped download (from the
repository's root, where a bundled preset's base lives); `base_model` is a Hub ID, or the card says that the base
ships with coremerge, where, and what else is needed (the digits' task heads, the text presets' tokenizers)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import yaml

from coremerge import METHODS
from coremerge.presets import PRESETS_DIR, find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> ResultCache:
    cache = ResultCache(capacity=4, root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    return cache


def merge(preset: str, rows, uploaded=None, prompts=""):
    values = [METHODS["ta"].defaults().get(p.name, p.default) for p in handlers.PARAMETERS]
    return handlers.merge_and_compare(preset, rows, "ta", "core", 0.5, False, None, prompts, None, uploaded,
                                      lambda fraction, desc=None: None, *values)


def unzipped(outputs, where: Path) -> tuple[Path, str, dict, str]:
    """The download unzipped in `where`: its folder, model card, merge report, and the page's snippet."""
    zip_path, snippet = outputs[7], outputs[8]
    with zipfile.ZipFile(zip_path) as archive:
        assert {name.split("/")[0] for name in archive.namelist()} == {"merged-adapter"}
        archive.extractall(where)
    folder = where / "merged-adapter"
    card = (folder / "README.md").read_text()
    assert card.endswith(f"```python\n{snippet}\n```\n")  # the card shows the page's snippet
    return folder, card, json.loads((folder / "merge_report.json").read_text()), snippet


def metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def no_server_path(*texts: str) -> None:
    for text in texts:
        for path in (str(ROOT), str(PRESETS_DIR), tempfile.gettempdir(), str(Path.home())):
            assert path not in text, path


def run_snippet(snippet: str, cwd: Path) -> subprocess.CompletedProcess:
    """The snippet as printed, in a fresh Python, from `cwd`; prints what it loaded."""
    code = snippet + "\nprint(type(model).__name__, sorted(base.config.to_dict())[:1])\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def repository_checkout(tmp_path: Path) -> Path:
    """A stand-in for a checkout of coremerge's repository: its presets/ folder (linked) at the root."""
    checkout = tmp_path / "coremerge"
    checkout.mkdir()
    (checkout / "presets").symlink_to(PRESETS_DIR)
    return checkout


def test_a_digits_download_names_the_bundled_base_its_heads_and_runs_as_printed(fresh_cache, tmp_path):
    digits = find_preset("digits")
    rows = [[a.source, a.name, a.weight] for a in digits.adapters[:3]]
    checkout = repository_checkout(tmp_path)
    folder, card, report, snippet = unzipped(merge("digits", rows), checkout)

    assert "base_model" not in metadata(card)  # not a Hub ID: left out of the metadata
    assert ("The base model is not on the Hugging Face Hub: it ships with coremerge, in the folder "
            "`presets/digits/base` of the coremerge repository (the adapters' configs call it `coremerge/digits-vit`, "
            "a name only)") in card
    assert ("each task's classification head, `presets/digits/adapters/<task>/head.safetensors` (rotate90, mirror, "
            "invert, noisy, loops, parity, greater4, flipped; `coremerge.bundled.digits.load_head` loads one)") in card
    for source, name, _ in rows:  # sources as typed, in the card and the report
        assert f"| {name} | `{source}` |" in card
    assert [s["source"] for s in report["sources"]] == [row[0] for row in rows]
    assert 'AutoModel.from_pretrained("presets/digits/base")' in snippet
    assert 'PeftModel.from_pretrained(base, "merged-adapter")' in snippet
    no_server_path(card, json.dumps(report), snippet)

    ran = run_snippet(snippet, checkout)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split()[0] == "ViTModel"  # peft loaded the unzipped folder onto the bundled base


@pytest.mark.parametrize("name, tokenizer", [
    ("strings", "the tokenizer, which has no files: the model reads bytes as tokens, and "
                "`coremerge.bundled.strings.tokenizer()` builds it"),
    ("questions", 'the tokenizer, in the same folder (`AutoTokenizer.from_pretrained("presets/questions/base")`)'),
])
def test_a_text_download_names_the_tokenizer_and_runs_as_printed(fresh_cache, tmp_path, name, tokenizer):
    preset = find_preset(name)
    rows = [[a.source, a.name, a.weight] for a in preset.adapters[:2]]
    checkout = repository_checkout(tmp_path)
    folder, card, report, snippet = unzipped(merge(name, rows, prompts=preset.samples.prompts[0]), checkout)
    assert "base_model" not in metadata(card) and f"`presets/{name}/base` of the coremerge repository" in card
    assert tokenizer in card
    assert f'AutoModelForCausalLM.from_pretrained("presets/{name}/base")' in snippet
    no_server_path(card, json.dumps(report), snippet)
    ran = run_snippet(snippet, checkout)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split()[0] == "LlamaForCausalLM"


def test_uploads_of_a_hub_model_get_its_hub_id_and_the_names_they_were_uploaded_as(fresh_cache, tmp_path, adapters):
    uploads = []
    for name in ("plain", "rslora"):
        archive = tmp_path / "gradio" / name / f"{name}.zip"
        archive.parent.mkdir(parents=True)
        shutil.make_archive(str(archive.with_suffix("")), "zip", root_dir=adapters[name].parent, base_dir=name)
        uploads.append(str(archive))
    rows = [["upload:plain.zip", "Plain", 1.0], ["upload:rslora.zip", "rsLoRA", 1.0]]
    folder, card, report, snippet = unzipped(merge("digits", rows, uploaded=uploads), tmp_path / "download")
    assert metadata(card)["base_model"] == "coremerge-tests/tiny-llama"  # the adapters' own base, a Hub ID
    assert "[`coremerge-tests/tiny-llama`](https://huggingface.co/coremerge-tests/tiny-llama) on the Hugging Face Hub" in card
    assert "ships with coremerge" not in card and "presets/" not in snippet
    assert 'from_pretrained("coremerge-tests/tiny-llama")' in snippet
    assert [s["source"] for s in report["sources"]] == ["upload:plain.zip", "upload:rslora.zip"]
    assert "| Plain | `upload:plain.zip` |" in card
    no_server_path(card, json.dumps(report), snippet)
