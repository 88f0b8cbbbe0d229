"""Write a merged adapter as a peft LoRA folder, atomically (SPEC 2, step 6)."""

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import save_file

from ..errors import OutputError
from .adapter import Adapter, MergedModule
from .output_folder import REPORT_NAME, WEIGHTS_NAME
from .peft_format import PEFT_PREFIX
from .sources import CONFIG_NAME

UNDERFLOW_TOLERANCE = 1e-2  # relative error of a cast factor; 16-bit rounding alone is under 4e-3


def output_dtype(adapters: Sequence[Adapter], requested: Optional[str]) -> torch.dtype:
    """The requested dtype, else the inputs' common dtype (float32 when they differ)."""
    if requested is not None:
        return getattr(torch, requested)
    dtypes = {adapter.dtype for adapter in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def stored_factors(module: MergedModule, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) in the inputs' stored shapes: conv kernels restored from the flattened factors."""
    template, k = module.template, module.rank
    exact = (module.lora_a.reshape(k, *template.a_shape[1:]),
             module.lora_b.reshape(template.b_shape[0], k, *template.b_shape[2:]))
    stored = tuple(factor.to(dtype, memory_format=torch.contiguous_format) for factor in exact)
    verdicts = [rounding_verdict(cast, factor) for cast, factor in zip(stored, exact)]
    if "overflow" in verdicts:
        raise OutputError(overflow_message(module, dtype))
    if "underflow" in verdicts:
        name = str(dtype).removeprefix("torch.")
        raise OutputError(f"module {module.name}: the merged update is too small for {name} (it would be "
                          f"written as zeros); write it with --dtype float32")
    return stored


# float32 norms settle the underflow check when the factor's norm lies in this range (no square overflows,
# and the squares lost to float32's underflow add under 1e-36 against a threshold over 1e-24) and the error
# is not within a factor of 2 of the threshold (their own rounding is under 1e-5 of it); else float64 does
NORM_RANGE = (1e-10, 1e10)


def rounding_verdict(cast: torch.Tensor, exact: torch.Tensor) -> Optional[str]:
    """None if `cast` (`exact` rounded to the output dtype) is finite and within UNDERFLOW_TOLERANCE of it
    in Frobenius norm; else "overflow" (an Inf or NaN) or "underflow" (16-bit rounding flushed it toward zero).

    Most factors are settled by the norm of `exact` alone (`fits_by_norm`); the rest by one float32 difference
    and its norm (a finite difference means a finite cast: an Inf or NaN propagates); only near the threshold
    or outside NORM_RANGE is it redone in float64.
    """
    size = float(torch.linalg.vector_norm(exact))
    if fits_by_norm(size, exact.numel(), cast.dtype):
        return None
    difference = cast.to(exact.dtype, copy=True).sub_(exact)  # in place: one temporary, not two
    error = float(torch.linalg.vector_norm(difference))
    limit = UNDERFLOW_TOLERANCE * size
    if NORM_RANGE[0] < size < NORM_RANGE[1] and math.isfinite(error) and not limit / 2 < error < 2 * limit:
        return None if error <= limit else "underflow"
    if not torch.isfinite(cast).all():
        return "overflow"
    exact = exact.to(torch.float64)
    error = torch.linalg.vector_norm(cast.to(torch.float64) - exact)
    return "underflow" if error > UNDERFLOW_TOLERANCE * torch.linalg.vector_norm(exact) else None


def fits_by_norm(size: float, count: int, dtype: torch.dtype) -> bool:
    """Whether a factor of norm `size` (float32-computed, in NORM_RANGE) and `count` entries surely rounds to
    `dtype` finitely and within UNDERFLOW_TOLERANCE, whatever its entries.

    Every entry is at most `size`, so under the dtype's largest value none overflows. Rounding to nearest moves
    an entry in the normal range by at most eps/2 of it, one below by at most half the smallest subnormal
    (tiny * eps / 2), so the error's norm is at most `eps/2 size + sqrt(count) tiny eps/2`; it suffices that
    this stays under half the tolerance (the float32 norm's own error is far below that margin).
    """
    if not NORM_RANGE[0] < size < min(NORM_RANGE[1], torch.finfo(dtype).max / 2):
        return False
    info = torch.finfo(dtype)
    bound = info.eps / 2 * size + math.sqrt(count) * info.smallest_normal * info.eps / 2
    return bound <= UNDERFLOW_TOLERANCE * size / 2


def overflow_message(module: MergedModule, dtype: torch.dtype) -> str:
    """Why a module's factors do not fit in `dtype`, and what to do about it."""
    name = str(dtype).removeprefix("torch.")
    largest = max(float(module.lora_a.abs().max()), float(module.lora_b.abs().max()))
    reach = f"its factors reach {largest:.3g}" if largest < float("inf") else "its factors overflow"
    limit = torch.finfo(dtype).max
    if dtype == torch.float16:
        advice = "write it with --dtype float32 (or bfloat16)"
    else:
        advice = "use a smaller --alpha or smaller --weights"
    return f"module {module.name}: the merged adapter does not fit in {name} ({reach}; {name} stops at {limit:.3g}); {advice}"


def peft_tensors(module: MergedModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's factors under peft's key names and stored shapes (conv kernels restored)."""
    a, b = stored_factors(module, dtype)
    if module.template.kind == "embedding":
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        names = ("lora_A.weight", "lora_B.weight")
    return {f"{PEFT_PREFIX}{module.name}.{names[0]}": a, f"{PEFT_PREFIX}{module.name}.{names[1]}": b}


def peft_config(ranks: dict[str, int], base_model: Optional[str], like: Adapter) -> dict:
    """A scaling-1 peft LoraConfig: r = lora_alpha = the most common rank, patterns for the others.

    Written as the JSON that `LoraConfig.save_pretrained` writes (fields left out take peft's
    defaults), so that the CLI need not import peft, which takes seconds.
    """
    common = Counter(ranks.values()).most_common(1)[0][0]
    differing = {_pattern_key(name, ranks): k for name, k in ranks.items() if k != common}
    return {
        "peft_type": "LORA",
        "task_type": like.config.get("task_type"),
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "target_modules": sorted(ranks),
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(like.config.get("fan_in_fan_out", False)),
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _pattern_key(name: str, names) -> str:
    """A rank / alpha pattern key that matches only this module: peft matches a key as a dotted suffix, so a
    module whose name ends another's (Flux's `proj_out` and `single_transformer_blocks.0.proj_out`) gets `^`."""
    return f"^{name}" if any(other.endswith(f".{name}") for other in names) else name


def write_peft_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder`."""
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def write_report(folder: Path, report: dict) -> None:
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
