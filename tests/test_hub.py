"""Hub IDs resolve offline from a Hub cache folder laid out the way huggingface_hub lays it out."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from huggingface_hub import constants

from coremerge import HubError, load_adapter

from conftest import read_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache, repo_id, files, commit=COMMIT):
    """models--org--name/refs/main -> commit, snapshots/<commit>/<path> for each (path, source file)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for path, source in files.items():
        target = repo / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


def adapter_files(folder, prefix=""):
    return {f"{prefix}{name}": folder / name for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, adapters):
    cache = tmp_path_factory.mktemp("hub")
    add_to_cache(cache, "org/plain", adapter_files(adapters["plain"]))
    add_to_cache(cache, "org/multi", {**adapter_files(adapters["named"], "tasks/named/"),
                                      **adapter_files(adapters["rslora"], "tasks/rslora/")})
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    assert constants.HF_HUB_OFFLINE  # set by conftest before huggingface_hub was imported
    return hub_cache


@pytest.mark.parametrize("source, ranks_like", [
    ("org/plain", "plain"),
    (f"org/plain@{COMMIT}", "plain"),
    ("org/plain@main", "plain"),
    ("org/multi/tasks/named", "named"),
    ("org/multi@main/tasks/rslora", "rslora"),
    ("org/multi/tasks/rslora/adapter_model.safetensors", "rslora"),
])
def test_hub_ids_resolve_from_the_cache(offline_cache, adapters, source, ranks_like):
    adapter = load_adapter(source)
    assert adapter.origin == "hub" and adapter.revision == COMMIT
    assert adapter.ranks == load_adapter(str(adapters[ranks_like])).ranks
    assert adapter.config["lora_alpha"] == read_config(adapters[ranks_like])["lora_alpha"]


@pytest.mark.parametrize("source", ["org/missing", "org/plain@v2", "org/multi/tasks/absent"])
def test_uncached_ids_offline_say_how_to_use_a_local_copy(offline_cache, source):
    repo = "/".join(source.split("@")[0].split("/")[:2])
    with pytest.raises(HubError) as error:
        load_adapter(source)
    assert str(error.value) == (
        f"{source}: the Hub is offline (HF_HUB_OFFLINE=1) and {repo} is not in the local Hub cache; on a machine "
        f"with network run `hf download {repo} --local-dir DIR`, then pass DIR instead of the ID")


def test_cli_merges_hub_ids_and_records_revisions(hub_cache, adapters, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "coremerge", "merge", "org/plain", "org/multi/tasks/named", str(adapters["rslora"]),
         "--method", "tsv", "--output", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    sources = json.loads((out / "merge_report.json").read_text())["sources"]
    assert [(s["source"], s["origin"], s["revision"]) for s in sources] == [
        ("org/plain", "hub", COMMIT), ("org/multi/tasks/named", "hub", COMMIT), (str(adapters["rslora"]), "local", None)]
    missing = subprocess.run([sys.executable, "-m", "coremerge", "merge", "org/missing", "--output", str(out / "x")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "coremerge: error: org/missing: the Hub is offline (HF_HUB_OFFLINE=1) and org/missing is not in the local "
        "Hub cache; on a machine with network run `hf download org/missing --local-dir DIR`, then pass DIR "
        "instead of the ID"]
