"""Stable Diffusion LoRAs: kohya / diffusers / peft files of tiny SD 1.5-like and SDXL-like pipelines load to the
updates peft computes, merge with every method into one file that `load_lora_weights` loads with exactly the
merged update, refuse what is not a plain LoRA, and compare base / each LoRA / merged images on one pipeline."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import expected_updates
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS, convert_state_dict
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_diffusion import add_lora, lora_deltas, tiny_sd15, tiny_sdxl, tiny_tokenizer, write_kohya

from coremerge import METHODS, MergeOptions, load_adapter, load_adapters, merge_to_folder
from coremerge.cli import main
from coremerge.comparison.images import GenerationSettings, LoraEntry, compare_images
from coremerge.formats.diffusion_family import SD1, SDXL, UNKNOWN, is_diffusion_set

# Targets (peft regexes) few enough to keep the tests fast, covering every kind of module kohya names differently:
# conv_in (input_blocks.0.0), the downsampler (input_blocks.3.0.op), resnet conv1 / conv2 (in_layers.2 / out_layers.3,
# 3x3 LoCon), conv_shortcut (skip_connection, 1x1), time_emb_proj (emb_layers.1), attention, proj_in, ff, upsampler.
KOHYA_SDXL_UNET = (
    r"conv_in|down_blocks\.0\.downsamplers\.0\.conv|down_blocks\.1\.resnets\.0\.(conv1|conv_shortcut|time_emb_proj)"
    r"|down_blocks\.1\.attentions\.0\.(proj_in|transformer_blocks\.[01]\.attn[12]\.(to_q|to_k|to_v|to_out\.0))"
    r"|mid_block\.attentions\.0\.transformer_blocks\.1\.(attn2\.to_k|ff\.net\.0\.proj)|mid_block\.resnets\.1\.conv2"
    r"|up_blocks\.0\.(resnets\.2\.conv_shortcut|attentions\.2\.transformer_blocks\.0\.attn1\.to_v|upsamplers\.0\.conv)"
)
DIFFUSERS_SDXL_UNET = (  # overlaps the kohya LoRA in some modules, has its own elsewhere
    r"down_blocks\.1\.attentions\.0\.(proj_out|transformer_blocks\.[01]\.attn2\.(to_k|to_v))"
    r"|down_blocks\.1\.resnets\.0\.conv1"
    r"|up_blocks\.0\.attentions\.1\.transformer_blocks\.0\.attn2\.to_k|up_blocks\.1\.resnets\.0\.conv2"
)


def lora(targets, r=4, alpha=8, **kwargs) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second thread only fights (generation is ~50x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tokenizer) -> dict:
    """LoRA files of the tiny pipelines, and each one's per-module update as peft computed it."""
    root = tmp_path_factory.mktemp("diffusion_loras")
    made, deltas = {}, {}

    # kohya SDXL: sgm block names, lora_te1_ / lora_te2_, alpha 8 at rank 4 (scale 2), LoCon convs, fp32
    pipe = tiny_sdxl(tokenizer)
    state = add_lora(pipe, {"unet": lora(KOHYA_SDXL_UNET),
                            "text_encoder": lora(["q_proj", "v_proj", "out_proj"]),
                            "text_encoder_2": lora(["q_proj", "k_proj", "fc1"])}, seed=1)
    made["kohya_sdxl"] = write_kohya(root / "style_a.safetensors", state, alpha=8, sgm=True,
                                     metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    deltas["kohya_sdxl"] = lora_deltas(pipe)

    # diffusers SDXL, saved by diffusers itself with its LoraConfig metadata: r 3, alpha 6, a rank pattern
    pipe = tiny_sdxl(tokenizer)
    unet_config = lora(DIFFUSERS_SDXL_UNET, r=3, alpha=6,
                       rank_pattern={"^up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": 2})
    te_config = lora(["q_proj", "k_proj", "out_proj"], r=2, alpha=1)
    te2_config = lora(["v_proj", "text_projection"], r=2, alpha=2)  # text_projection: beside text_model, not in it
    state = add_lora(pipe, {"unet": unet_config, "text_encoder": te_config, "text_encoder_2": te2_config}, seed=2)
    pipe.save_lora_weights(root / "style_b", unet_lora_layers=state["unet"],
                           text_encoder_lora_layers=state["text_encoder"],
                           text_encoder_2_lora_layers=state["text_encoder_2"],
                           unet_lora_adapter_metadata=unet_config.to_dict(),
                           text_encoder_lora_adapter_metadata=te_config.to_dict(),
                           text_encoder_2_lora_adapter_metadata=te2_config.to_dict())
    made["diffusers_sdxl"] = root / "style_b" / "pytorch_lora_weights.safetensors"
    deltas["diffusers_sdxl"] = lora_deltas(pipe)

    # kohya SD 1.5: diffusers block names, lora_te_, alpha 2 at rank 4 (scale 0.5), 1x1-conv proj_in, fp16
    pipe = tiny_sd15(tokenizer)
    sd15_unet = r"down_blocks\.0\.(attentions\.0\.(proj_in|transformer_blocks\.0\.attn[12]\.to_q)|resnets\.0\.conv1)"
    state = add_lora(pipe, {"unet": lora(sd15_unet, alpha=2),
                            "text_encoder": lora(["q_proj", "out_proj"], alpha=2)}, seed=3)
    made["kohya_sd15"] = write_kohya(root / "sd15.safetensors", state, alpha=2, sgm=False, dtype=torch.float16)
    deltas["kohya_sd15"] = {name: _fp16_delta(pipe, name) for name in lora_deltas(pipe)}

    # a peft folder saved from a diffusers UNet (get_peft_model + save_pretrained)
    pipe = tiny_sd15(tokenizer)
    torch.manual_seed(4)
    targets = r".*attentions\.0\.transformer_blocks\.0\.attn1\.to_k|up_blocks\.1\.resnets\.0\.conv2"
    peft_unet = get_peft_model(pipe.unet, lora(targets, r=2, alpha=4))
    peft_unet.save_pretrained(str(root / "peft_unet"))
    made["peft_unet"] = root / "peft_unet"
    deltas["peft_unet"] = lora_deltas(pipe)

    # diffusers' old naming (attn processors: to_q_lora.down, lora_linear_layer), alpha == r: scale 1
    pipe = tiny_sdxl(tokenizer)
    old_unet = r"down_blocks\.1\.attentions\.[01]\.transformer_blocks\.0\.attn[12]\.(to_q|to_out\.0)"
    state = add_lora(pipe, {"unet": lora(old_unet, r=2, alpha=2),
                            "text_encoder": lora(["q_proj", "fc1"], r=2, alpha=2)}, seed=5)
    made["diffusers_old_sdxl"] = _write_old_diffusers(root / "old.safetensors", state)
    deltas["diffusers_old_sdxl"] = lora_deltas(pipe)
    return {"files": made, "deltas": deltas}


def _fp16_delta(pipe, name):
    """The update of a LoRA whose factors were stored in float16: peft's formula on the rounded factors."""
    component, _, local = name.partition(".")
    module = getattr(pipe, component).get_submodule(local)
    a = module.lora_A["default"].weight.detach().half().double()
    b = module.lora_B["default"].weight.detach().half().double()
    return module.scaling["default"] * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def _write_old_diffusers(path, state):
    """diffusers' pre-peft names (unet `attn1.processor.to_q_lora.down.weight`, text encoder
    `self_attn.to_q_lora.down.weight`, `mlp.fc1.lora_linear_layer.down.weight`): diffusers' own
    old -> peft tables, inverted."""
    unet = convert_state_dict(state["unet"], {peft: old for old, peft in UNET_TO_DIFFUSERS.items()})
    unet = {k.replace(".attn1.", ".attn1.processor."): v for k, v in unet.items()}
    te = convert_state_dict(state["text_encoder"], {peft: old for old, peft in DIFFUSERS_OLD_TO_PEFT.items()})
    tensors = {**{f"unet.{k}": v for k, v in unet.items()},
               **{f"text_encoder.text_model.{k}": v for k, v in te.items()}}
    assert any("to_q_lora.down" in k for k in tensors) and any("lora_linear_layer" in k for k in tensors)
    save_file(tensors, str(path))
    return path


def canonical_updates(source) -> dict[str, torch.Tensor]:
    adapter = load_adapter(str(source))
    with adapter.open() as reader:
        return {name: (lambda t: t.b @ t.a)(adapter.read_factors(reader, name)) for name in adapter.modules}


@pytest.mark.parametrize("kind, fmt, family", [
    ("kohya_sdxl", "kohya", SDXL),
    ("diffusers_sdxl", "diffusers", SDXL),  # told by its text_encoder_2 modules
    ("kohya_sd15", "kohya", UNKNOWN),
    ("peft_unet", "peft", UNKNOWN),
    ("diffusers_old_sdxl", "diffusers-old", UNKNOWN),
])
def test_loading_equals_the_update_peft_computes(kind, fmt, family, loras):
    ours = canonical_updates(loras["files"][kind])
    theirs = loras["deltas"][kind]
    assert sorted(ours) == sorted(theirs)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name], delta, rtol=1e-5, atol=1e-7)
    adapter = load_adapter(str(loras["files"][kind]))
    assert (adapter.format, adapter.family) == (fmt, family)


def test_kohya_sdxl_names_and_kernels(loras):
    adapter = load_adapter(str(loras["files"]["kohya_sdxl"]))
    conv1 = adapter.modules["unet.down_blocks.1.resnets.0.conv1"]  # kohya: lora_unet_input_blocks_4_0_in_layers_2
    assert conv1.a_key == "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight"
    assert (conv1.kind, conv1.a_shape, conv1.scaling) == ("conv", (4, 32, 3, 3), 2.0)
    assert adapter.modules["unet.up_blocks.0.resnets.2.conv_shortcut"].a_shape == (4, 96, 1, 1)
    assert adapter.modules["unet.down_blocks.0.downsamplers.0.conv"].a_key.startswith("lora_unet_input_blocks_3_0_op.")
    assert adapter.modules["unet.up_blocks.0.upsamplers.0.conv"].a_key.startswith("lora_unet_output_blocks_2_2_conv.")
    assert adapter.modules["unet.conv_in"].a_key.startswith("lora_unet_input_blocks_0_0.")
    assert "text_encoder_2.encoder.layers.1.mlp.fc1" in adapter.modules
    components = {name.split(".")[0] for name in adapter.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}


def test_diffusion_sets_are_told_apart(loras, adapters):
    assert is_diffusion_set(load_adapters([str(loras["files"]["kohya_sdxl"]), str(loras["files"]["diffusers_sdxl"])]))
    assert not is_diffusion_set(load_adapters([str(adapters["plain"])]))


@pytest.fixture(scope="module")
def sdxl_pipe(tokenizer):
    return tiny_sdxl(tokenizer)


def loaded_deltas(pipe, folder, adapter_name):
    """Load a written LoRA as a user would, read every module's update, and take the LoRA off again."""
    pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name=adapter_name)
    try:
        return lora_deltas(pipe, adapter_name)
    finally:
        pipe.delete_adapters([adapter_name])


@pytest.mark.parametrize("method, space", [(m, "core") for m in METHODS] + [("ties", "full"), ("tsv", "knots")])
def test_kohya_and_diffusers_sdxl_merge_into_a_file_diffusers_loads(method, space, loras, sdxl_pipe, tmp_path, capsys):
    """Every method: `coremerge merge` on a kohya and a diffusers SDXL LoRA writes one diffusers file;
    `load_lora_weights` puts exactly the merged update on every module (UNet, both text encoders, conv kernels)."""
    sources = [loras["files"]["kohya_sdxl"], loras["files"]["diffusers_sdxl"]]
    out = tmp_path / "out"
    assert main(["merge", *map(str, sources), "--method", method, "--space", space, "--weights", "1", "0.7",
                 "--output", str(out)]) == 0
    assert "merged 2 adapter(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["merge_report.json", "pytorch_lora_weights.safetensors"]
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["output_format"], report["family"], report["file"]) == ("diffusers", SDXL,
                                                                          "pytorch_lora_weights.safetensors")
    expected = expected_updates(sources, MergeOptions.create(method=method, space=space, weights=[1, 0.7]))
    expected = {name: u for name, u in expected.items() if name not in report["zero_modules"]}
    loaded = loaded_deltas(sdxl_pipe, out, method)
    assert sorted(loaded) == sorted(expected)
    assert {name.split(".")[0] for name in loaded} == {"unet", "text_encoder", "text_encoder_2"}
    for name, update in expected.items():
        torch.testing.assert_close(loaded[name], update.dense(), rtol=1e-4, atol=1e-6)


def module_weight(pipe, name):
    component, _, local = name.partition(".")
    model = getattr(pipe, component)
    inner = component.startswith("text_encoder") and hasattr(model, "text_model") and not local.startswith("text_proj")
    module = model.get_submodule(f"text_model.{local}" if inner else local)
    module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return module.weight.detach().to(torch.float64).reshape(module.weight.shape[0], -1).clone()


def test_fused_weights_change_by_the_weighted_sum_of_the_original_updates(loras, tokenizer, tmp_path):
    """Task arithmetic, checked against peft's own updates of the two original LoRAs (no coremerge math):
    after `fuse_lora`, every weight has moved by exactly 1.0 dW_kohya - 0.5 dW_diffusers."""
    assert_fused_weights_move_by_the_weighted_sum(loras, {"kohya_sdxl": 1.0, "diffusers_sdxl": -0.5},
                                                  tiny_sdxl(tokenizer), ["unet", "text_encoder", "text_encoder_2"],
                                                  tmp_path)


def assert_fused_weights_move_by_the_weighted_sum(loras, weights: dict, pipe, components, tmp_path):
    """TA-merge the LoRAs `weights` names, fuse the merge into `pipe`: each adapted weight must move by exactly
    sum_kind weight * (that LoRA's own update, from `loras["deltas"]`)."""
    merge_to_folder([str(loras["files"][k]) for k in weights],
                    MergeOptions.create(method="ta", weights=list(weights.values())), tmp_path / "out")
    expected: dict[str, torch.Tensor] = {}
    for kind, weight in weights.items():
        for name, delta in loras["deltas"][kind].items():
            expected[name] = expected.get(name, 0) + weight * delta
    before = {name: module_weight(pipe, name) for name in expected}
    pipe.load_lora_weights(str(tmp_path / "out"), adapter_name="merged")
    pipe.fuse_lora(components=components, adapter_names=["merged"])
    for name, change in expected.items():
        torch.testing.assert_close(module_weight(pipe, name) - before[name], change, rtol=1e-4, atol=2e-6)


def test_sd15_kohya_and_peft_unet_merge_and_load(loras, tokenizer, tmp_path):
    """SD 1.5: a fp16 kohya file (lora_te_ keys, 1x1-conv proj_in) and a peft UNet folder; diffusers loads the merge."""
    sources = [loras["files"]["kohya_sd15"], loras["files"]["peft_unet"]]
    report = merge_to_folder([str(s) for s in sources], MergeOptions.create(method="tsv"), tmp_path / "out")
    assert report["sources"][0]["format"] == "kohya" and report["output_format"] == "diffusers"
    expected = expected_updates(sources, MergeOptions.create(method="tsv"))
    loaded = loaded_deltas(tiny_sd15(tokenizer), tmp_path / "out", "merged")
    assert sorted(loaded) == sorted(expected)
    for name, update in expected.items():
        torch.testing.assert_close(loaded[name], update.dense(), rtol=1e-3, atol=1e-4)  # written in fp16


def test_merged_folder_is_a_source_and_one_lora_alone_round_trips(loras, tmp_path):
    """The output folder (pytorch_lora_weights.safetensors, scaling-1 metadata) loads as a source: merged alone
    with ta it comes back as itself."""
    merge_to_folder([str(loras["files"]["kohya_sdxl"])], MergeOptions.create(method="ta"), tmp_path / "once")
    merge_to_folder([str(tmp_path / "once")], MergeOptions.create(method="ta"), tmp_path / "twice")
    original = canonical_updates(loras["files"]["kohya_sdxl"])
    again = canonical_updates(tmp_path / "twice")
    assert sorted(original) == sorted(again)
    for name in original:
        torch.testing.assert_close(again[name], original[name], rtol=1e-5, atol=1e-7)
    with safe_open(tmp_path / "twice" / "pytorch_lora_weights.safetensors", "pt") as handle:
        packed = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert packed["unet.r"] == packed["unet.lora_alpha"] and packed["unet.use_dora"] is False


def test_a_text_encoder_adapted_only_in_its_mlp_loads(loras, tokenizer, tmp_path):
    """Regression: diffusers 0.42 cannot read peft-style text-encoder keys without q/k/v/out_proj among them
    ("Could not automatically infer state dict type"); the file's lora_linear_layer keys load."""
    pipe = tiny_sdxl(tokenizer)
    state = add_lora(pipe, {"unet": lora(["to_q"], r=2, alpha=2), "text_encoder": lora(["fc1"], r=2, alpha=2)}, seed=6)
    write_kohya(tmp_path / "mlp.safetensors", state, alpha=2, sgm=True)
    merge_to_folder([str(tmp_path / "mlp.safetensors")], MergeOptions.create(method="ta"), tmp_path / "out")
    loaded = loaded_deltas(tiny_sdxl(tokenizer), tmp_path / "out", "mlp")
    original = lora_deltas(pipe)
    assert sorted(loaded) == sorted(original) and "text_encoder.encoder.layers.0.mlp.fc1" in loaded
    for name, delta in original.items():
        torch.testing.assert_close(loaded[name], delta, rtol=1e-5, atol=1e-6)


# --- refusals: one line naming the file and the reason, exit code 2, nothing written ---

def expect_error(capsys, tmp_path, sources, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["merge", *map(str, sources), "--output", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert message in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    return lines[0]


KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("kind, tensors, message", [
    ("LoHa", {f"{KOHYA_Q}.hada_w1_a": (8, 2), f"{KOHYA_Q}.hada_w1_b": (2, 8), f"{KOHYA_Q}.hada_w2_a": (8, 2),
              f"{KOHYA_Q}.hada_w2_b": (2, 8), f"{KOHYA_Q}.alpha": ()},
     f"LoHa adapter (tensor {KOHYA_Q}.hada_w"),
    ("LoKr", {f"{KOHYA_Q}.lokr_w1": (2, 2), f"{KOHYA_Q}.lokr_w2_a": (4, 2), f"{KOHYA_Q}.lokr_w2_b": (2, 4),
              f"{KOHYA_Q}.alpha": ()},
     f"LoKr adapter (tensor {KOHYA_Q}.lokr_w"),
    ("DoRA", {f"{KOHYA_Q}.lora_down.weight": (2, 8), f"{KOHYA_Q}.lora_up.weight": (8, 2), f"{KOHYA_Q}.alpha": (),
              f"{KOHYA_Q}.dora_scale": (1, 8)},
     f"DoRA (dora_scale) adapter (tensor {KOHYA_Q}.dora_scale); its update is not a plain low-rank product, "
     "so coremerge refuses to merge it"),
    ("IA3", {f"{KOHYA_Q}.weight": (8,), f"{KOHYA_Q}.on_input": ()},  # LyCORIS (IA)^3
     f"IA3 (LyCORIS) adapter (tensor {KOHYA_Q}.on_input)"),
    ("Flux", {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (2, 8),
              "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (8, 2)},
     "is a LoRA for Flux.1 but "),  # loads (tests/test_flux.py), but never merges with an SDXL LoRA
])
def test_non_lora_and_unsupported_files_are_refused(kind, tensors, message, loras, capsys, tmp_path):
    path = tmp_path / f"{kind.lower()}.safetensors"
    save_file({key: torch.ones(shape) for key, shape in tensors.items()}, str(path))
    line = expect_error(capsys, tmp_path, [loras["files"]["kohya_sdxl"], path], message)
    assert line.startswith(f"coremerge: error: {path}")


def real_width_kohya(path, sdxl: bool):
    """One cross-attention key projection with the real widths: SD 1.5 reads 768-wide text, SDXL 2048."""
    name, n, m = (("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640) if sdxl
                  else ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320))
    save_file({f"{name}.lora_down.weight": torch.randn(4, n), f"{name}.lora_up.weight": torch.randn(m, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return path


def test_an_sdxl_lora_is_told_by_its_deep_transformer_blocks(tmp_path):
    """No text encoder, no cross-attention module, no metadata: SD 1.x / 2.x blocks have one transformer layer."""
    name = "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(4, 1280), f"{name}.lora_up.weight": torch.randn(1280, 4)},
              str(tmp_path / "deep.safetensors"))
    adapter = load_adapter(str(tmp_path / "deep.safetensors"))
    assert list(adapter.modules) == ["unet.down_blocks.2.attentions.0.transformer_blocks.3.attn1.to_q"]
    assert adapter.family == SDXL


def test_sd15_and_sdxl_loras_are_not_merged(capsys, tmp_path):
    sd15 = real_width_kohya(tmp_path / "sd15.safetensors", sdxl=False)
    sdxl = real_width_kohya(tmp_path / "sdxl.safetensors", sdxl=True)
    assert load_adapter(str(sd15)).family == SD1 and load_adapter(str(sdxl)).family == SDXL
    line = expect_error(capsys, tmp_path, [sd15, sdxl], "only LoRAs of the same base model can be merged")
    assert f"{sdxl} is a LoRA for SDXL but {sd15} is for SD 1.x" in line


def test_diffusion_and_language_model_adapters_are_not_merged(capsys, tmp_path, loras, adapters):
    line = expect_error(capsys, tmp_path, [adapters["plain"], loras["files"]["kohya_sdxl"]],
                        "only adapters of the same base model can be merged")
    assert f"{loras['files']['kohya_sdxl']} is a diffusion LoRA (SDXL) but {adapters['plain']} is not" in line


# --- comparison ---

def test_comparison_gives_one_image_per_prompt_and_variant_on_one_pipeline(loras, tokenizer, tmp_path):
    kohya, diffusers = str(loras["files"]["kohya_sdxl"]), str(loras["files"]["diffusers_sdxl"])
    merge_to_folder([kohya, diffusers], MergeOptions.create(method="tsv"), tmp_path / "merged")
    pipe = tiny_sdxl(tokenizer)
    settings = GenerationSettings(**{"num_inference_steps": 2, "guidance_scale": 5.0, "width": 32, "height": 32,
                                      "seed": 7})  # a preset's `generation` mapping
    base_alone = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                      generator=torch.Generator().manual_seed(7)).images[0]
    entries = [LoraEntry("Style A", kohya, "pixel art"), LoraEntry("Style B", diffusers, "watercolor")]
    grid = compare_images(pipe, entries, tmp_path / "merged", ["a photo of a cat", "a dog"], settings)
    assert grid.variants == ("base", "Style A", "Style B", "merged")
    assert grid.prompts == ("a photo of a cat", "a dog")
    assert [len(row) for row in grid.images] == [4, 4]
    assert {image.size for row in grid.images for image in row} == {(32, 32)}
    assert grid.prompts_used[0] == ("a photo of a cat", "pixel art, a photo of a cat", "watercolor, a photo of a cat",
                                    "pixel art, watercolor, a photo of a cat")
    pixels = [[np.asarray(image) for image in row] for row in grid.images]
    assert np.array_equal(pixels[0][0], np.asarray(base_alone))  # base: LoRAs off, the row's seed
    assert all(not np.array_equal(pixels[0][0], pixels[0][v]) for v in (1, 2, 3))
    assert not any(pipe.get_list_adapters().values())  # the pipeline is left as it was
    again = pickle.loads(pickle.dumps(grid))  # ZeroGPU sends results between processes
    assert np.array_equal(np.asarray(again.images[1][3]), pixels[1][3])


def test_family_is_checked_against_every_earlier_lora(capsys, tmp_path, loras):
    """An SD 1.x and an SDXL LoRA with a version-less one first: still refused."""
    sd15 = real_width_kohya(tmp_path / "sd15.safetensors", sdxl=False)
    sdxl = real_width_kohya(tmp_path / "sdxl.safetensors", sdxl=True)
    expect_error(capsys, tmp_path, [loras["files"]["peft_unet"], sd15, sdxl],
                 f"{sdxl} is a LoRA for SDXL but {sd15} is for SD 1.x")


def test_hub_repos_of_diffusion_loras_resolve(loras, tmp_path, monkeypatch):
    """A diffusers repo (pytorch_lora_weights.safetensors, no adapter_config.json) by its ID, a kohya file by path."""
    from huggingface_hub import constants
    from test_hub import COMMIT, add_to_cache

    add_to_cache(tmp_path, "org/watercolor-xl", {"pytorch_lora_weights.safetensors": loras["files"]["diffusers_sdxl"]})
    add_to_cache(tmp_path, "org/pixel-xl", {"pixel-xl.safetensors": loras["files"]["kohya_sdxl"]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    diffusers_lora = load_adapter("org/watercolor-xl")
    kohya_lora = load_adapter("org/pixel-xl/pixel-xl.safetensors")
    assert (diffusers_lora.format, diffusers_lora.origin, diffusers_lora.revision) == ("diffusers", "hub", COMMIT)
    assert (kohya_lora.format, kohya_lora.family) == ("kohya", SDXL)


@pytest.mark.parametrize("preset_name, kind", [("sdxl-styles", "kohya_sdxl"), ("sd15-styles", "kohya_sd15")])
def test_the_hub_presets_map_onto_the_loader_and_the_comparison(preset_name, kind, loras, tmp_path, monkeypatch):
    """With tiny stand-ins at the presets' Hub paths (offline cache), their sources load as one diffusion set,
    merge into a diffusers file, and their adapters and generation settings fit compare_images' arguments."""
    from huggingface_hub import constants
    from test_hub import add_to_cache

    from coremerge.presets import find_preset

    preset = find_preset(preset_name)
    for adapter in preset.adapters:
        repo, _, inner = adapter.source.partition("/")[2].partition("/")
        add_to_cache(tmp_path / "hub", f"{adapter.source.split('/')[0]}/{repo}", {inner: loras["files"][kind]})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert is_diffusion_set(load_adapters(preset.adapter_sources))
    report = merge_to_folder(preset.adapter_sources, MergeOptions.create(method="ta"), tmp_path / "out")
    assert report["file"] == "pytorch_lora_weights.safetensors"
    entries = [LoraEntry(a.name, a.source, a.trigger or "") for a in preset.adapters]
    settings = GenerationSettings(**preset.samples.generation)
    assert len(entries) == 3 and settings.num_inference_steps > 0
