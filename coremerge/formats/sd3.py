"""Stable Diffusion 3 / 3.5 LoRAs: diffusers / peft files (`transformer.*`, CLIP-L `text_encoder.*`,
CLIP-G `text_encoder_2.*`), as `SD3LoraLoaderMixin.lora_state_dict` reads them (it converts no other layout).

SD3's joint blocks name their modules as Flux's double blocks do (`attn.add_q_proj`, `ff_context`, ...), so
modules alone often cannot tell the two apart: widths can (SD3 medium / SD3.5 medium 1536, SD3.5 large 2432,
Flux.1 3072), and so can SD3-only modules (the second CLIP, SD3.5's second attention `attn2`, `pos_embed`).
"""

from typing import Mapping

from ..errors import AdapterFormatError
from .adapter import ModuleSpec

INNER_WIDTHS = (1536, 2432)  # 24 heads x 64 (SD3 medium, SD3.5 medium), 38 x 64 (SD3.5 large)
MARKERS = ("text_encoder_2.", ".attn2.", "transformer.pos_embed")
UNCONVERTED = "joint_blocks"  # SD3 in sd-scripts' and ComfyUI's naming (lora_unet_joint_blocks_*, diffusion_model.*)


def claims_unconverted(keys: list[str]) -> bool:
    return any(UNCONVERTED in key for key in keys)


def refuse_unconverted(source: str, keys: list[str]) -> None:
    """SD3 LoRAs in kohya / ComfyUI naming: diffusers' SD3 loader converts no such layout.

    Raises:
        AdapterFormatError: naming the tensor that shows it.
    """
    key = next((k for k in keys if UNCONVERTED in k), None)
    if key is not None:
        raise AdapterFormatError(
            f"{source}: SD3 LoRA in kohya / ComfyUI naming (tensor {key}); diffusers' SD3 loader reads only "
            "diffusers-format files, so coremerge cannot map it"
        )


def claims(modules: Mapping[str, ModuleSpec]) -> bool:
    """Whether modules only SD3 has are adapted."""
    return any(marker in name for name in modules for marker in MARKERS)


def convert(state_dict: dict) -> dict:
    """diffusers' reading of an SD3 LoRA: `SD3LoraLoaderMixin.lora_state_dict` keeps the keys as they are (it only
    drops DoRA scales, which coremerge refuses before), so nothing is renamed and diffusers is not imported."""
    return dict(state_dict)
