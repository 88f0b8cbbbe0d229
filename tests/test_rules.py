"""Rules the README states that had no test: refusals, the output dtype, DARE's per-module mask, failed writes,
the app's limits."""

import json
import shutil

import gradio as gr
import pytest
import torch
from peft import OFTConfig, VeraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from coremerge import MergeOptions, load_adapters, merge_to_folder
from coremerge.cli import main
from coremerge.comparison.images import GenerationSettings
from coremerge.errors import OutputError
from coremerge.formats import peft_export
from coremerge.merging.merge import merge_adapters
from coremerge.presets import find_preset
from coremerge.webapp import handlers
from coremerge.webapp.cache import ResultCache
from coremerge.webapp.workflow import generation_settings

from conftest import lora, save_adapter, tiny_llama


def refused(capsys, tmp_path, sources, message):
    """The CLI refuses with exit 2, one stderr line containing `message`, and writes nothing."""
    out = tmp_path / "out"
    capsys.readouterr()  # peft's warnings while the fixture was saved
    with pytest.raises(SystemExit) as exited:
        main(["merge", *map(str, sources), "--output", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return lines[0]


# ---------------------------------------------------------------- refusals


def test_lora_b_bias_is_refused(capsys, tmp_path, adapters):
    """peft's lora_bias=True adds lora_B.bias: the update is no longer B @ A."""
    folder = save_adapter(tmp_path / "bias", lora(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True), 21)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    assert key in load_file(folder / "adapter_model.safetensors")
    line = refused(capsys, tmp_path, [adapters["plain"], folder], f"{folder}: lora_B has a bias (tensor {key})")
    assert "only bias-free LoRA can be merged" in line


def test_a_file_with_several_adapters_is_refused(capsys, tmp_path):
    """peft's in-memory state dict of a model with two adapters, saved as one file."""
    model = get_peft_model(tiny_llama(), lora(r=4, lora_alpha=8, target_modules=["q_proj"]), adapter_name="first")
    model.add_adapter("second", lora(r=2, lora_alpha=2, target_modules=["q_proj"]))
    folder = tmp_path / "two"
    model.peft_config["first"].save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if ".lora_" in k},
              folder / "adapter_model.safetensors")
    refused(capsys, tmp_path, [folder], f"{folder}: the file holds several adapters (first, second)")


@pytest.mark.parametrize("kind, config, marker", [
    ("OFT", OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"], init_weights=False), "oft_R"),
    ("VeRA", VeraConfig(r=4, target_modules=["q_proj"], init_weights=False), "vera_lambda_"),
])
def test_other_peft_adapter_types_are_refused(kind, config, marker, capsys, tmp_path):
    folder = save_adapter(tmp_path / kind, config, seed=22)
    line = refused(capsys, tmp_path, [folder], f"{folder}: {kind} adapter (tensor base_model.model.model.layers.")
    assert marker in line and "not a plain low-rank product" in line


def test_a_module_without_lora_b_is_refused(capsys, tmp_path, adapters):
    folder = shutil.copytree(adapters["plain"], tmp_path / "half")
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    refused(capsys, tmp_path, [folder], f"{folder}: module model.layers.1.self_attn.v_proj has no lora_B tensor")


def test_a_file_without_lora_tensors_is_refused(capsys, tmp_path, adapters):
    folder = shutil.copytree(adapters["plain"], tmp_path / "empty")
    save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    refused(capsys, tmp_path, [folder], f"{folder}: adapter_model.safetensors holds no LoRA tensors")


# ---------------------------------------------------------------- output dtype


def cast_copy(source, target, dtype):
    folder = shutil.copytree(source, target)
    tensors = {k: v.to(dtype) for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def written_dtypes(folder):
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        return {handle.get_slice(k).get_dtype() for k in handle.keys()}


@pytest.mark.parametrize("dtypes, flag, written", [
    ((torch.float16, torch.float16), None, "F16"),  # one dtype in: that dtype out
    ((torch.bfloat16, torch.bfloat16), None, "BF16"),
    ((torch.float16, torch.bfloat16), None, "F32"),  # mixed: float32
    ((torch.float32, torch.bfloat16), None, "F32"),
    ((torch.float16, torch.bfloat16), "float16", "F16"),  # the flag wins
])
def test_output_dtype_rule(dtypes, flag, written, adapters, tmp_path):
    sources = [cast_copy(adapters[k], tmp_path / k, d) for k, d in zip(("plain", "named"), dtypes)]
    report = merge_to_folder([str(s) for s in sources], MergeOptions.create(method="ta", dtype=flag), tmp_path / "out")
    assert written_dtypes(tmp_path / "out") == {written}
    assert report["output_dtype"] == {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[written]


# ---------------------------------------------------------------- DARE's mask


def dare_masks(sources, seed, density=0.5):
    """{module: kept entries} of a full-space DARE merge of one adapter (kept = non-zero after the drop)."""
    options = MergeOptions.create(method="dare", space="full", density=density, seed=seed)
    masks = {}
    for module in merge_adapters(load_adapters([str(s) for s in sources]), options):
        update = module.lora_b @ module.lora_a
        masks[module.name] = update.abs() > 1e-9 * update.abs().max()
    return masks


def test_dare_mask_depends_on_module_and_seed_only(adapters, tmp_path):
    masks = dare_masks([adapters["plain"]], seed=0)
    q0, q1 = masks["model.layers.0.self_attn.q_proj"], masks["model.layers.1.self_attn.q_proj"]
    assert 0.4 < q0.double().mean() < 0.6  # density 0.5
    assert not torch.equal(q0, q1)  # same shape, another module: another mask
    assert all(torch.equal(masks[n], m) for n, m in dare_masks([adapters["plain"]], seed=0).items())  # reproducible
    other_seed = dare_masks([adapters["plain"]], seed=1)
    assert not any(torch.equal(masks[n], m) for n, m in other_seed.items())
    # dropping layer 0 from the adapter leaves layer 1's masks as they were: each module has its own generator
    folder = shutil.copytree(adapters["plain"], tmp_path / "layer1")
    tensors = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if "layers.0." not in k}
    save_file(tensors, folder / "adapter_model.safetensors")
    fewer = dare_masks([folder], seed=0)
    assert sorted(fewer) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert all(torch.equal(fewer[n], masks[n]) for n in fewer)


# ---------------------------------------------------------------- a failed write


def test_a_failed_write_leaves_the_earlier_output_and_no_staging_folder(adapters, tmp_path, monkeypatch):
    out = tmp_path / "out"
    merge_to_folder([str(adapters["plain"])], MergeOptions.create(method="ta"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(folder, report):
        (folder / peft_export.REPORT_NAME).write_text("{")  # half-written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("coremerge.merging.to_folder.write_report", disk_full)
    with pytest.raises(OutputError, match=r"--output .*out: writing failed \(no space left on device\)$"):
        merge_to_folder([str(adapters["plain"]), str(adapters["named"])], MergeOptions.create(method="tsv"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.partial-* or .out.old-* left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier output, untouched
    assert json.loads((out / "merge_report.json").read_text())["method"] == "ta"


# ---------------------------------------------------------------- the app's limits


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> ResultCache:
    cache = ResultCache(capacity=2, root=tmp_path / "cache")
    monkeypatch.setattr(handlers, "CACHE", cache)
    return cache


def app_error(prompts_text, preset="strings") -> str:
    rows = [[a.source, a.name, 1.0] for a in find_preset(preset).adapters[:2]]
    with pytest.raises(gr.Error) as error:
        handlers.merge_and_compare(preset, rows, "ta", "core", 1.0, False, None, prompts_text, None, None,
                                   lambda fraction, desc=None: None, *[p.default for p in handlers.PARAMETERS])
    return error.value.message


def test_prompt_limits(fresh_cache):
    assert app_error("\n".join(f"upper: w{i}" for i in range(13))) == "prompts: 13 given; at most 12"
    long = "upper: " + "a" * 394  # 401 characters
    assert app_error(long) == f"prompt {long[:30]!r}...: 401 characters; at most 400"
    assert app_error("  \n ") == "prompts: none given; write one prompt per line"
    assert fresh_cache.folders() == []


def test_twelve_prompts_of_400_characters_are_accepted():
    from coremerge.webapp.workflow import check_request

    request = handlers.build_request("strings", [[a.source, a.name, 1.0] for a in find_preset("strings").adapters],
                                     "ta", "core", 1.0, False, None,
                                     "\n".join("upper: " + "a" * 393 for _ in range(12)),
                                     [p.default for p in handlers.PARAMETERS])
    assert len(request.prompts) == 12 and {len(p) for p in request.prompts} == {400}
    check_request(request)  # no error at the limits


def test_image_size_and_steps_are_capped():
    preset = find_preset("sdxl-styles")
    asked = dict(preset.samples.generation, num_inference_steps=80, width=2048, height=1536)
    capped = generation_settings(type(preset)(**{**vars(preset), "samples": type(preset.samples)(
        **{**vars(preset.samples), "generation": asked})}))
    assert (capped.num_inference_steps, capped.width, capped.height) == (50, 1024, 1024)
    within = generation_settings(preset)
    assert within == GenerationSettings(**preset.samples.generation)  # 30 steps, 1024 px: unchanged


def test_new_tokens_are_capped(monkeypatch):
    """A Hub text preset asking for more than 128 new tokens gets 128 (the runner is built without a model)."""
    from coremerge.comparison import runners

    built = {}
    monkeypatch.setattr(runners.CausalLMRunner, "__init__",
                        lambda self, base_model, max_new_tokens=64, tokenizer=None: built.update(tokens=max_new_tokens))
    preset = find_preset("tinyllama-tasks")
    greedy = type(preset.samples)(**{**vars(preset.samples), "generation": {"max_new_tokens": 4096}})
    runners.build_runner(type(preset)(**{**vars(preset), "samples": greedy}))
    assert built["tokens"] == 128
    runners.build_runner(preset)
    assert built["tokens"] == min(int(preset.samples.generation.get("max_new_tokens", 64)), 128)


# ---------------------------------------------------------------- parameter ranges


def test_parameter_ranges_include_their_closed_ends_and_name_the_range():
    from coremerge import CoreMergeError

    assert MergeOptions.create(method="ties", density=1.0).params["density"] == 1.0  # (0, 1]: 1 is allowed
    assert MergeOptions.create(method="iso_cts", common_fraction=0.0).params["common_fraction"] == 0.0  # [0, 1]
    assert MergeOptions.create(method="iso_cts", common_fraction=1.0).params["common_fraction"] == 1.0
    assert MergeOptions.create(method="dare", seed=2**63 - 1).params["seed"] == 2**63 - 1
    for kwargs, message in (
        ({"method": "iso_cts", "common_fraction": 1.5}, "--common-fraction 1.5: must be a number in [0, 1]"),
        ({"method": "iso_cts", "common_fraction": -0.1}, "--common-fraction -0.1: must be a number in [0, 1]"),
        ({"method": "cart", "rank_fraction": 0.0}, "--rank-fraction 0.0: must be a number in (0, 1]"),
        ({"method": "dare", "seed": 1.5}, "--seed 1.5: must be an integer in [0, 9.22337e+18]"),
        ({"method": "dare", "seed": -1}, "--seed -1: must be an integer in [0, 9.22337e+18]"),
    ):
        with pytest.raises(CoreMergeError) as error:
            MergeOptions.create(**kwargs)
        assert str(error.value) == message
