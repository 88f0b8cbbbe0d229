"""Preset files: schema validation with clear messages, listing order, manifests."""

import json

import pytest
import torch

from coremerge import CoreMergeError
from coremerge.comparison.evaluation import Scores
from coremerge.merging.methods import METHODS
from coremerge.presets import (PRESETS_DIR, MethodSettings, check_manifest, find_preset, list_presets, load_preset,
                               write_manifest)

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
    ([], ("tsv", "core", 0.7, {})),  # digits' merge block: tsv, core, alpha 0.7 chosen on validation
    (["--alpha", "0.3"], ("tsv", "core", 0.3, {})),  # a flag wins over the preset
    (["--space", "full"], ("tsv", "full", 0.7, {})),
    (["--method", "ta"], ("ta", "core", 0.4, {})),  # ta's own tuned alpha, not tsv's
    (["--method", "ta", "--alpha", "0.5"], ("ta", "core", 0.5, {})),
    (["--method", "ties"], ("ties", "core", 1.5, {"density": 0.4})),  # tuned alpha and density
    (["--method", "ties", "--density", "0.7"], ("ties", "core", 1.5, {"density": 0.7})),  # one flag overrides one
    (["--method", "ties", "--space", "full"], ("ties", "full", 1.0, {"density": 0.4})),  # full space's own alpha
    # tuned alpha, default parameters
    (["--method", "cart"], ("cart", "core", 2.0, {"rank_fraction": 0.04, "cart_lambda": 0.1})),
])
def test_cli_preset_merges_with_the_preset_settings_unless_flags_say_otherwise(tmp_path, flags, expected):
    from coremerge.cli import main

    assert find_preset("digits").merge.model_dump() == {"method": "tsv", "space": "core", "alpha": 0.7}
    out = tmp_path / "out"
    assert main(["merge", "--preset", "digits", *flags, "--output", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["method"], report["space"], report["alpha"], report["params"]) == expected


def test_cli_preset_with_a_method_writes_the_merge_at_that_methods_tuned_alpha(tmp_path):
    """The written weights equal the library's merge at the alpha the YAML file gives TA (read here from the file
    itself, not through coremerge's preset parser), and differ from a merge at alpha 1."""
    import yaml
    from safetensors.torch import load_file

    from coremerge import MergeOptions, merge_to_folder
    from coremerge.cli import main

    tuned_alpha = yaml.safe_load((PRESETS_DIR / "digits.yaml").read_text())["tuned"]["ta"]["alpha"]
    assert tuned_alpha == 0.4
    assert main(["merge", "--preset", "digits", "--method", "ta", "--output", str(tmp_path / "cli")]) == 0
    sources = [str(PRESETS_DIR / a.source) for a in find_preset("digits").adapters]
    for alpha, folder in ((tuned_alpha, "at-tuned"), (1.0, "at-1")):
        merge_to_folder(sources, MergeOptions.create(method="ta", space="core", alpha=alpha), tmp_path / folder)
    written = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "at-tuned" / "adapter_model.safetensors")
    at_one = load_file(tmp_path / "at-1" / "adapter_model.safetensors")
    assert written.keys() == expected.keys()
    for key in written:
        assert torch.equal(written[key], expected[key]), key
    assert any(not torch.allclose(written[k], at_one[k]) for k in written if "lora_B" in k)


TUNED = MINIMAL + "merge: {method: tsv, space: core, alpha: 0.7}\n"


def test_tuned_settings_per_method(tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        TUNED + "tuned:\n  tsv: {alpha: 0.7}\n  ties: {alpha: 1.5, density: 0.4, full: {alpha: 1.0}}\n")
    preset = load_preset(tmp_path / "tiny.yaml")
    assert preset.settings_for("ties") == MethodSettings(1.5, {"density": 0.4}, tuned=True)  # the preset's space
    assert preset.settings_for("ties", "core") == MethodSettings(1.5, {"density": 0.4}, tuned=True)
    assert preset.settings_for("ties", "full") == MethodSettings(1.0, {"density": 0.4}, tuned=True)  # its own alpha
    assert preset.settings_for("tsv") == MethodSettings(0.7, {}, tuned=True)
    # not tuned: the method's defaults and alpha 1
    assert preset.settings_for("dare") == MethodSettings(1.0, {"density": 0.9, "seed": 0}, tuned=False)
    # a preset without a tuned block: its merge alpha for its own method only
    (tmp_path / "tiny.yaml").write_text(TUNED)
    preset = load_preset(tmp_path / "tiny.yaml")
    assert preset.settings_for("tsv") == MethodSettings(0.7, {}, tuned=False)
    assert preset.settings_for("ta") == MethodSettings(1.0, {}, tuned=False)


@pytest.mark.parametrize("block, message", [
    ("  tas: {alpha: 0.4}", "tuned.tas: unknown method; choose among ta, ties"),
    ("  ties: {density: 0.4}", "tuned.ties: give its alpha"),
    ("  ta: {alpha: 0.4, density: 0.5}", "tuned.ta.density: ta does not take it (it takes alpha)"),
    ("  ties: {alpha: 1.5, density: 1.5}", "tuned.ties.density: 1.5 is out of range (0, 1]"),
    ("  ta: {alpha: -1}", "tuned.ta.alpha: -1 is out of range (0, inf]"),
    ("  ta: {alpha: .nan}", "tuned.ta.alpha: nan is out of range"),
    ("  tsv: {alpha: 0.5}", "tuned.tsv.alpha 0.5 differs from merge.alpha 0.7 (the preset's own choice)"),
    ("  ta: {alpha: high}", "tuned.ta.alpha: 'high' is not a number"),
    ("  ta: {alpha: 0.4, full: 2}", "tuned.ta.full: give the settings that differ in full space, as {alpha: A, ...}"),
    ("  ties: {alpha: 1.5, full: {density: 2}}", "tuned.ties.full.density: 2 is out of range (0, 1]"),
    ("  tsv: {alpha: 0.7, core: {alpha: 0.5}}", "tuned.tsv.alpha 0.5 differs from merge.alpha 0.7"),
    ("  ta: 0.4", "tuned.ta: Input should be a valid dictionary"),
])
def test_bad_tuned_blocks(tmp_path, block, message):
    (tmp_path / "bad.yaml").write_text(TUNED + "tuned:\n" + block + "\n")
    with pytest.raises(CoreMergeError) as error:
        load_preset(tmp_path / "bad.yaml")
    assert str(error.value).startswith(f"preset {tmp_path / 'bad.yaml'}: ")
    assert message in str(error.value)


def test_bundled_presets_tuned_blocks():
    """digits and questions: every method tuned on validation; strings: none (no setting scores above 0 there);
    Hub presets: none (no cited validation search)."""
    tuned = {p.name: set(p.tuned) for p in list_presets()}
    assert tuned.pop("digits") == set(METHODS)
    assert tuned.pop("questions") == set(METHODS)
    assert all(not methods for methods in tuned.values()), tuned


def test_cli_without_a_preset_keeps_its_defaults(adapters, tmp_path):
    from coremerge.cli import main

    out = tmp_path / "out"
    assert main(["merge", str(adapters["plain"]), str(adapters["named"]), "--output", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["method"], report["space"], report["alpha"]) == ("tsv", "core", 1.0)
