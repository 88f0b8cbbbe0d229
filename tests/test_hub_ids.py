"""Hub IDs are checked before anything reaches huggingface_hub; a local stand-in Hub shows which token each
download sends, and that an unknown or unreachable ID fails within seconds, in one line, without retries."""

import logging
import time

import pytest
from huggingface_hub import constants
from stand_in_hub import COMMIT, StandInHub, never_answering, point_hub_at, refusing, serve

from coremerge.errors import AdapterFormatError, HubError
from coremerge.formats.sources import parse_hub_id, resolve_hub, resolve_source


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub online, against whatever endpoint the test sets."""
    return lambda url: point_hub_at(monkeypatch, url)


@pytest.mark.parametrize("source, repo, revision, path", [
    ("org/name", "org/name", None, ""),
    ("org/name@v1.0", "org/name", "v1.0", ""),
    ("my-org/my_repo.v2@main/sub/folder/", "my-org/my_repo.v2", "main", "sub/folder"),
    ("org/name/lora.safetensors", "org/name", None, "lora.safetensors"),
])
def test_valid_hub_ids_split_into_repo_revision_and_path(source, repo, revision, path):
    hub_id = parse_hub_id(source)
    assert (hub_id.repo, hub_id.revision, hub_id.path) == (repo, revision, path)


@pytest.mark.parametrize("source, problem", [
    ("org/name/../../etc/passwd", "'..' is not a valid subfolder or file name"),
    ("org/name/./x", "'.' is not a valid subfolder or file name"),
    ("org/name//x", "'' is not a valid subfolder or file name"),
    ("org/name/.hidden", "'.hidden' is not a valid subfolder or file name"),
    ("org/na..me", "'na..me' is not a valid Hub owner or repository name"),
    ("org/na--me", "'na--me' is not a valid Hub owner or repository name"),
    ("-org/name", "'-org' is not a valid Hub owner or repository name"),
    ("org/name@..", "revision '..' is not valid"),
    ("org/name@a b", "revision 'a b' is not valid"),
    ("just-a-name", "not a valid Hub ID"),
    ("/etc/passwd", "not a valid Hub ID"),
    ("org/name\x00/x", "not a valid Hub ID"),
    ("org/name/\u202egnp.exe", "is not a valid subfolder or file name"),
])
def test_malformed_hub_ids_are_refused_naming_the_id(source, problem):
    with pytest.raises(AdapterFormatError) as error:
        parse_hub_id(source)
    message = str(error.value)
    assert problem in message and "\n" not in message and "\x00" not in message
    assert message.startswith(source.encode("unicode_escape").decode() if not source.isprintable() else source)


def test_a_download_sends_the_token_it_is_given_or_none(online, adapters, tmp_path):
    hub = StandInHub()
    hub.add_folder("org/public", adapters["plain"])
    hub.add_folder("org/private", adapters["plain"], token="hf_visitor")
    with serve(hub):
        online(hub.url)
        resolved = resolve_hub("org/public", token=False, cache_dir=tmp_path / "a")
        assert resolved.origin == "hub" and resolved.revision == COMMIT
        assert resolved.weights_path.read_bytes() == (adapters["plain"] / "adapter_model.safetensors").read_bytes()
        assert str(resolved.weights_path).startswith(str(tmp_path / "a"))  # the caller's cache, not the shared one
        assert set(hub.authorizations) == {None}

        hub.authorizations.clear()
        with pytest.raises(HubError, match=r"^org/private: repository org/private not found on the Hub \(for a "
                                           r"private repo, give a read token that can see it\)$"):
            resolve_hub("org/private", token=False, cache_dir=tmp_path / "b")
        assert set(hub.authorizations) == {None}

        hub.authorizations.clear()
        resolved = resolve_hub("org/private", token="hf_visitor", cache_dir=tmp_path / "c")
        assert resolved.config_path.is_file() and set(hub.authorizations) == {"Bearer hf_visitor"}


def test_the_cli_default_keeps_huggingface_hubs_own_token(online, adapters, tmp_path, monkeypatch):
    hub = StandInHub()
    hub.add_folder("org/private", adapters["plain"], token="hf_server")
    monkeypatch.setenv("HF_TOKEN", "hf_server")
    with serve(hub):
        online(hub.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        assert resolve_source("org/private").revision == COMMIT  # token=None: HF_TOKEN, as huggingface_hub does
        assert set(hub.authorizations) == {"Bearer hf_server"}


@pytest.mark.parametrize("endpoint", ["refusing", "never answering", "unknown id"])
def test_an_unknown_or_unreachable_id_fails_within_5_s_in_one_line_without_retries(online, endpoint, tmp_path,
                                                                                    caplog):
    caplog.set_level(logging.DEBUG)
    with serve(StandInHub()) as hub, never_answering() as silent:
        online({"refusing": refusing(), "never answering": silent, "unknown id": hub.url}[endpoint])
        started = time.perf_counter()
        with pytest.raises(HubError) as error:
            resolve_hub("org/nowhere", token=False, cache_dir=tmp_path)
        seconds = time.perf_counter() - started
    message = str(error.value)
    assert seconds <= 5.0, f"{endpoint}: {seconds:.1f} s"
    assert "\n" not in message and message.startswith("org/nowhere: ")
    assert {"refusing": "the Hub could not be reached (",
            "never answering": "the Hub did not answer within 3 s",
            "unknown id": "repository org/nowhere not found on the Hub"}[endpoint] in message
    assert not [r for r in caplog.records if "retry" in r.getMessage().lower()]
    if endpoint == "unknown id":
        assert len(hub.authorizations) == 1  # one HEAD, no retries
