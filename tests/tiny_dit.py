"""Tiny Flux.1-like and SD3.5-like pipelines built from configs (as diffusers' own LoRA tests build them), and
Flux LoRA files in kohya's layout written from fused factors. Nothing is downloaded."""

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from tiny_diffusion import clip_config
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel


def tiny_t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=1))


def tiny_flux(tokenizer) -> FluxPipeline:
    """Flux.1's layout in small (diffusers' test config): one double block, one single block, 2 heads of 16."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=CLIPTextModel(clip_config(32)), tokenizer=tokenizer, text_encoder_2=tiny_t5(),
                        tokenizer_2=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd35(tokenizer) -> StableDiffusion3Pipeline:
    """SD3.5's layout in small: two joint blocks, the first with SD3.5's second attention (attn2), three text
    encoders (two CLIPs with projection, T5)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                        dual_attention_layers=(0,))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip_config(32)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(32)), tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(), tokenizer_3=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_components(pipe) -> dict[str, torch.nn.Module]:
    names = ("transformer", "text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def dit_deltas(pipe, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every LoRA layer's update as peft computes it, under coremerge's module names."""
    deltas = {}
    for component, model in dit_components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                delta = module.get_delta_weight(adapter_name).detach().to(torch.float64)
                deltas[f"{component}.{name.removeprefix('text_model.')}"] = delta
    return deltas


# kohya's names for Flux's fused and single modules -> diffusers' modules of the same block, in the row order
# of the fused output (sd-scripts' networks/lora_flux.py; diffusers splits them in this order too).
KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
KOHYA_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                "modulation_lin": ("norm.linear",)}


def fused_shapes(transformer, block: str, index: int, table: dict) -> dict[str, tuple[int, int, tuple]]:
    """kohya module -> (out, in, diffusers modules) for one block, from the transformer's own layers."""
    shapes = {}
    for kohya, parts in table.items():
        layers = [transformer.get_submodule(f"{block}.{index}.{part}") for part in parts]
        shapes[kohya] = (sum(layer.out_features for layer in layers), layers[0].in_features, parts)
    return shapes


def write_kohya_flux(path: Path, fused: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                     dtype: torch.dtype = torch.float32) -> Path:
    """A kohya file from {kohya module name: (down, up, alpha)}: `.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    tensors = {}
    for name, (down, up, alpha) in fused.items():
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    metadata = {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"}
    save_file(tensors, str(path), metadata=metadata)
    return path


def split_updates(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float, parts: tuple[str, ...],
                  widths: list[int], prefix: str) -> dict[str, torch.Tensor]:
    """The fused update (alpha / r) up @ down, cut by rows into the diffusers modules it feeds: the reference
    a split must reproduce, computed without coremerge or diffusers."""
    fused = (alpha / down.shape[0]) * up.to(torch.float64) @ down.to(torch.float64)
    out, start = {}, 0
    for part, width in zip(parts, widths):
        out[f"{prefix}.{part}"] = fused[start:start + width]
        start += width
    return out
