"""Tiny SD 1.5-like and SDXL-like pipelines built from configs, and LoRA files for them in the formats found
on the Hub (kohya / A1111, diffusers), written with the real key naming. Nothing is downloaded."""

import json
import re
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "house", "in", "style", "pixel", "art", "watercolor", "painting"]


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over a few words and the alphabet (no merges: unknown words fall apart into letters)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*"abcdefghijklmnopqrstuvwxyz", *(f"{c}</w>" for c in "abcdefghijklmnopqrstuvwxyz"),
                  *(f"{w}</w>" for w in WORDS)]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def clip_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  timestep_spacing="leading", steps_offset=1)


def tiny_sdxl(tokenizer: CLIPTokenizer) -> StableDiffusionXLPipeline:
    """SDXL's layout in small: two text encoders (32 + 32 = cross-attention 64), text_time conditioning,
    a DownBlock2D then a CrossAttnDownBlock2D with 2 transformer layers, layers_per_block 2 as in SDXL."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(32)), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15(tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """SD 1.5's layout in small: one text encoder, 1x1-conv proj_in / proj_out, attention in the first block."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config(32)), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def add_lora(pipe, configs: dict[str, LoraConfig], seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """peft LoRA layers (non-zero init) on the pipeline's components; returns each component's peft state dict.

    The pipeline's modules get LoRA layers named "default"; `lora_deltas` reads their updates.
    """
    torch.manual_seed(seed)
    state = {}
    for name, config in configs.items():
        model = components(pipe)[name]
        inject_adapter_in_model(config, model)
        state[name] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return state


def lora_deltas(pipe, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every LoRA layer's update as peft computes it, flattened to (m, n), under coremerge's module names."""
    deltas = {}
    for component, model in components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                delta = module.get_delta_weight(adapter_name).detach().to(torch.float64)
                deltas[f"{component}.{name.removeprefix('text_model.')}"] = delta.reshape(delta.shape[0], -1)
    return deltas


def unet_to_sgm(name: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module path in Stability's sgm naming, which kohya uses for SDXL
    (the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` and `_convert_unet_lora_key`)."""
    resnet_parts = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection"}

    def resnet(rest: str) -> str:
        return resnet_parts.get(rest, rest)

    if name in ("conv_in", "conv_out"):
        return {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}[name]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        sgm = 1 + block * (layers_per_block + 1) + index
        return f"input_blocks.{sgm}.{0 if kind == 'resnets' else 1}.{resnet(rest) if kind == 'resnets' else rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
        return f"input_blocks.{(int(m[1]) + 1) * (layers_per_block + 1)}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        sgm = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"middle_block.{sgm}.{resnet(m[3]) if m[1] == 'resnets' else m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        sgm = block * (layers_per_block + 1) + index
        return f"output_blocks.{sgm}.{0 if kind == 'resnets' else 1}.{resnet(rest) if kind == 'resnets' else rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):  # of a block with attentions
        return f"output_blocks.{int(m[1]) * (layers_per_block + 1) + layers_per_block}.2.conv"
    raise ValueError(f"no sgm name for {name} in this test helper")


def write_kohya(path: Path, state: dict[str, dict[str, torch.Tensor]], alpha: float, sgm: bool,
                dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """A kohya / A1111 file: `lora_unet_*` (sgm block names for SDXL), `lora_te_*` or `lora_te1_*` / `lora_te2_*`,
    `.lora_down.weight`, `.lora_up.weight`, `.alpha`. Key names by diffusers' own peft -> kohya converter."""
    prefixed = {}
    for component, tensors in state.items():
        for key, value in tensors.items():
            module, _, part = key.partition(".lora_")
            if component == "unet" and sgm:
                module = unet_to_sgm(module)
            if component.startswith("text_encoder") and not module.startswith("text_model."):
                module = f"text_model.{module}"  # kohya names CLIP modules as transformers 4 did
            prefixed[f"{component}.{module}.lora_{part}"] = value.to(dtype)
    kohya = convert_state_dict_to_kohya(prefixed)
    if "text_encoder_2" not in state:  # SD 1.x files say lora_te_, SDXL files lora_te1_ / lora_te2_
        kohya = {k.replace("lora_te1_", "lora_te_"): v for k, v in kohya.items()}
    kohya = {k: (torch.tensor(float(alpha), dtype=dtype) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    save_file(kohya, str(path), metadata=metadata)
    return path
