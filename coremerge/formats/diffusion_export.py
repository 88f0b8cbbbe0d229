"""Write a merged Stable Diffusion LoRA as one diffusers-format file that `pipe.load_lora_weights` loads."""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .adapter import Adapter, MergedModule
from .diffusion_format import COMPONENTS, DIFFUSERS_METADATA_KEY, TEXT_ENCODERS, TEXT_MODEL
from .peft_export import peft_config, stored_factors
from .sources import DIFFUSERS_WEIGHT_NAME

CLIP_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")


def diffusers_keys(name: str) -> tuple[str, str]:
    """The (A, B) keys of a module in the file.

    UNet: peft-style, `unet.<module>.lora_A.weight` / `.lora_B.weight`. Text encoders: diffusers'
    `lora_linear_layer.down` / `.up` names, under `text_model.` as every SD LoRA on the Hub has it (diffusers
    strips it again for transformers 5's flattened CLIPTextModel). diffusers 0.42 guesses a text encoder's key
    style from q/k/v/out_proj keys, so peft-style keys of a text encoder adapted only in its MLP fail to load
    ("Could not automatically infer state dict type"); `lora_linear_layer` keys load with or without them.
    """
    component, _, local = name.partition(".")
    if component not in TEXT_ENCODERS:
        return f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    inner = local.startswith(CLIP_TEXT_MODEL_CHILDREN)  # text_projection sits beside text_model
    key = f"{component}.{TEXT_MODEL}{local}" if inner else name
    return f"{key}.lora_linear_layer.down.weight", f"{key}.lora_linear_layer.up.weight"


def diffusers_tensors(module: MergedModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's factors under their diffusers keys (`diffusers_keys`), conv kernels restored."""
    a, b = stored_factors(module, dtype)
    a_key, b_key = diffusers_keys(module.name)
    return {a_key: a, b_key: b}


def diffusers_metadata(ranks: dict[str, int], like: Adapter) -> dict[str, str]:
    """The safetensors header: per component a scaling-1 LoraConfig (`unet.r`, `unet.lora_alpha`,
    `unet.rank_pattern`, ...), as diffusers' `save_lora_weights` packs it, so that diffusers need not guess."""
    packed: dict[str, object] = {}
    for component in COMPONENTS:
        local = {name.partition(".")[2]: k for name, k in ranks.items() if name.partition(".")[0] == component}
        if local:
            config = peft_config(local, None, like)
            packed.update({f"{component}.{field}": value for field, value in config.items()})
    return {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def write_diffusers_file(folder: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], like: Adapter,
                         name: Optional[str] = None) -> Path:
    """`pytorch_lora_weights.safetensors` (or `name`) in `folder`; returns its path."""
    path = folder / (name or DIFFUSERS_WEIGHT_NAME)
    save_file(tensors, str(path), metadata=diffusers_metadata(ranks, like))
    return path


def folded_state_dict(adapter: Adapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One input LoRA as coremerge reads it (scaling folded into lora_B, so s = 1), under the merged file's keys.

    `pipe.load_lora_weights(folded_state_dict(adapter), adapter_name=...)` then applies exactly the update that
    goes into the merge, whatever the file's format (and whatever quirks diffusers has in converting it).
    """
    tensors = {}
    with adapter.open() as reader:
        for name, spec in adapter.modules.items():
            factors = adapter.read_factors(reader, name)
            a_key, b_key = diffusers_keys(name)
            tensors[a_key] = factors.a.reshape(spec.rank, *spec.a_shape[1:]).to(dtype).contiguous()
            tensors[b_key] = factors.b.reshape(spec.b_shape[0], spec.rank, *spec.b_shape[2:]).to(dtype).contiguous()
    return tensors
