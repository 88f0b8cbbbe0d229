"""Flux.1 LoRAs: which files are Flux LoRAs, in which layout, how diffusers' FluxPipeline converts them, and
what coremerge refuses (control LoRAs that widen `x_embedder`).

Layouts, as `FluxLoraLoaderMixin.lora_state_dict` tells them apart: kohya sd-scripts (`lora_unet_double_blocks_*`,
`lora_unet_single_blocks_*`, CLIP-L as `lora_te1_*`), ComfyUI (the same under `diffusion_model.`), kohya's
diffusers-named variant (`lora_transformer_*`), XLabs (`double_blocks.N.processor.qkv_lora1.down.weight`),
fal Kontext (`base_model.model.double_blocks.*`) and diffusers / peft (`transformer.*`).
"""

from typing import Mapping

from ..errors import AdapterFormatError
from .adapter import ModuleSpec

INNER_WIDTH = 3072  # FLUX.1-dev / -schnell: 24 heads x 128
LATENT_WIDTH = 64  # x_embedder's input: 16 latent channels x 2 x 2 patch
MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks", "lora_transformer_", "guidance_embedder",
           "lora_unet_img_in", "lora_unet_txt_in", "lora_unet_final_layer")
CONTROL_MARKERS = ("query_norm.scale", "key_norm.scale")  # BFL's Flux Control LoRAs also train the norms


def claims(keys: list[str]) -> bool:
    """Whether the keys name Flux-only modules (any layout)."""
    return any(marker in key for key in keys for marker in MARKERS)


def layout(keys: list[str]) -> str:
    """The file's layout, tested in the order diffusers tests them."""
    if any(".lora_down.weight" in key for key in keys):
        if any(key.startswith("diffusion_model.") for key in keys):
            return "comfyui"
        return "kohya"
    if any("processor" in key for key in keys):
        return "xlabs"
    if any("base_model" in key for key in keys):
        return "fal-kontext"
    return "diffusers"


def refuse_control(source: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Flux Control LoRAs (Canny, Depth) widen x_embedder to read the control image and retrain norms.

    Raises:
        AdapterFormatError: naming the tensor that shows it.
    """
    key = next((k for k in shapes for marker in CONTROL_MARKERS if marker in k), None)
    if key is not None:
        raise AdapterFormatError(
            f"{source}: Flux control LoRA (tensor {key}); it changes the shape of x_embedder and trains norm "
            "layers, so it is not a plain LoRA of Flux.1 and coremerge refuses to merge it"
        )


def refuse_widened(source: str, modules: Mapping[str, ModuleSpec]) -> None:
    """A LoRA whose x_embedder reads more than Flux.1's 64 latent channels is for a widened (control) model.

    Raises:
        AdapterFormatError: naming the module and both widths.
    """
    spec = modules.get("transformer.x_embedder")
    if spec is not None and spec.shape[1] > LATENT_WIDTH:
        raise AdapterFormatError(
            f"{source}: its x_embedder LoRA reads {spec.shape[1]} input channels but Flux.1 has {LATENT_WIDTH}: "
            "a control LoRA that widens the layer, which coremerge refuses to merge"
        )


def convert(state_dict: dict) -> dict:
    """diffusers' own conversion of any Flux layout to `transformer.*` / `text_encoder.*` keys.

    `FluxLoraLoaderMixin.lora_state_dict` picks one of diffusers' converters by `layout` (control LoRAs are refused
    before); the converter is called here directly, because the loader's module imports transformers and peft,
    two seconds that renaming keys does not need. A diffusers-layout file keeps its keys; diffusers sets its
    alphas aside, as here.
    """
    from diffusers.loaders import lora_conversion_utils as diffusers_conversion  # importing diffusers takes seconds

    converters = {
        "kohya": diffusers_conversion._convert_kohya_flux_lora_to_diffusers,
        "comfyui": diffusers_conversion._convert_kohya_flux_lora_to_diffusers,
        "xlabs": diffusers_conversion._convert_xlabs_flux_lora_to_diffusers,
        "fal-kontext": diffusers_conversion._convert_fal_kontext_lora_to_diffusers,
    }
    converter = converters.get(layout(list(state_dict)))
    if converter is None:
        return {key: value for key, value in state_dict.items() if "alpha" not in key}
    return converter(state_dict)
