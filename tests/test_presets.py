"""Preset files: schema validation with clear messages, listing order, manifests."""

import json

import pytest

from coremerge import CoreMergeError
from coremerge.comparison.evaluation import Scores
from coremerge.presets import PRESETS_DIR, check_manifest, find_preset, list_presets, load_preset, write_manifest

MINIMAL = """
name: tiny
title: Tiny
description: A test preset.
kind: text-generation
base_model: org/base
adapters:
  - {name: A, source: org/a}
"""


def test_every_shipped_preset_validates_and_bundled_ones_come_first():
    presets = list_presets()
    assert presets, f"no presets in {PRESETS_DIR}"
    flags = [p.bundled for p in presets]
    assert flags == sorted(flags, reverse=True)
    for preset in presets:
        if preset.bundled:
            assert all(not s.startswith(("http", "org/")) for s in preset.adapter_sources)
            for source in preset.adapter_sources + [preset.base_model_path]:
                assert (preset.folder / source).exists(), source


def test_minimal_preset_and_relative_sources(tmp_path):
    (tmp_path / "tiny.yaml").write_text(MINIMAL)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "a").mkdir()
    preset = load_preset(tmp_path / "tiny.yaml")
    assert preset.adapter_sources == [str(tmp_path / "org" / "a")]  # a local folder wins
    assert preset.base_model_path == "org/base"  # otherwise the Hub ID as given
    assert find_preset("tiny", tmp_path).name == "tiny"


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "not valid YAML"),
    ("- a list", "expected a mapping at the top level"),
    (MINIMAL.replace("kind: text-generation", "kind: painting"), "kind: Input should be 'text-generation'"),
    (MINIMAL.replace("title: Tiny\n", ""), "title: Field required"),
    (MINIMAL + "colour: blue\n", "colour: Extra inputs are not permitted"),
    (MINIMAL.replace("  - {name: A, source: org/a}", "  []").replace("adapters:\n", "adapters:"),
     "adapters: List should have at least 1 item"),
])
def test_bad_preset_files(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(CoreMergeError) as error:
        load_preset(tmp_path / "bad.yaml")
    assert str(error.value).startswith(f"preset {tmp_path / 'bad.yaml'}: ")
    assert message in str(error.value)


def test_unknown_preset_name(tmp_path):
    (tmp_path / "tiny.yaml").write_text(MINIMAL)
    with pytest.raises(CoreMergeError, match="--preset huge: no such preset; choose one of tiny"):
        find_preset("huge", tmp_path)


def test_manifest_names_the_changed_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_manifest(tmp_path)
    check_manifest(tmp_path)
    (tmp_path / "sub" / "b.json").write_text("[]")
    with pytest.raises(CoreMergeError, match="sub/b.json is changed"):
        check_manifest(tmp_path)
    (tmp_path / "sub" / "b.json").unlink()
    with pytest.raises(CoreMergeError, match="sub/b.json is missing"):
        check_manifest(tmp_path)


def test_normalized_accuracy_by_hand():
    scores = Scores(base={"a": 0.2, "b": 0.5}, individual={"a": 0.8, "b": 1.0}, merged={"a": 0.6, "b": 0.9})
    assert scores.normalized == pytest.approx({"a": 0.75, "b": 0.9})
    assert Scores.mean(scores.normalized) == pytest.approx(0.825)


def test_cli_merges_a_preset(tmp_path, capsys):
    from coremerge.cli import main

    assert main(["merge", "--preset", "digits", "--method", "ta", "--output", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    preset = find_preset("digits")
    assert [s["source"] for s in report["sources"]] == preset.adapter_sources
    assert report["weights"] == [a.weight for a in preset.adapters]
    with pytest.raises(SystemExit) as exited:
        main(["merge", "--preset", "nope", "--output", str(tmp_path / "x")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("coremerge: error: --preset nope: no such preset; choose one of digits")


@pytest.mark.parametrize("flags, expected", [
    ([], ("tsv", "core", 0.7)),  # digits' merge block: tsv, core, alpha 0.7 chosen on validation
    (["--alpha", "0.3"], ("tsv", "core", 0.3)),  # a flag wins over the preset
    (["--space", "full"], ("tsv", "full", 0.7)),
    (["--method", "ta"], ("ta", "core", 1.0)),  # the preset's alpha was chosen for tsv, not for ta
    (["--method", "ta", "--alpha", "0.5"], ("ta", "core", 0.5)),
])
def test_cli_preset_merges_with_the_preset_settings_unless_flags_say_otherwise(tmp_path, flags, expected):
    from coremerge.cli import main

    assert find_preset("digits").merge.model_dump() == {"method": "tsv", "space": "core", "alpha": 0.7}
    out = tmp_path / "out"
    assert main(["merge", "--preset", "digits", *flags, "--output", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["method"], report["space"], report["alpha"]) == expected


def test_cli_without_a_preset_keeps_its_defaults(adapters, tmp_path):
    from coremerge.cli import main

    out = tmp_path / "out"
    assert main(["merge", str(adapters["plain"]), str(adapters["named"]), "--output", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["method"], report["space"], report["alpha"]) == ("tsv", "core", 1.0)
