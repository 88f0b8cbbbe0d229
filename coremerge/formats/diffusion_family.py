"""Which diffusion model a LoRA was made for (SD 1.x / 2.x / SDXL, Flux.1, SD3), from its modules' shapes and
file metadata, and which families may be merged together."""

import re
from typing import Mapping, Optional, Sequence

from .adapter import Adapter, ModuleSpec

SD1, SD2, SDXL = "SD 1.x", "SD 2.x", "SDXL"
UNKNOWN = "Stable Diffusion"  # a UNet / CLIP LoRA whose version its tensors do not tell (e.g. tiny test models)
FLUX, SD3 = "Flux.1", "SD3"
UNKNOWN_DIT = "a diffusion transformer"  # a transformer LoRA whose family its tensors do not tell
# Families by denoiser: a LoRA of unknown version merges with any family of its group, never across groups.
GROUPS = {SD1: UNKNOWN, SD2: UNKNOWN, SDXL: UNKNOWN, UNKNOWN: UNKNOWN, FLUX: UNKNOWN_DIT, SD3: UNKNOWN_DIT,
          UNKNOWN_DIT: UNKNOWN_DIT}
# Width of the text embeddings the UNet's cross-attention reads (attn2.to_k / to_v input features).
CROSS_ATTENTION_DIMS = {768: SD1, 1024: SD2, 2048: SDXL}
# kohya's `ss_base_model_version` metadata, by prefix.
KOHYA_VERSIONS = {"sdxl": SDXL, "sd_v1": SD1, "sd_v2": SD2}
SDXL_ONLY_PREFIXES = ("text_encoder_2.", "unet.add_embedding.")  # the second text encoder, the size/crop MLP
DEEP_TRANSFORMER = re.compile(r"^unet\..*\.transformer_blocks\.[1-9]")  # SD 1.x / 2.x blocks have depth 1


def detect_family(modules: Mapping[str, ModuleSpec], file_metadata: Mapping[str, str]) -> str:
    """SD1, SD2 or SDXL when any evidence tells, else UNKNOWN.

    Evidence, strongest first: kohya's `ss_base_model_version`; modules only SDXL has (the second text
    encoder, the size/crop MLP, transformer blocks deeper than one); the input width of the UNet's
    cross-attention keys and values (768 / 1024 / 2048).
    """
    version = str(file_metadata.get("ss_base_model_version", ""))
    for prefix, family in KOHYA_VERSIONS.items():
        if version.startswith(prefix):
            return family
    if any(name.startswith(SDXL_ONLY_PREFIXES) or DEEP_TRANSFORMER.match(name) for name in modules):
        return SDXL
    for name, spec in modules.items():
        if name.startswith("unet.") and name.endswith(("attn2.to_k", "attn2.to_v")):
            family = CROSS_ATTENTION_DIMS.get(spec.shape[1])
            if family is not None:
                return family
    return UNKNOWN


def same_family(first: str, second: str) -> bool:
    """Whether two detected families can be merged: the same family, or one of unknown version in the same
    group (UNet or transformer; the module-shape check decides then)."""
    if GROUPS.get(first) != GROUPS.get(second):
        return False
    return first == second or GROUPS.get(first) in (first, second)


def is_diffusion_set(adapters: Sequence[Adapter]) -> bool:
    """Whether loaded adapters are diffusion LoRAs (then they export as one diffusers file)."""
    return bool(adapters) and all(adapter.family is not None for adapter in adapters)


def shared_family(adapters: Sequence[Adapter]) -> Optional[str]:
    """The family the adapters agree on: a known one if any adapter tells it, else the unknown of their group
    (None: not diffusion)."""
    families = {adapter.family for adapter in adapters}
    if None in families:
        return None
    known = families - {UNKNOWN, UNKNOWN_DIT}
    return known.pop() if len(known) == 1 else families.pop()
