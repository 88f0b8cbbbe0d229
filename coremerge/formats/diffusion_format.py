"""Read Stable Diffusion LoRAs (kohya / A1111 files, diffusers files, peft UNet folders) into the canonical form.

Keys are renamed with diffusers' own conversion helpers, the ones `pipe.load_lora_weights` runs, so every
module is named as in a diffusers pipeline with its component in front:
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, `text_encoder.encoder.layers.0.self_attn.q_proj`,
`text_encoder_2.encoder.layers.0.mlp.fc1` (CLIP modules without transformers 4's `text_model.`).
Only names, shapes and alphas are read here; the factors stay in the file until a module is merged.
"""

import json
import re
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Optional

from safetensors import safe_open

from ..errors import AdapterFormatError
from . import key_map_cache
from .adapter import Adapter, ModuleSpec, load_pickled_state_dict
from .diffusion_family import detect_family
from .peft_format import PEFT_PREFIX, load_peft_adapter, module_spec, refuse_non_lora, tensor_index
from .sources import ResolvedSource
from .validation import check_factor_shapes, check_lora_config, kohya_alpha

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
UNET_TOP_LEVEL = {"conv_in", "conv_out", "time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks"}
SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# kohya names SDXL's UNet blocks as Stability's sgm code does; their numbering depends on layers_per_block,
# which is 2 in SD 1.x, SD 2.x and SDXL alike.
SGM_UNET_CONFIG = SimpleNamespace(layers_per_block=2)
TEXT_MODEL = "text_model."  # CLIP's inner module, flattened away in transformers 5
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' per-component LoraConfig in the safetensors header
PEFT_KEY = re.compile(
    r"^(?P<component>unet|transformer|text_encoder|text_encoder_2)\.(?P<local>.+)\.(?P<part>lora_A|lora_B)\.weight$"
)


@dataclass(frozen=True)
class FileKey:
    """Stands in for a tensor while diffusers renames the keys: the file's key (and an alpha's value)."""

    key: str
    value: float = 0.0

    def item(self) -> float:  # diffusers reads alphas with `.item()`
        return self.value


def is_diffusion_lora(resolved: ResolvedSource) -> bool:
    """Whether the file is a Stable Diffusion LoRA (kohya or diffusers keys, or a peft folder of a UNet)."""
    keys = list(tensor_index(resolved)[0])
    if not keys:
        return False
    if all(key.startswith(KOHYA_PREFIXES) for key in keys):
        return True
    if all(key.split(".")[0] in COMPONENTS for key in keys):
        return True
    return resolved.config_path is not None and _is_unet_peft(keys)


def _is_unet_peft(keys: list[str]) -> bool:
    return all(key.removeprefix(PEFT_PREFIX).split(".")[0] in UNET_TOP_LEVEL for key in keys)


def load_diffusion_adapter(resolved: ResolvedSource) -> Adapter:
    """Read a diffusion LoRA's tensor index, rename its modules as diffusers does, fold in alpha / r.

    Raises:
        AdapterFormatError: a LoHa / LoKr / DoRA / IA3 file, keys diffusers cannot map, or inconsistent shapes.
    """
    source = resolved.source
    shapes, dtype = tensor_index(resolved)
    refuse_non_lora(source, shapes)
    file_metadata = _file_metadata(resolved)
    if resolved.config_path is not None and _is_unet_peft(list(shapes)):
        adapter = load_peft_adapter(resolved)
        modules = {f"unet.{name}": replace(spec, name=f"unet.{name}") for name, spec in adapter.modules.items()}
        return replace(adapter, modules=modules, family=detect_family(modules, file_metadata))

    kohya = all(key.startswith(KOHYA_PREFIXES) for key in shapes)
    alphas = _read_alphas(resolved, [key for key in shapes if key.endswith(".alpha")]) if kohya else {}
    stand_ins = {key: FileKey(key, alphas.get(key, 0.0)) for key in shapes}
    renamed = key_map_cache.remembered(
        "sd-kohya" if kohya else "sd-diffusers", {"shapes": shapes, "alphas": alphas},
        lambda: _kohya_to_peft_names(source, stand_ins) if kohya else _diffusers_to_peft_names(stand_ins),
        pack=lambda stand_in: stand_in.key, unpack=lambda key: stand_ins[key])
    configs = _component_configs(source, file_metadata)
    modules, ignored = {}, []
    for (component, local), parts in sorted(_group(renamed, ignored).items()):
        name = f"{component}.{local.removeprefix(TEXT_MODEL)}"
        if component == "unet" and local.split(".")[0] not in UNET_TOP_LEVEL:
            raise AdapterFormatError(
                f"{source}: diffusers maps {parts['lora_A']} to {name}, which is not a layer of a Stable Diffusion "
                "UNet; coremerge cannot map this file"
            )
        if component in configs:  # diffusers' own LoraConfig: r, lora_alpha, patterns, rsLoRA
            spec = module_spec(source, configs[component], local, parts, shapes, DIFFUSERS_METADATA_KEY)
        else:  # kohya: s = alpha / r; diffusers files without metadata: s = 1, as diffusers loads them
            alpha = alphas.get(parts["lora_A"].split(".")[0] + ".alpha") if kohya else None
            spec = _plain_spec(source, local, parts, shapes, alpha)
        modules[name] = replace(spec, name=name)
    if not modules:
        raise AdapterFormatError(f"{source}: {resolved.weights_path.name} holds no LoRA tensors")
    return Adapter(
        source=source,
        weights_path=resolved.weights_path,
        format="kohya" if kohya else ("diffusers" if any("lora_A" in key for key in shapes) else "diffusers-old"),
        base_model=None,  # kohya names a checkpoint file, not a model id; the family check stands in
        modules=modules,
        dtype=dtype,
        nbytes=resolved.weights_path.stat().st_size,
        revision=resolved.revision,
        origin=resolved.origin,
        ignored_keys=tuple(ignored),
        family=detect_family(modules, file_metadata),
    )


def _kohya_to_peft_names(source: str, stand_ins: dict[str, FileKey]) -> dict[str, FileKey]:
    """kohya keys -> diffusers' peft-style keys, by diffusers' own converter (sgm block names included)."""
    # imported here: importing diffusers takes seconds, and peft adapters never need it
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    stand_ins = dict(stand_ins)  # diffusers pops what it converts
    try:
        if any(block in key for key in stand_ins for block in SGM_BLOCKS):
            stand_ins = _maybe_map_sgm_blocks_to_diffusers(stand_ins, SGM_UNET_CONFIG)
        converted, _ = _convert_non_diffusers_lora_to_diffusers(stand_ins)
    except (ValueError, KeyError, IndexError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterFormatError(f"{source}: kohya LoRA keys that diffusers cannot map ({first_line})") from error
    return _diffusers_to_peft_names(converted)


def _diffusers_to_peft_names(state_dict: dict[str, FileKey]) -> dict[str, FileKey]:
    """Old and new diffusers key names -> peft-style keys, per component, as diffusers' loaders convert them."""
    from diffusers.utils.state_dict_utils import (DIFFUSERS_OLD_TO_PEFT, DIFFUSERS_TO_PEFT, convert_state_dict,
                                                  convert_unet_state_dict_to_peft)

    out: dict[str, FileKey] = {}
    for component in COMPONENTS:
        prefix = f"{component}."
        part = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        if component in TEXT_ENCODERS:  # both old conventions (to_q_lora, lora_linear_layer), then the rest
            part = convert_state_dict(convert_state_dict(part, DIFFUSERS_OLD_TO_PEFT), DIFFUSERS_TO_PEFT)
        elif component == "unet":
            part = convert_unet_state_dict_to_peft(part)
        out.update({f"{prefix}{key}": value for key, value in part.items()})
    return out


def _group(renamed: dict[str, FileKey], ignored: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    """{(component, local module name): {"lora_A": file key, "lora_B": file key}}; other keys go to `ignored`."""
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    for key, stand_in in renamed.items():
        match = PEFT_KEY.match(key)
        if match is None:
            ignored.append(stand_in.key)
            continue
        grouped.setdefault((match["component"], match["local"]), {})[match["part"]] = stand_in.key
    return grouped


def _plain_spec(source: str, local: str, parts: dict[str, str], shapes: dict, alpha: Optional[float]) -> ModuleSpec:
    for part in ("lora_A", "lora_B"):
        if part not in parts:
            raise AdapterFormatError(f"{source}: module {local} has no {part} (lora_down / lora_up) tensor")
    a_shape, b_shape = shapes[parts["lora_A"]], shapes[parts["lora_B"]]
    check_factor_shapes(source, local, parts["lora_A"], a_shape, parts["lora_B"], b_shape)
    rank = a_shape[0]
    # A missing or zero alpha means alpha = r, as kohya's own network code reads it (sd-scripts networks/lora.py,
    # LoRAModule: `alpha = self.lora_dim if alpha is None or alpha == 0 else alpha`). diffusers' converters agree
    # on a missing alpha (`_convert_kohya_flux_lora_to_diffusers` defaults it to the rank) but would apply an
    # alpha of 0 literally, a zero update; the format's authors wrote the files, so their reading wins.
    scaling = (alpha or rank) / rank
    kind = "conv" if len(a_shape) > 2 else "linear"
    return ModuleSpec(local, kind, rank, scaling, parts["lora_A"], parts["lora_B"], a_shape, b_shape)


def _file_metadata(resolved: ResolvedSource) -> dict[str, str]:
    if resolved.weights_path.suffix != ".safetensors":
        return {}
    with safe_open(resolved.weights_path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def _component_configs(source: str, file_metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' LoraConfig per component (`unet.r`, `text_encoder.lora_alpha`, ...), if the file has it."""
    raw = file_metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        raise AdapterFormatError(f"{source}: {DIFFUSERS_METADATA_KEY} in the file header is not JSON ({error})")
    if not isinstance(packed, dict):
        raise AdapterFormatError(f"{source}: {DIFFUSERS_METADATA_KEY} in the file header is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        if component in COMPONENTS:
            configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        if config.get("use_dora"):
            raise AdapterFormatError(
                f"{source}: DoRA adapter ({component} use_dora: true); its update is not a plain low-rank product, "
                "so coremerge refuses to merge it"
            )
        check_lora_config(source, config, f"{DIFFUSERS_METADATA_KEY} ({component})")
    return configs


def _read_alphas(resolved: ResolvedSource, keys: list[str]) -> dict[str, float]:
    if resolved.weights_path.suffix == ".safetensors":
        with safe_open(resolved.weights_path, framework="pt") as handle:
            return {key: kohya_alpha(resolved.source, key, handle.get_tensor(key)) for key in keys}
    tensors = load_pickled_state_dict(resolved.source, resolved.weights_path)
    return {key: kohya_alpha(resolved.source, key, tensors[key]) for key in keys}
