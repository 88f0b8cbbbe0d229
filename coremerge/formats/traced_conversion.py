"""Learn how one of diffusers' LoRA converters rearranges a file, without reading the file's tensors.

diffusers renames non-diffusers LoRAs (kohya, XLabs, ComfyUI, ...) and splits LoRAs of fused projections
(kohya's `qkv`, `linear1`) onto its separate modules, copying the shared down factor and slicing the up
factor by rows. Its converters work on tensors, so this module runs them on probes: every down factor
becomes one row of ids (one per input column), every up factor one column of ids (one per output row), every
alpha 1 (so rank 1 and alpha 1 leave the probes unscaled). Reading the ids of each converted tensor gives the
file tensor it came from and which of its rows or columns, in order. The scaling (alpha / r) is read from
the file separately, in float64, so the converter's own rescaling of half-precision factors never applies.
"""

import logging
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..errors import AdapterFormatError
from .adapter import Ranges

DOWN = re.compile(r"(^|[._])(lora_down|lora_A|down)\.weight$")
UP = re.compile(r"(^|[._])(lora_up|lora_B|up)\.weight$")


@dataclass(frozen=True)
class Origin:
    """Where a converted tensor comes from: a file tensor and, for a split, the rows (up) or columns (down)."""

    key: str
    ranges: Ranges
    full: bool  # every row (column) of the file tensor, in order


def factor_role(key: str) -> str:
    """"down", "up" or "" (an alpha or anything else) from a file key."""
    return "down" if DOWN.search(key) else ("up" if UP.search(key) else "")


def trace_conversion(source: str, shapes: Mapping[str, tuple[int, ...]],
                     convert: Callable[[dict], dict]) -> dict[str, Origin]:
    """{converted key: Origin} for every LoRA factor the converter outputs.

    Raises:
        AdapterFormatError: the converter fails on the file's keys, or mixes tensors in a way that is not a
            row / column selection of one file tensor (then no exact mapping exists).
    """
    probes, starts, owners = {}, [], []
    next_id = 1
    for key, shape in shapes.items():
        role = factor_role(key)
        if role and len(shape) == 2:
            width = shape[1] if role == "down" else shape[0]
            ids = torch.arange(next_id, next_id + width, dtype=torch.float64)  # exact up to 2**53
            probes[key] = ids.reshape(1, width) if role == "down" else ids.reshape(width, 1)
            starts.append(next_id)
            owners.append(key)
            next_id += width
        elif key.endswith("alpha") and len(shape) == 0:
            probes[key] = torch.tensor(1.0, dtype=torch.float64)
        else:
            probes[key] = torch.zeros(shape, dtype=torch.float64)
    diffusers_log = logging.getLogger("diffusers")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)  # its notes on the probes ("weight is sparse", ...) mean nothing here
    try:
        converted = convert(probes)
    except (ValueError, KeyError, IndexError, AssertionError, AttributeError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise AdapterFormatError(f"{source}: LoRA keys that diffusers cannot map ({first_line})") from error
    finally:
        diffusers_log.setLevel(level)
    first_ids = torch.tensor(starts, dtype=torch.float64)
    origins = {}
    for out_key, tensor in converted.items():
        if not (isinstance(tensor, torch.Tensor) and factor_role(out_key) and tensor.dim() == 2):
            continue
        ids = tensor.reshape(-1)
        if ids.numel() == 0 or not bool((ids >= 1).all()):
            continue  # not made of probe ids (zeros of a non-factor tensor)
        owner = int(torch.searchsorted(first_ids, ids[0], right=True)) - 1
        key = owners[owner]
        local = (ids - starts[owner]).to(torch.int64)
        width = shapes[key][1] if factor_role(key) == "down" else shapes[key][0]
        expected = (1, ids.numel()) if factor_role(key) == "down" else (ids.numel(), 1)
        if tuple(tensor.shape) != expected or not bool(((local >= 0) & (local < width)).all()) \
                or factor_role(out_key) != factor_role(key):
            raise AdapterFormatError(
                f"{source}: diffusers' conversion of {key} into {out_key} is not a selection of its rows "
                "or columns; coremerge cannot map it exactly"
            )
        ranges = _runs(local)
        origins[out_key] = Origin(key, ranges, ranges == ((0, width),))
    return origins


def _runs(indices: torch.Tensor) -> Ranges:
    """[3, 4, 5, 0, 1] -> ((3, 6), (0, 2)): consecutive runs as [start, stop) ranges, in order."""
    breaks = torch.nonzero(indices[1:] != indices[:-1] + 1).reshape(-1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks])
    stops = torch.cat([breaks, torch.tensor([indices.numel()])])
    return tuple((int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(starts.tolist(), stops.tolist()))
