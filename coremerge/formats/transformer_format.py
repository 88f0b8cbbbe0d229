"""Read LoRAs of diffusion transformers (Flux.1, SD3 / SD3.5) into the canonical form, by one generic path.

The family's diffusers converter (the one `FluxPipeline.lora_state_dict` picks; SD3 keeps its keys) renames the
keys and splits fused projections; `traced_conversion` learns from it, on probes, where every converted factor
lies in the file (`key_map_cache` remembers that per layout). Modules are then named as in the pipeline,
component first (`transformer.transformer_blocks.0.attn.to_q`, `text_encoder.encoder.layers.0.self_attn.q_proj`),
and their factors stay in the file until merged: a split module reads only its rows of the fused up factor, the
shared down factor whole, so every update is exact.
"""

import re
import sys
from collections import Counter
from dataclasses import replace
from typing import Mapping, Optional

from ..errors import AdapterFormatError
from . import flux, key_map_cache, sd3
from .adapter import Adapter, ModuleSpec
from .diffusion_family import FLUX, SD3, UNKNOWN_DIT
from .diffusion_format import (DIFFUSERS_METADATA_KEY, PEFT_KEY, TEXT_MODEL, _component_configs,
                               _diffusers_to_peft_names, _file_metadata, _read_alphas)
from .peft_format import PEFT_PREFIX, load_peft_adapter, module_spec, refuse_non_lora, tensor_index
from .sources import ResolvedSource
from .traced_conversion import DOWN, Origin, factor_role, trace_conversion

# Top-level modules of diffusers' transformer denoisers: a peft folder of one has only these.
TRANSFORMER_TOP_LEVEL = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                         "time_text_embed", "norm_out", "proj_out", "pos_embed"}
WHOLE_BLOCK = re.compile(r"blocks\.\d+$")  # a converted name that stops at a block: the layer got lost
DIFF_SUFFIXES = (".diff", ".diff_b")  # full-weight (and bias) differences some trainers add to a LoRA file
# Inner widths of each family (attention projections' outputs), for files whose module names do not tell.
WIDTHS = {flux.INNER_WIDTH: FLUX, **{width: SD3 for width in sd3.INNER_WIDTHS}}
ATTENTION = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj")


def is_transformer_lora(resolved: ResolvedSource) -> bool:
    """Whether the file is a LoRA of a diffusion transformer (any layout), or a peft folder of one."""
    keys = list(tensor_index(resolved)[0])
    if flux.claims(keys) or sd3.claims_unconverted(keys) or any(key.startswith(("transformer.", "diffusion_model."))
                                                                  for key in keys):
        return True
    return resolved.config_path is not None and _is_transformer_peft(keys)


def _is_transformer_peft(keys: list[str]) -> bool:
    tops = {key.removeprefix(PEFT_PREFIX).split(".")[0] for key in keys}
    return bool(tops) and tops <= TRANSFORMER_TOP_LEVEL and bool(tops & {"transformer_blocks",
                                                                         "single_transformer_blocks"})


def load_transformer_adapter(resolved: ResolvedSource) -> Adapter:
    """Read a diffusion-transformer LoRA's tensor index, map it as diffusers does, fold in alpha / r.

    Raises:
        AdapterFormatError: a LoHa / LoKr / DoRA / full-weight-difference file, a control LoRA, keys
            diffusers cannot map, or inconsistent shapes.
    """
    source = resolved.source
    shapes, dtype = tensor_index(resolved)
    refuse_non_lora(source, shapes)
    _refuse_diffs(source, shapes)
    flux.refuse_control(source, shapes)
    keys = list(shapes)
    sd3.refuse_unconverted(source, keys)
    metadata = _file_metadata(resolved)
    if resolved.config_path is not None and _is_transformer_peft(keys):
        adapter = load_peft_adapter(resolved)
        modules = {f"transformer.{n}": replace(s, name=f"transformer.{n}") for n, s in adapter.modules.items()}
        return replace(adapter, modules=modules, family=_family(modules, metadata, False))

    flux_only = flux.claims(keys)
    renamed = key_map_cache.remembered(
        "dit-flux" if flux_only else "dit-sd3", shapes,
        lambda: _converted_names(source, shapes, flux.convert if flux_only else sd3.convert),
        pack=lambda origin: [origin.key, origin.ranges, origin.full], unpack=lambda packed: _origin(packed, shapes))
    configs = _component_configs(source, metadata)
    alphas = _read_alphas(resolved, [key for key in keys if key.endswith(".alpha")])
    layout = flux.layout(keys) if flux_only else "diffusers"
    modules = {}
    for (component, local), parts in sorted(_group(renamed).items()):
        name = f"{component}.{local.removeprefix(TEXT_MODEL)}"
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise AdapterFormatError(f"{source}: module {name} has no {part} (lora_down / lora_up) tensor")
        if WHOLE_BLOCK.search(local):  # diffusers 0.42 does so with `lora_transformer_single_..._proj_out`
            raise AdapterFormatError(
                f"{source}: diffusers maps {parts['lora_A'].key} to {name}, a whole block rather than a layer; "
                "coremerge cannot merge this key"
            )
        default_alpha = _default_alpha(alphas, component) if layout == "diffusers" else None
        spec = _spec(source, local, parts["lora_A"], parts["lora_B"], shapes, configs.get(component), alphas,
                     default_alpha)
        modules[name] = replace(spec, name=name)
    if not modules:
        raise AdapterFormatError(f"{source}: {resolved.weights_path.name} holds no LoRA tensors")
    used = {origin.key for origin in renamed.values()}
    ignored = [key for key in keys if key not in used and not key.endswith(".alpha")]
    if ignored:
        print(f"coremerge: warning: {source}: ignoring {len(ignored)} tensor(s) diffusers does not load, such as "
              f"{ignored[0]}", file=sys.stderr)
    family = _family(modules, metadata, flux_only)
    if family == FLUX:
        flux.refuse_widened(source, modules)
    return Adapter(
        source=source,
        weights_path=resolved.weights_path,
        format=layout,
        base_model=None,
        modules=modules,
        dtype=dtype,
        nbytes=resolved.weights_path.stat().st_size,
        revision=resolved.revision,
        origin=resolved.origin,
        ignored_keys=tuple(ignored),
        family=family,
    )


def _refuse_diffs(source: str, shapes: Mapping[str, tuple]) -> None:
    key = next((k for k in shapes if k.endswith(DIFF_SUFFIXES)), None)
    if key is not None:
        raise AdapterFormatError(
            f"{source}: full-weight difference (tensor {key}); it is not a low-rank update, so coremerge "
            "refuses to merge the file"
        )


def _converted_names(source: str, shapes: Mapping[str, tuple[int, ...]], convert) -> dict[str, Origin]:
    """{peft-style module key: where its factor lies in the file}, as the family's diffusers converter maps it."""
    origins = trace_conversion(source, shapes, convert)
    return _diffusers_to_peft_names({_prefixed(key): origin for key, origin in origins.items()})


def _origin(packed, shapes: Mapping[str, tuple[int, ...]]) -> Origin:
    """An `Origin` read back from the key map cache, checked to lie inside the file's tensor.

    Raises:
        KeyError, TypeError, ValueError: anything that does not describe a tensor of this file.
    """
    key, ranges, full = packed
    shape = shapes[key]
    if len(shape) != 2 or not factor_role(key) or not isinstance(full, bool):
        raise ValueError(f"{key}: not a LoRA factor of this file")
    width = shape[1] if factor_role(key) == "down" else shape[0]
    ranges = tuple((int(start), int(stop)) for start, stop in ranges)
    if not all(0 <= start < stop <= width for start, stop in ranges):
        raise ValueError(f"{key}: not a row / column selection of this file's tensor")
    return Origin(key, ranges, full)


def _prefixed(key: str) -> str:
    """Converted keys of the denoiser come with `transformer.` from every converter but fal Kontext's."""
    return key if key.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) else f"transformer.{key}"


def _group(renamed: Mapping[str, Origin]) -> dict[tuple[str, str], dict[str, Origin]]:
    """{(component, local module name): {"lora_A": origin, "lora_B": origin}} from peft-style converted keys."""
    grouped: dict[tuple[str, str], dict[str, Origin]] = {}
    for key, origin in renamed.items():
        match = PEFT_KEY.match(key)
        if match is not None:
            grouped.setdefault((match["component"], match["local"]), {})[match["part"]] = origin
    return grouped


def _default_alpha(alphas: Mapping[str, float], component: str) -> Optional[float]:
    """diffusers' alpha for the modules of a diffusers-layout file that have no `.alpha` of their own: the most
    common alpha of the component (its `get_peft_kwargs` makes that the LoraConfig's lora_alpha)."""
    values = [value for key, value in alphas.items() if key.startswith(f"{component}.")]
    return Counter(values).most_common(1)[0][0] if values else None


def _spec(source: str, local: str, a: Origin, b: Origin, shapes: Mapping[str, tuple], config: Optional[dict],
          alphas: Mapping[str, float], default_alpha: Optional[float] = None) -> ModuleSpec:
    """One module: its factors' file keys and row / column ranges, rank from the file, s = alpha / r."""
    rank = shapes[a.key][0]
    if shapes[b.key][1] != rank:
        raise AdapterFormatError(
            f"{source}: module {local} has inconsistent LoRA shapes (down {shapes[a.key]}, up {shapes[b.key]}); "
            f"rank {rank} expected"
        )
    a_shape = (rank, sum(stop - start for start, stop in a.ranges))
    b_shape = (sum(stop - start for start, stop in b.ranges), rank)
    if config is not None:  # diffusers' own LoraConfig in the header
        parts = {"lora_A": a.key, "lora_B": b.key}
        spec = module_spec(source, config, local, parts, {a.key: a_shape, b.key: b_shape}, DIFFUSERS_METADATA_KEY)
    else:  # an alpha next to the down factor; else diffusers' default (kohya, XLabs: alpha = r, s = 1)
        own = (alphas[k] for k in (DOWN.sub("", a.key) + ".alpha", a.key + ".alpha") if k in alphas)
        alpha = next(own, default_alpha)
        spec = ModuleSpec(local, "linear", rank, (alpha or rank) / rank, a.key, b.key, a_shape, b_shape)
    return replace(spec, b_rows=None if b.full else b.ranges, a_columns=None if a.full else a.ranges)


def _family(modules: Mapping[str, ModuleSpec], metadata: Mapping[str, str], flux_only: bool) -> str:
    """Flux.1 or SD3 when any evidence tells, else UNKNOWN_DIT.

    Evidence, strongest first: a Flux-only layout or module; kohya's `ss_base_model_version` or the
    `modelspec.architecture` metadata; SD3-only modules; the width of the attention projections.
    """
    version = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
    if flux_only or "flux" in version or flux.claims(list(modules)):
        return FLUX
    if "sd3" in version or "stable-diffusion-v3" in version or sd3.claims(modules):
        return SD3
    for name, spec in modules.items():
        if name.startswith("transformer.") and name.endswith(ATTENTION) and spec.shape[0] in WIDTHS:
            return WIDTHS[spec.shape[0]]
    return UNKNOWN_DIT
