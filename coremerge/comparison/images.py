"""Text-to-image comparison: base, each LoRA (with its trigger words) and the merged LoRA, on one loaded pipeline.

Every adapter is loaded once with `load_lora_weights(..., adapter_name=...)`: each LoRA as coremerge reads it
(the update that goes into the merge, in any input format), the merged LoRA from the file `coremerge merge`
wrote. Variants are switched with `set_adapters` / `disable_lora`, never by reloading the base model.
Arguments and results are plain dataclasses, strings and PIL images, so they pickle (ZeroGPU runs the GPU
function in another process).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL.Image import Image

from ..formats.diffusion_export import folded_state_dict
from ..formats.loading import load_adapter
from ..formats.sources import resolve_source

BASE = "base"
ADAPTER_PREFIX = "coremerge_"  # names of the adapters this module loads onto the pipeline (removed afterwards)


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of the comparison: its display name, where it is, and the words that trigger it."""

    name: str
    source: str  # a .safetensors file, a folder or a Hub ID, as `coremerge merge` takes them
    trigger_words: str = ""


@dataclass(frozen=True)
class GenerationSettings:
    """How every image is generated; the seed is the same for every variant of a prompt.

    Fields are named as the pipeline's arguments, so a preset's `generation` mapping fits:
    `GenerationSettings(**preset.samples.generation)`.
    """

    num_inference_steps: int = 25
    guidance_scale: float = 7.0
    width: int = 1024
    height: int = 1024
    seed: int = 0
    negative_prompt: str = ""


@dataclass(frozen=True)
class ImageGrid:
    """images[p][v] is prompt p under variant v (base, each LoRA, merged), made from prompts_used[p][v]."""

    prompts: tuple[str, ...]
    variants: tuple[str, ...]
    images: tuple[tuple[Image, ...], ...]
    prompts_used: tuple[tuple[str, ...], ...] = field(default=())


@dataclass(frozen=True)
class _Variant:
    name: str
    adapter: Optional[str]  # None: the base pipeline, LoRA disabled
    trigger_words: str


def with_trigger(trigger_words: str, prompt: str) -> str:
    """The prompt with the trigger words in front (the usual way LoRA cards ask for them)."""
    return f"{trigger_words.strip()}, {prompt}" if trigger_words.strip() else prompt


def compare_images(
    pipe,
    loras: Sequence[LoraEntry],
    merged: Optional[Union[str, Path]],
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    merged_name: str = "merged",
    merged_trigger_words: Optional[str] = None,
) -> ImageGrid:
    """Generate every prompt with the base pipeline, each LoRA and the merged LoRA.

    Args:
        pipe: a loaded diffusers text-to-image pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...).
        loras: the individual LoRAs; each one's trigger words are put in front of the prompt.
        merged: the merged LoRA (the file or folder `coremerge merge` wrote), or None to leave it out.
        prompts: one row of images per prompt.
        settings: steps, guidance, size, seed and negative prompt, the same for every image.
        merged_trigger_words: put in front of the prompt for the merged LoRA; default: every LoRA's trigger words.
    Returns:
        An ImageGrid with one row per prompt and one column per variant. The pipeline is left as it was:
        the adapters loaded here are deleted again.
    """
    if merged_trigger_words is None:
        merged_trigger_words = ", ".join(lora.trigger_words.strip() for lora in loras if lora.trigger_words.strip())
    variants = [_Variant(BASE, None, "")]
    loaded: list[str] = []
    try:
        for index, lora in enumerate(loras):
            loaded.append(_load(pipe, folded_state_dict(load_adapter(lora.source)), f"{ADAPTER_PREFIX}{index}"))
            variants.append(_Variant(lora.name, loaded[-1], lora.trigger_words))
        if merged is not None:
            loaded.append(_load(pipe, _weights_file(str(merged)), f"{ADAPTER_PREFIX}merged"))
            variants.append(_Variant(merged_name, loaded[-1], merged_trigger_words))
        cells: dict[tuple[int, int], tuple[Image, str]] = {}  # (prompt, variant) -> (image, prompt used)
        for v, variant in enumerate(variants):  # one adapter switch per variant
            _activate(pipe, variant)
            for p, prompt in enumerate(prompts):
                text = with_trigger(variant.trigger_words, prompt)
                cells[p, v] = _generate(pipe, text, settings), text
    finally:
        if loaded:
            pipe.delete_adapters(loaded)
    rows = [[cells[p, v] for v in range(len(variants))] for p in range(len(prompts))]
    return ImageGrid(
        prompts=tuple(prompts),
        variants=tuple(variant.name for variant in variants),
        images=tuple(tuple(image for image, _ in row) for row in rows),
        prompts_used=tuple(tuple(text for _, text in row) for row in rows),
    )


def _weights_file(source: str) -> Path:
    path = Path(source)
    return path if path.is_file() else resolve_source(source).weights_path


def _load(pipe, weights: Union[Path, dict], adapter_name: str) -> str:
    """Load a LoRA file or state dict onto the pipeline under `adapter_name` (replacing a leftover of that name)."""
    if any(adapter_name in names for names in pipe.get_list_adapters().values()):
        pipe.delete_adapters([adapter_name])
    if isinstance(weights, dict):
        pipe.load_lora_weights(weights, adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter_name)
    return adapter_name


def _activate(pipe, variant: _Variant) -> None:
    """The variant's LoRA alone at weight 1, or every LoRA off for the base."""
    if variant.adapter is None:
        if any(pipe.get_list_adapters().values()):
            pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([variant.adapter], adapter_weights=[1.0])


def _generate(pipe, text: str, settings: GenerationSettings) -> Image:
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)  # same noise on any device
    return pipe(
        prompt=text,
        negative_prompt=settings.negative_prompt or None,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        width=settings.width,
        height=settings.height,
        generator=generator,
    ).images[0]
