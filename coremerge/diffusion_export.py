"""Write a merged Stable Diffusion LoRA as one diffusers-format file that `pipe.load_lora_weights` loads."""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .adapter import Adapter
from .diffusion_format import COMPONENTS, DIFFUSERS_METADATA_KEY, TEXT_ENCODERS, TEXT_MODEL
from .export import peft_config, stored_factors
from .merge import MergedModule
from .sources import DIFFUSERS_WEIGHT_NAME

CLIP_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")  # text_projection sits beside text_model


def diffusers_key(name: str) -> str:
    """A module's key prefix in the file: `unet.<module>` as is; CLIP's inner modules with `text_model.` put back,
    as every SD LoRA on the Hub has it (diffusers strips it again for transformers 5's flattened CLIPTextModel)."""
    component, _, local = name.partition(".")
    inner = component in TEXT_ENCODERS and local.startswith(CLIP_TEXT_MODEL_CHILDREN)
    return f"{component}.{TEXT_MODEL}{local}" if inner else name


def diffusers_tensors(module: MergedModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's factors under diffusers' peft-style keys (`unet.<module>.lora_A.weight`), conv kernels restored."""
    a, b = stored_factors(module, dtype)
    key = diffusers_key(module.name)
    return {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}


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
    """One input LoRA as coremerge reads it (scaling folded into lora_B, so s = 1), under diffusers' peft-style keys.

    `pipe.load_lora_weights(folded_state_dict(adapter), adapter_name=...)` then applies exactly the update that
    goes into the merge, whatever the file's format (and whatever quirks diffusers has in converting it).
    """
    tensors = {}
    with adapter.open() as reader:
        for name, spec in adapter.modules.items():
            factors = adapter.read_factors(reader, name)
            key = diffusers_key(name)
            tensors[f"{key}.lora_A.weight"] = factors.a.reshape(spec.rank, *spec.a_shape[1:]).to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = factors.b.reshape(spec.b_shape[0], spec.rank, *spec.b_shape[2:]).to(
                dtype).contiguous()
    return tensors
