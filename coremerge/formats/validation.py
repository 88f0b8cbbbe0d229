"""Every number and tensor shape an adapter brings, checked when it is loaded, naming the file and the key."""

import math
import re
from typing import Optional

import torch

from ..errors import AdapterFormatError

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
SAFETENSORS_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                     "U32": "uint32", "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn",
                     "F8_E5M2": "float8_e5m2"}
# A LoRA factor's key in any format: peft lora_A / lora_B / lora_AB / lora_embedding_*, kohya lora_down / lora_up,
# diffusers lora.down / lora_linear_layer.up ...
FACTOR_KEY = re.compile(r"lora(_linear_layer)?[._](A|B|AB|down|up|embedding_A|embedding_B)\b")
MAX_FACTOR_DIMS = 5
# peft's TaskType values (tests compare them with peft's own; importing peft here would cost seconds per run)
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # Linear / Embedding factors are 2-D, Conv1d / 2d / 3d kernels 3- to 5-D


def is_number(value: object) -> bool:
    """A JSON or Python number (bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: object) -> bool:
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_lora_config(source: str, config: dict, config_name: str) -> None:
    """r, lora_alpha and the patterns: finite positive numbers of the right type; flags booleans; names strings.

    Raises:
        AdapterFormatError: naming the source, the config and the key.
    """
    def bad(key: str, expected: str) -> AdapterFormatError:
        return AdapterFormatError(f"{source}: {config_name} is malformed ({key} must be {expected}, "
                                  f"not {_short(config.get(key))})")

    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", "a positive integer")
    if not is_finite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "a finite positive number")
    for key, check, expected in (("rank_pattern", _positive_int, "a positive integer"),
                                 ("alpha_pattern", _positive_finite, "a finite positive number")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(key, "an object")
        for name, value in pattern.items():
            if not check(value):
                raise AdapterFormatError(f"{source}: {config_name} is malformed ({key}[{name!r}] must be "
                                         f"{expected}, not {_short(value)})")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    if config.get("base_model_name_or_path") is not None and not isinstance(config["base_model_name_or_path"], str):
        raise bad("base_model_name_or_path", "a string")
    if config.get("task_type") is not None and config["task_type"] not in PEFT_TASK_TYPES:
        raise bad("task_type", f"one of {', '.join(PEFT_TASK_TYPES)} or null")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_finite(value: object) -> bool:
    return is_finite(value) and value > 0


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_factor_shapes(source: str, name: str, a_key: str, a_shape: tuple, b_key: str, b_shape: tuple,
                        mixer_shape: Optional[tuple] = None, embedding: bool = False) -> None:
    """lora_A (r, n[, kernel...]) and lora_B (m, r[, 1...]) of one module fit together (MoSLoRA's mixer r x r).

    Raises:
        AdapterFormatError: naming the source, the module and both tensors' shapes.
    """
    dims = len(a_shape)
    rank = a_shape[0] if a_shape else 0
    fits = (
        2 <= dims <= (2 if embedding else MAX_FACTOR_DIMS)
        and len(b_shape) == dims
        and all(d > 0 for d in (*a_shape, *b_shape))
        and b_shape[1] == rank
        and all(d == 1 for d in b_shape[2:])
        and (mixer_shape is None or tuple(mixer_shape) == (rank, rank))
    )
    if not fits:
        mixer = "" if mixer_shape is None else f", mixer {tuple(mixer_shape)}"
        raise AdapterFormatError(
            f"{source}: module {name} has inconsistent LoRA shapes ({a_key} {tuple(a_shape)}, {b_key} "
            f"{tuple(b_shape)}{mixer}); expected A (r, n) and B (m, r){'' if embedding else ', or conv kernels'}"
        )


def check_float_dtype(source: str, key: str, dtype: object) -> None:
    """A LoRA factor must be float16, bfloat16, float32 or float64 (an integer tensor is quantized or corrupt)."""
    if dtype in FLOAT_DTYPES or dtype in FLOAT_DTYPES.values():
        return
    name = SAFETENSORS_NAMES.get(dtype, str(dtype).removeprefix("torch.").lower())
    raise AdapterFormatError(
        f"{source}: tensor {key} is {name}, not a floating-point LoRA factor (float16, bfloat16, float32 or float64); "
        "quantized or corrupt adapters cannot be merged"
    )


def kohya_alpha(source: str, key: str, tensor: object) -> float:
    """A kohya `alpha`: one finite number >= 0 (0 is read as alpha = rank by the caller, as kohya does).

    Raises:
        AdapterFormatError: naming the source and the key.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1 or tensor.dtype == torch.bool \
            or tensor.is_complex():
        if not isinstance(tensor, torch.Tensor):
            found = type(tensor).__name__
        elif tensor.numel() != 1:
            found = f"a tensor of shape {tuple(tensor.shape)}"
        else:
            found = f"a {str(tensor.dtype).removeprefix('torch.')} tensor"
        raise AdapterFormatError(f"{source}: {key} must be one number (a scalar tensor), not {found}")
    value = float(tensor.to(torch.float64))
    if not math.isfinite(value) or value < 0:
        raise AdapterFormatError(f"{source}: {key} is {value}; a kohya alpha must be a finite number >= 0")
    return value
