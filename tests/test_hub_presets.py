"""Hub presets: their files are consistent, and whether one can run here is decided from the Hub cache or the Hub.

Offline, nothing reaches the Hub: the cache is a folder the tests build the way huggingface_hub lays it out,
holding tiny real peft adapters; the online path talks to a small HTTP server on localhost that answers like
the Hub (HEAD .../resolve/<revision>/<file>, X-Error-Code on 404).
"""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import constants
from test_hub import COMMIT, add_to_cache

from coremerge import CoreMergeError, HubError, load_adapters
from coremerge.formats.sources import HUB_ID
from coremerge.presets import PRESETS_DIR, find_preset, list_presets, load_preset
from coremerge.webapp.availability import _hub_has_file, require_available

HUB_PRESETS = [p for p in list_presets() if not p.bundled]
BUNDLED_NAMES = ", ".join(p.name for p in list_presets() if p.bundled)
IMAGE_GENERATION_KEYS = {"num_inference_steps", "guidance_scale", "width", "height", "seed"}
ids = pytest.mark.parametrize("preset", HUB_PRESETS, ids=lambda p: p.name)


def test_hub_presets_of_every_kind_come_after_the_bundled_ones():
    assert {p.name for p in HUB_PRESETS} >= {"tinyllama-tasks", "knots-vit-b32", "sdxl-styles", "sd15-styles"}
    assert {p.kind for p in HUB_PRESETS} == {"text-generation", "image-classification", "image-generation"}
    assert "digits" in BUNDLED_NAMES.split(", ")
    names = [p.name for p in list_presets()]
    assert names.index("digits") < min(names.index(p.name) for p in HUB_PRESETS)


@ids
def test_hub_ids_have_the_hub_shape_and_name_no_local_file(preset):
    base = HUB_ID.match(preset.base_model)
    assert base and base["path"] is None and base["revision"] is None, preset.base_model
    assert preset.base_model_path == preset.base_model  # nothing local shadows it
    for adapter in preset.adapters:
        match = HUB_ID.match(adapter.source)
        assert match, adapter.source
        assert preset.resolve(adapter.source) == adapter.source
        assert match["path"] is None or match["path"].endswith(".safetensors"), adapter.source
    assert len({a.source for a in preset.adapters}) == len(preset.adapters)
    assert len({a.name for a in preset.adapters}) == len(preset.adapters)
    assert 2 <= len(preset.adapters) <= 8


@ids
def test_hub_preset_files_cite_where_their_ids_come_from(preset):
    text = (PRESETS_DIR / f"{preset.name}.yaml").read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "Hub preset" in comments.splitlines()[0]
    assert any(where in comments for where in ("docs/", "configs/", "tests/")), "cite the file the IDs come from"


@ids
def test_samples_fit_the_kind(preset):
    samples, generation = preset.samples, preset.samples.generation
    assert isinstance(generation.get("seed", 0), int)
    if preset.kind == "text-generation":
        assert samples.prompts and not samples.images and not samples.datasets
        assert isinstance(generation["max_new_tokens"], int) and 0 < generation["max_new_tokens"] <= 512
        assert all(a.task for a in preset.adapters)
    elif preset.kind == "image-generation":
        assert samples.prompts and not samples.images and not samples.datasets
        assert IMAGE_GENERATION_KEYS <= set(generation), IMAGE_GENERATION_KEYS - set(generation)
        assert generation["width"] % 8 == 0 and generation["height"] % 8 == 0
        assert 1 <= generation["num_inference_steps"] <= 100 and generation["guidance_scale"] >= 0
        triggers = [a.trigger for a in preset.adapters if a.trigger]
        assert not any(t in prompt for t in triggers for prompt in samples.prompts), "the comparison adds triggers"
    else:
        assert not samples.prompts and (samples.images or samples.datasets)
        tasks = [a.task for a in preset.adapters]
        assert all(tasks) and len(set(tasks)) == len(tasks)
        assert {d.task for d in samples.datasets} | {i.task for i in samples.images} == set(tasks)
        assert all(HUB_ID.match(d.source) and d.split for d in samples.datasets)


def test_sample_datasets_in_the_schema(tmp_path):
    text = """
name: tiny
title: Tiny
description: A test preset.
kind: image-classification
base_model: org/base
adapters:
  - {name: A, source: org/a, task: a}
samples:
  datasets:
    - {task: a, source: org/data, subset: small}
"""
    (tmp_path / "tiny.yaml").write_text(text)
    dataset = load_preset(tmp_path / "tiny.yaml").samples.datasets[0]
    assert (dataset.task, dataset.source, dataset.subset, dataset.split) == ("a", "org/data", "small", "test")
    (tmp_path / "tiny.yaml").write_text(text.replace("subset: small", "colour: blue"))
    with pytest.raises(CoreMergeError, match="samples.datasets.0.colour: Extra inputs are not permitted"):
        load_preset(tmp_path / "tiny.yaml")


# Availability offline: the Hub cache decides.

def unavailable(preset, why):
    return f"preset {preset.name} needs the Hugging Face Hub: {why}; the bundled presets work offline: {BUNDLED_NAMES}"


def not_cached(preset, source: str) -> str:
    return unavailable(preset, f"{source} is not in the local Hub cache and the Hub is offline (HF_HUB_OFFLINE=1)")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # set by conftest before huggingface_hub was imported
    return cache


def repo_files(preset, adapter_folder, tmp_path):
    """Each Hub repo of `preset` and its files: a real peft adapter's files where an adapter is expected."""
    base_file = tmp_path / ("model_index.json" if preset.kind == "image-generation" else "config.json")
    base_file.write_text(json.dumps({"_name_or_path": preset.base_model}))
    repos = {preset.base_model: {base_file.name: base_file}}
    for adapter in preset.adapters:
        parts = adapter.source.split("/")
        repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
        if inner.endswith(".safetensors"):
            repos.setdefault(repo, {})[inner] = adapter_folder / "adapter_model.safetensors"
        else:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                repos.setdefault(repo, {})[name] = adapter_folder / name
    return repos


@ids
def test_offline_with_an_empty_cache_the_preset_says_it_needs_the_hub(preset, empty_cache):
    with pytest.raises(HubError) as error:
        require_available(preset)
    assert str(error.value) == not_cached(preset, preset.adapters[0].source)


@ids
def test_offline_a_cache_holding_the_presets_files_makes_it_available(preset, empty_cache, adapters, tmp_path):
    repos = repo_files(preset, adapters["plain"], tmp_path)
    for repo, files in repos.items():
        add_to_cache(empty_cache, repo, files)
    require_available(preset)

    last = preset.adapters[-1].source
    shutil.rmtree(empty_cache / f"models--{'--'.join(last.split('/')[:2])}")
    with pytest.raises(HubError) as error:
        require_available(preset)
    assert str(error.value) == not_cached(preset, last)


def test_the_base_model_is_needed_unless_only_merging(empty_cache, adapters, tmp_path):
    preset = find_preset("tinyllama-tasks")
    for repo, files in repo_files(preset, adapters["plain"], tmp_path).items():
        if repo != preset.base_model:
            add_to_cache(empty_cache, repo, files)
    require_available(preset, base_model=False)
    with pytest.raises(HubError) as error:
        require_available(preset)
    assert str(error.value) == not_cached(preset, preset.base_model)


def test_a_peft_folder_needs_its_weights_not_only_its_config(empty_cache, adapters, tmp_path):
    preset = find_preset("tinyllama-tasks")
    for repo, files in repo_files(preset, adapters["plain"], tmp_path).items():
        add_to_cache(empty_cache, repo, files)
    first = preset.adapters[0].source
    (empty_cache / f"models--{first.replace('/', '--')}" / "snapshots" / COMMIT / "adapter_model.safetensors").unlink()
    with pytest.raises(HubError, match=f"needs the Hugging Face Hub: {first} is not in the local Hub cache"):
        require_available(preset)


def test_bundled_presets_are_always_available(empty_cache):
    bundled = [p for p in list_presets() if p.bundled]
    assert bundled
    for preset in bundled:
        require_available(preset)


# Availability online: one HEAD request per ID not in the cache, answered here by a local stand-in for the Hub.

class FakeHub(BaseHTTPRequestHandler):
    """HEAD /<org>/<name>/resolve/<revision>/<path> answered like the Hub, from `self.server.repos`."""

    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.server.requests += 1
        org, name, resolve, revision, path = self.path.lstrip("/").split("/", 4)
        files = self.server.repos.get(f"{org}/{name}")
        if resolve != "resolve" or files is None:
            self.answer(404, {"X-Error-Code": "RepoNotFound"})
        elif revision != "main":
            self.answer(404, {"X-Error-Code": "RevisionNotFound"})
        elif path not in files:
            self.answer(404, {"X-Error-Code": "EntryNotFound"})
        else:
            self.answer(200, {"X-Repo-Commit": COMMIT, "ETag": '"abc"', "Content-Length": "2"})

    def answer(self, status, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def online_hub(empty_cache, monkeypatch):
    """An empty cache, HF_HUB_OFFLINE off, and the Hub endpoint pointed at a fresh local server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repos, server.requests = {}, 0
    _hub_has_file.cache_clear()  # answers of an earlier server on the same port must not count
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # as if HF_ENDPOINT had been set at import
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield server
    server.shutdown()
    server.server_close()


def serve(server, preset, tmp_path):
    server.repos = {repo: set(files) for repo, files in repo_files(preset, tmp_path, tmp_path).items()}


@ids
def test_online_the_hub_answers_for_ids_not_in_the_cache(preset, online_hub, tmp_path):
    serve(online_hub, preset, tmp_path)
    first = preset.adapters[0].source
    repo = "/".join(first.split("/")[:2])
    files = online_hub.repos.pop(repo)
    with pytest.raises(HubError) as error:
        require_available(preset)
    assert str(error.value) == unavailable(preset, f"{first}: repository {repo} not found on the Hub")
    assert online_hub.requests == 1  # it stops at the first ID that is not there

    online_hub.repos[repo] = files  # failures are not remembered: the repo is found once it is there
    require_available(preset)
    asked = online_hub.requests
    require_available(preset)  # and successes are: choosing the preset again asks the Hub nothing
    assert online_hub.requests == asked


def test_online_a_missing_file_and_a_missing_revision_are_named(online_hub, tmp_path):
    preset = find_preset("sdxl-styles")
    serve(online_hub, preset, tmp_path)
    source = preset.adapters[1].source
    repo, filename = "/".join(source.split("/")[:2]), "/".join(source.split("/")[2:])
    online_hub.repos[repo] = {"other.safetensors"}
    with pytest.raises(HubError) as error:
        require_available(preset)
    assert str(error.value) == unavailable(preset, f"{source}: {repo} has no {filename}")

    pinned = preset.model_copy(update={"adapters": [
        a.model_copy(update={"source": f"{repo}@v2/{filename}"}) for a in preset.adapters[1:2]]})
    with pytest.raises(HubError) as error:
        require_available(pinned)
    assert str(error.value) == unavailable(pinned, f"{repo}@v2/{filename}: revision v2 not found in {repo}")


def test_online_an_unreachable_hub_is_said_so(online_hub, monkeypatch):
    online_hub.shutdown()
    online_hub.server_close()  # nothing listens on the endpoint's port any more
    preset = find_preset("knots-vit-b32")
    with pytest.raises(HubError) as error:
        require_available(preset)
    message = str(error.value)
    first = preset.adapters[0].source
    assert message.startswith(f"preset knots-vit-b32 needs the Hugging Face Hub: {first} could not be checked: "
                              "the Hub is not reachable (")
    assert message.endswith(f"; the bundled presets work offline: {BUNDLED_NAMES}")


def test_a_cached_file_needs_no_request(online_hub, adapters, tmp_path, empty_cache):
    preset = find_preset("tinyllama-tasks")
    for repo, files in repo_files(preset, adapters["plain"], tmp_path).items():
        add_to_cache(empty_cache, repo, files)
    online_hub.repos = {}  # the Hub would say "not found" for everything
    require_available(preset)


@pytest.mark.parametrize("name", ["tinyllama-tasks", "knots-vit-b32"])
def test_what_the_check_accepts_the_loader_loads(name, empty_cache, adapters, tmp_path):
    preset = find_preset(name)
    for repo, files in repo_files(preset, adapters["plain"], tmp_path).items():
        add_to_cache(empty_cache, repo, files)
    require_available(preset)
    loaded = load_adapters(preset.adapter_sources)
    assert [(a.origin, a.revision) for a in loaded] == [("hub", COMMIT)] * len(preset.adapters)
