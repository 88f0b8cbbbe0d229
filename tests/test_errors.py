"""Every bad input: one line on stderr naming the input and the problem, exit code 2, nothing written."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig
from safetensors.torch import load_file, save_file

from coremerge.cli import main

from conftest import lora, save_adapter, tiny_llama


def run_cli(capsys, *args):
    """Run `coremerge merge` in-process; return (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exited:
        main(["merge", *map(str, args)])
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def copy_adapter(source, target):
    shutil.copytree(source, target)
    return target


def expect_error(capsys, tmp_path, sources, message, *flags):
    out = tmp_path / "out"
    code, lines = run_cli(capsys, *sources, *flags, "--output", out)
    assert code == 2
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert lines[0].startswith("coremerge: error: ")
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    return lines[0]


@pytest.fixture(scope="module")
def odd_adapters(tmp_path_factory):
    """Adapters that must be refused, made by peft itself where peft can make them."""
    root = tmp_path_factory.mktemp("odd")
    targets = ["q_proj", "v_proj"]
    return {
        "other_base": save_adapter(root / "other_base", lora(r=4, lora_alpha=8, target_modules=targets), seed=11,
                                   model=tiny_llama(name="someone/other-model")),
        "wider": save_adapter(root / "wider", lora(r=4, lora_alpha=8, target_modules=targets), seed=12,
                              model=tiny_llama(hidden_size=48)),
        "dora": save_adapter(root / "dora", lora(r=4, lora_alpha=8, target_modules=targets, use_dora=True), seed=13),
        "loha": save_adapter(root / "loha", LoHaConfig(r=4, target_modules=targets, init_weights=False), seed=14),
        "lokr": save_adapter(root / "lokr", LoKrConfig(r=4, target_modules=targets, init_weights=False), seed=15),
        "ia3": save_adapter(root / "ia3", IA3Config(target_modules=targets, feedforward_modules=[]), seed=16),
    }


def test_different_base_models(capsys, tmp_path, adapters, odd_adapters):
    line = expect_error(capsys, tmp_path, [adapters["plain"], odd_adapters["other_base"]],
                        "only adapters of the same base model can be merged")
    assert f"{odd_adapters['other_base']} was trained on someone/other-model" in line
    assert f"{adapters['plain']} on coremerge-tests/tiny-llama" in line


def test_same_module_different_shapes(capsys, tmp_path, adapters, odd_adapters):
    line = expect_error(capsys, tmp_path, [adapters["plain"], odd_adapters["wider"]],
                        "the adapters do not fit the same base model")
    assert f"module model.layers.0.self_attn.q_proj is linear 48x48 in {odd_adapters['wider']}" in line
    assert f"but linear 32x32 in {adapters['plain']}" in line


@pytest.mark.parametrize("kind, message", [
    ("dora", "DoRA (lora_magnitude_vector) adapter (tensor base_model.model.model.layers.0.self_attn.q_proj.lora_"),
    ("loha", "LoHa adapter (tensor base_model.model.model.layers.0.self_attn.q_proj.hada_w1"),
    ("lokr", "LoKr adapter (tensor base_model.model.model.layers.0.self_attn.q_proj.lokr_w1"),
    ("ia3", "IA3 adapter (tensor base_model.model.model.layers.0.self_attn.q_proj.ia3_l"),
])
def test_non_lora_types_are_refused(capsys, tmp_path, adapters, odd_adapters, kind, message):
    line = expect_error(capsys, tmp_path, [adapters["plain"], odd_adapters[kind]], message)
    assert line.startswith(f"coremerge: error: {odd_adapters[kind]}: ")


def test_dora_flag_in_config(capsys, tmp_path, adapters):
    folder = copy_adapter(adapters["plain"], tmp_path / "flagged")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    expect_error(capsys, tmp_path, [folder], f"{folder}: DoRA adapter (use_dora: true)")


def test_other_peft_type_in_config(capsys, tmp_path, adapters):
    folder = copy_adapter(adapters["plain"], tmp_path / "adalora")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "ADALORA"}))
    expect_error(capsys, tmp_path, [folder], f"{folder}: peft_type ADALORA is not LoRA")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_tensor(capsys, tmp_path, adapters, value):
    folder = copy_adapter(adapters["plain"], tmp_path / "broken")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = value
    save_file(tensors, folder / "adapter_model.safetensors")
    expect_error(capsys, tmp_path, [adapters["named"], folder], f"{folder}: tensor {key} contains NaN or Inf values")


def test_missing_config(capsys, tmp_path, adapters):
    folder = copy_adapter(adapters["plain"], tmp_path / "noconfig")
    (folder / "adapter_config.json").unlink()
    expect_error(capsys, tmp_path, [folder], f"{folder}: folder has no adapter_config.json")
    expect_error(capsys, tmp_path, [folder / "adapter_model.safetensors"],
                 f"{folder / 'adapter_model.safetensors'}: no adapter_config.json next to adapter_model.safetensors")


@pytest.mark.parametrize("text, message", [
    ("{not json", "adapter_config.json is not valid JSON"),
    ('["a list"]', "adapter_config.json is malformed (expected a JSON object)"),
    ('{"peft_type": "LORA", "lora_alpha": 8}', "adapter_config.json is malformed (r must be a positive integer, not None)"),
    ('{"r": 4, "lora_alpha": 8}', "adapter_config.json is malformed (no peft_type)"),
])
def test_malformed_config(capsys, tmp_path, adapters, text, message):
    folder = copy_adapter(adapters["plain"], tmp_path / "malformed")
    (folder / "adapter_config.json").write_text(text)
    expect_error(capsys, tmp_path, [folder], f"{folder}: {message}")


def test_rank_disagreeing_with_config(capsys, tmp_path, adapters):
    folder = copy_adapter(adapters["plain"], tmp_path / "liar")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    expect_error(capsys, tmp_path, [folder], "has rank 4 in the weights but r=16 in adapter_config.json")


def test_unsafe_pickle_is_refused(capsys, tmp_path, adapters):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(adapters["plain"] / "adapter_config.json", folder)
    torch.save({"weights": load_file(adapters["plain"] / "adapter_model.safetensors"), "note": Exception("x")},
               folder / "adapter_model.bin")
    expect_error(capsys, tmp_path, [folder],
                 f"{folder}: adapter_model.bin cannot be loaded safely with torch.load(weights_only=True)")


def test_empty_source_list(capsys, tmp_path):
    expect_error(capsys, tmp_path, [], "no adapters given: pass at least one SOURCE")


def test_fewer_weights_than_sources(capsys, tmp_path, adapters):
    expect_error(capsys, tmp_path, [adapters["plain"], adapters["named"]],
                 "--weights: got 1 weight(s) for 2 source(s); give one per source", "--weights", "0.5")


def test_missing_local_path(capsys, tmp_path):
    expect_error(capsys, tmp_path, ["./no/such/adapter"], "./no/such/adapter: no such file or folder")


def test_bad_flag_values(capsys, tmp_path, adapters):
    expect_error(capsys, tmp_path, [adapters["plain"]], "argument --method: invalid choice: 'magic'",
                 "--method", "magic")
    expect_error(capsys, tmp_path, [adapters["plain"]], "--density 2.0: must be a number in (0, 1]",
                 "--method", "ties", "--density", "2")
    expect_error(capsys, tmp_path, [adapters["plain"]], "--density: method tsv does not take it",
                 "--density", "0.5")


def test_weights_that_cancel_everywhere(capsys, tmp_path, adapters):
    expect_error(capsys, tmp_path, [adapters["plain"], adapters["plain"]],
                 "the merged update is zero in every module", "--method", "ta", "--weights", "1", "-1")


def test_real_process_exit_code_and_single_line(tmp_path, adapters):
    """The installed entry point behaves the same in a real process."""
    result = subprocess.run([sys.executable, "-m", "coremerge", "merge", str(adapters["plain"]), "--weights", "1",
                             "2", "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "coremerge: error: --weights: got 2 weight(s) for 1 source(s); give one per source"]
    assert not (tmp_path / "out").exists()


def test_real_process_says_everything_before_it_leaves(tmp_path, adapters):
    """The program leaves with os._exit once the output is written: its summary (stdout), its warnings (stderr)
    and --help must all be flushed first, and the exit codes kept."""
    out = tmp_path / "out"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's output waits in a buffer
    result = subprocess.run([sys.executable, "-m", "coremerge", "merge", str(adapters["plain"]), "--method", "ties",
                             "--output", str(out)], capture_output=True, text=True, env=buffered)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("merged 1 adapter(s) with ties in core space into ")
    assert summary[0].endswith(")") and "writing " in summary[0]
    assert result.stderr.strip().splitlines()[-1].startswith(f"coremerge: warning: {adapters['plain']} is merged alone")
    assert (out / "adapter_model.safetensors").is_file()
    shown_help = subprocess.run([sys.executable, "-m", "coremerge", "merge", "--help"], capture_output=True, text=True,
                                env=buffered)
    assert shown_help.returncode == 0 and shown_help.stdout.startswith("usage: coremerge merge")
    assert "methods (--method):" in shown_help.stdout
