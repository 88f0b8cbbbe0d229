"""The real Gradio server, driven with gradio_client: the default preset end to end, errors, sessions."""

import zipfile

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from coremerge.bundled.digits import load_backbone
from coremerge.presets import find_preset
from coremerge.webapp import handlers
from coremerge.webapp.handlers import PARAMETERS
from coremerge.webapp.sources import refusal

from conftest import peft_deltas

DIGITS = find_preset("digits")


def table(rows):
    return {"headers": handlers.ADAPTER_COLUMNS, "data": rows, "metadata": None}


def merge(client: Client, rows, method="ta", alpha=0.4):
    return client.predict("digits", table(rows), method, "core", alpha, False, None, "", "", None,
                          *[p.default for p in PARAMETERS], api_name="/merge_and_compare")


def test_default_preset_merge_compare_and_download_through_the_server(app_server, tmp_path):
    client = Client(app_server, verbose=False)
    rows, description, base, prompts, method, space, alpha = client.predict("digits", api_name="/show_preset")
    assert (method, space, alpha) == ("tsv", "core", 0.7)  # the preset file's merge defaults
    assert len(rows["data"]) == 8 and "coremerge/digits-vit" in base

    summary, comparison, accuracy, report, ranks, spectra, overlap, zip_path, snippet = merge(client, rows["data"])
    assert "Average normalized accuracy of the merge" in summary
    assert comparison.count("<tr>") == len(DIGITS.samples.images) + 2  # header, one row per image, scores
    assert accuracy["visible"] and accuracy["value"]["type"] == "matplotlib"
    assert spectra["type"] == "matplotlib" and overlap["type"] == "matplotlib"
    assert len(ranks["data"]) == 24 and "| merging |" in report

    zipfile.ZipFile(zip_path).extractall(tmp_path / "download")
    folder = tmp_path / "download" / "merged-adapter"
    base_model = load_backbone(DIGITS.folder / "digits" / "base")
    merged = peft_deltas(base_model, folder)
    inputs = [peft_deltas(base_model, DIGITS.resolve(source)) for source, _, _ in rows["data"]]
    for name, delta in merged.items():  # TA in core space: exactly 0.4 * the sum of the task updates
        torch.testing.assert_close(delta, 0.4 * sum(d[name] for d in inputs), rtol=1e-4, atol=1e-6)


def test_bad_input_is_one_message_and_the_server_keeps_serving(app_server):
    client = Client(app_server, verbose=False)
    rows = [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]]
    with pytest.raises(AppError) as error:
        merge(client, rows + [["/nowhere/adapter", "X", 1]])
    assert str(error.value) == str(refusal(3))  # the same for any path outside the preset's folder
    assert "Merged 2 adapters" in merge(client, rows)[0]


def test_one_session_cannot_push_another_sessions_merge(app_server):
    first, second = Client(app_server, verbose=False), Client(app_server, verbose=False)
    merge(first, [[a.source, a.name, a.weight] for a in DIGITS.adapters[:2]])
    with pytest.raises(AppError) as error:
        second.predict("me/merged", "hf_token", True, api_name="/push_to_hub")
    assert str(error.value).startswith("push: nothing to push yet")
    with pytest.raises(AppError) as error:  # the first session has a merge; the Hub is offline in tests
        first.predict("me/merged", "hf_token", True, api_name="/push_to_hub")
    assert str(error.value).startswith("push to me/merged: the Hub is offline here")
