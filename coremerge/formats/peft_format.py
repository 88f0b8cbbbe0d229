"""Read peft LoRA adapters (and MoSLoRA's `lora_AB` mixer) into the canonical `Adapter` form."""

import json
import math
import re
import weakref
from collections import defaultdict
from typing import Optional

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError, describe_os_error
from .adapter import Adapter, ModuleSpec, load_pickled_state_dict
from .sources import CONFIG_NAME, ResolvedSource
from .validation import FACTOR_KEY, FLOAT_DTYPES, check_factor_shapes, check_float_dtype, check_lora_config

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_AB|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
# Keys of adapter types whose update is not a plain low-rank product, and what to call them.
REFUSED_KEYS = {
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "dora_scale": "DoRA (dora_scale)",
    "hada_w": "LoHa",
    "lokr_w": "LoKr",
    "ia3_l": "IA3",
    "on_input": "IA3 (LyCORIS)",
    "oft_": "OFT",
    "vera_lambda": "VeRA",
    "lora_mid": "LoCon with a CP / Tucker core (lora_mid)",
}


def load_peft_adapter(resolved: ResolvedSource) -> Adapter:
    """Read an adapter's config and tensor index (not its tensors) and check it is a plain LoRA.

    Raises:
        AdapterFormatError: missing or malformed config or weights, or a non-LoRA adapter type.
    """
    source = resolved.source
    shapes, dtype = tensor_index(resolved)
    refuse_non_lora(source, shapes)
    config = _read_config(resolved)
    grouped, ignored = _group_lora_keys(source, shapes)
    if not grouped:
        raise AdapterFormatError(f"{source}: {resolved.weights_path.name} holds no LoRA tensors (lora_A / lora_B)")
    modules = {name: module_spec(source, config, name, parts, shapes) for name, parts in sorted(grouped.items())}
    return Adapter(
        source=source,
        weights_path=resolved.weights_path,
        format="peft-moslora" if any(s.mixer_key for s in modules.values()) else "peft",
        base_model=config.get("base_model_name_or_path"),
        modules=modules,
        dtype=dtype,
        nbytes=resolved.weights_path.stat().st_size,
        config=config,
        revision=resolved.revision,
        origin=resolved.origin,
        ignored_keys=tuple(ignored),
    )


def tensor_index(resolved: ResolvedSource) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Every tensor's shape, and the LoRA tensors' dtype, without reading the data.

    Several format checks ask for the same file's index while one source is loaded: it is read once per
    `ResolvedSource` object (each resolution of a source makes a new one, which reads the file again), and kept
    while that object lives: a tenth of a second for an SDXL file of three thousand tensors.

    Raises:
        AdapterFormatError: an unreadable file, or a LoRA factor that is not a float tensor (naming its key).
    """
    key = id(resolved)
    if key not in _INDEXES:
        _INDEXES[key] = _read_tensor_index(resolved)
        weakref.finalize(resolved, _INDEXES.pop, key, None)  # before the id can be reused
    shapes, dtype = _INDEXES[key]
    return dict(shapes), dtype


_INDEXES: dict[int, tuple[dict, torch.dtype]] = {}  # id of a live ResolvedSource -> its file's index


def _read_tensor_index(resolved: ResolvedSource) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    path = resolved.weights_path
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as handle:
                slices = {key: handle.get_slice(key) for key in handle.keys()}
                shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
                dtypes = {key: s.get_dtype() for key, s in slices.items()}
        except Exception as error:  # noqa: BLE001 - a corrupt file is one user problem
            raise AdapterFormatError(f"{resolved.source}: {path.name} is not a readable safetensors file ({error})")
    else:
        tensors = load_pickled_state_dict(resolved.source, path)
        shapes = {key: tuple(t.shape) for key, t in tensors.items()}
        dtypes = {key: t.dtype for key, t in tensors.items()}
    factors = [key for key in shapes if FACTOR_KEY.search(key) and not key.endswith(".alpha")]
    for key in factors:
        check_float_dtype(resolved.source, key, dtypes[key])
    dtype = dtypes[factors[0]] if factors else torch.float32
    return shapes, FLOAT_DTYPES.get(dtype, dtype)


def refuse_non_lora(source: str, shapes: dict) -> None:
    """Refuse adapter types whose update is not a plain low-rank product, and LoRA with a bias.

    Raises:
        AdapterFormatError: naming the source, the adapter type and the tensor that shows it.
    """
    for key in shapes:
        for marker, kind in REFUSED_KEYS.items():
            if marker in key:
                raise AdapterFormatError(
                    f"{source}: {kind} adapter (tensor {key}); its update is not a plain low-rank product, "
                    "so coremerge refuses to merge it"
                )
        if (".lora_B." in key or ".lora_up." in key or ".lora.up." in key) and key.endswith(".bias"):
            raise AdapterFormatError(f"{source}: lora_B has a bias (tensor {key}); only bias-free LoRA can be merged")


def _read_config(resolved: ResolvedSource) -> dict:
    source = resolved.source
    if resolved.config_path is None:
        raise AdapterFormatError(
            f"{source}: no {CONFIG_NAME} next to {resolved.weights_path.name}; "
            "a peft adapter needs its config for r and lora_alpha"
        )
    try:
        config = json.loads(resolved.config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise AdapterFormatError(f"{source}: {CONFIG_NAME} is not valid JSON ({error})") from error
    except OSError as error:
        raise AdapterFormatError(f"{source}: cannot read {CONFIG_NAME} ({describe_os_error(error)})") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{source}: {CONFIG_NAME} is malformed (expected a JSON object)")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise AdapterFormatError(f"{source}: {CONFIG_NAME} is malformed (no peft_type)")
    if str(peft_type).upper() != "LORA":
        raise AdapterFormatError(
            f"{source}: peft_type {peft_type} is not LoRA; coremerge merges plain LoRA adapters only"
        )
    if config.get("use_dora"):
        raise AdapterFormatError(
            f"{source}: DoRA adapter (use_dora: true); its magnitude vector makes the update not a plain "
            "low-rank product, so coremerge refuses to merge it"
        )
    check_lora_config(source, config, CONFIG_NAME)
    return config


def _group_lora_keys(source: str, shapes: dict) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module name: {part: key}} for the LoRA tensors, and the keys that are not LoRA tensors."""
    grouped: dict[str, dict[str, str]] = defaultdict(dict)
    adapter_names, ignored = set(), []
    for key in shapes:
        stripped = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(stripped.removesuffix(".weight"))
        if match is None:
            ignored.append(key)
            continue
        adapter_names.add(match["adapter"])
        grouped[match["module"]][match["part"]] = key
    if len(adapter_names) > 1:
        names = ", ".join(sorted(str(n) for n in adapter_names))
        raise AdapterFormatError(f"{source}: the file holds several adapters ({names}); save them one per folder")
    return dict(grouped), ignored


def module_spec(source: str, config: dict, name: str, parts: dict[str, str], shapes: dict,
                config_name: str = CONFIG_NAME) -> ModuleSpec:
    """One module's spec from a LoraConfig dict: rank checked against the weights, scaling from r / alpha
    (patterns resolved as peft does, rsLoRA included). `config_name` names the config in error messages."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    for part in (a_part, b_part):
        if part not in parts:
            raise AdapterFormatError(f"{source}: module {name} has no {part} tensor")
    a_shape, b_shape = shapes[parts[a_part]], shapes[parts[b_part]]
    mixer_key: Optional[str] = parts.get("lora_AB")
    check_factor_shapes(source, name, parts[a_part], a_shape, parts[b_part], b_shape,
                        shapes[mixer_key] if mixer_key else None, embedding)
    rank = a_shape[0]
    configured_rank = _resolve_pattern(config.get("rank_pattern"), name, config["r"])
    alpha = _resolve_pattern(config.get("alpha_pattern"), name, config["lora_alpha"])
    if configured_rank != rank:
        raise AdapterFormatError(
            f"{source}: module {name} has rank {rank} in the weights but r={configured_rank} in {config_name}"
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    kind = "embedding" if embedding else ("conv" if len(a_shape) > 2 else "linear")
    return ModuleSpec(name, kind, rank, scaling, parts[a_part], parts[b_part], a_shape, b_shape, mixer_key)


def _resolve_pattern(pattern: Optional[dict], name: str, default: float) -> float:
    """A rank_pattern / alpha_pattern value for a module, exactly as peft resolves it."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key  # imported only when needed: importing peft takes seconds

    return pattern.get(get_pattern_key(pattern.keys(), name), default)
