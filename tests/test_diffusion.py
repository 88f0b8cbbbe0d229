"""Stable Diffusion LoRAs: kohya / diffusers / peft files of tiny SD 1.5-like and SDXL-like pipelines load to the
updates peft computes, merge with every method into one file that `load_lora_weights` loads with exactly the
merged update, refuse what is not a plain LoRA, and compare base / each LoRA / merged images on one pipeline."""

import json
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS, convert_state_dict

from coremerge import METHODS, MergeOptions, load_adapter, load_adapters, merge_module, merge_to_folder
from coremerge.cli import main
from coremerge.diffusion_compare import GenerationSettings, LoraEntry, compare_images
from coremerge.diffusion_family import SD1, SDXL, UNKNOWN, is_diffusion_set
from coremerge.merge import module_generator, module_names

from tiny_diffusion import add_lora, lora_deltas, tiny_sd15, tiny_sdxl, tiny_tokenizer, write_kohya

UNET_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "time_emb_proj"]
UNET_CONV = ["conv1", "conv_shortcut"]  # LoCon: 3x3 and 1x1 kernels


def lora(targets, r=4, alpha=8, **kwargs) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kwargs)


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
    state = add_lora(pipe, {"unet": lora(UNET_LINEAR + UNET_CONV + ["proj_in"]),
                            "text_encoder": lora(["q_proj", "v_proj", "out_proj"]),
                            "text_encoder_2": lora(["q_proj", "k_proj", "fc1"])}, seed=1)
    made["kohya_sdxl"] = write_kohya(root / "style_a.safetensors", state, alpha=8, sgm=True,
                                     metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    deltas["kohya_sdxl"] = lora_deltas(pipe)

    # diffusers SDXL, saved by diffusers itself with its LoraConfig metadata: r 3, alpha 6, a rank pattern
    pipe = tiny_sdxl(tokenizer)
    unet_config = lora(["to_k", "to_v", "to_out.0", "proj_out", "conv2"], r=3, alpha=6,
                       rank_pattern={"^up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": 2})
    te_config = lora(["q_proj", "k_proj", "out_proj"], r=2, alpha=1)
    state = add_lora(pipe, {"unet": unet_config, "text_encoder": te_config}, seed=2)
    pipe.save_lora_weights(root / "style_b", unet_lora_layers=state["unet"], text_encoder_lora_layers=state["text_encoder"],
                           unet_lora_adapter_metadata=unet_config.to_dict(),
                           text_encoder_lora_adapter_metadata=te_config.to_dict())
    made["diffusers_sdxl"] = root / "style_b" / "pytorch_lora_weights.safetensors"
    deltas["diffusers_sdxl"] = lora_deltas(pipe)

    # kohya SD 1.5: diffusers block names, lora_te_, alpha 2 at rank 4 (scale 0.5), 1x1-conv proj_in, fp16
    pipe = tiny_sd15(tokenizer)
    state = add_lora(pipe, {"unet": lora(["to_q", "to_v", "proj_in", "conv1"], alpha=2),
                            "text_encoder": lora(["q_proj", "out_proj"], alpha=2)}, seed=3)
    made["kohya_sd15"] = write_kohya(root / "sd15.safetensors", state, alpha=2, sgm=False, dtype=torch.float16)
    deltas["kohya_sd15"] = {name: _fp16_delta(pipe, name) for name in lora_deltas(pipe)}

    # a peft folder saved from a diffusers UNet (get_peft_model + save_pretrained)
    pipe = tiny_sd15(tokenizer)
    torch.manual_seed(4)
    peft_unet = get_peft_model(pipe.unet, lora(["to_k", "conv2"], r=2, alpha=4))
    peft_unet.save_pretrained(str(root / "peft_unet"))
    made["peft_unet"] = root / "peft_unet"
    deltas["peft_unet"] = lora_deltas(pipe)

    # diffusers' old naming (attn processors: to_q_lora.down, lora_linear_layer), alpha == r: scale 1
    pipe = tiny_sdxl(tokenizer)
    state = add_lora(pipe, {"unet": lora(["to_q", "to_out.0"], r=2, alpha=2),
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
    tensors = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.text_model.{k}": v for k, v in te.items()}}
    assert any("to_q_lora.down" in k for k in tensors) and any("lora_linear_layer" in k for k in tensors)
    save_file(tensors, str(path))
    return path


def canonical_updates(source) -> dict[str, torch.Tensor]:
    adapter = load_adapter(str(source))
    with adapter.open() as reader:
        return {name: (lambda t: t.b @ t.a)(adapter.read_factors(reader, name)) for name in adapter.modules}


@pytest.mark.parametrize("kind, fmt, family", [
    ("kohya_sdxl", "kohya", SDXL),
    ("diffusers_sdxl", "diffusers", UNKNOWN),  # unet + text_encoder only, tiny widths: nothing tells the version
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
    assert adapter.modules["unet.up_blocks.0.resnets.0.conv_shortcut"].a_shape == (4, 128, 1, 1)
    assert "text_encoder_2.encoder.layers.1.mlp.fc1" in adapter.modules
    components = {name.split(".")[0] for name in adapter.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
