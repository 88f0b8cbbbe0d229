"""Every value the page sends, checked once where it enters, with messages in the page's words.

Past this module the code trusts its inputs: weights and alpha are finite and in range, the rank is a small
positive integer, method and space are known, cells hold printable text of bounded length.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import CoreMergeError
from ..formats.adapter import Adapter
from ..formats.checks import normalized_base
from ..merging.methods import METHODS, Parameter
from ..merging.options import SPACES
from ..presets import Preset, list_presets

WEIGHT_RANGE = (-10.0, 10.0)  # per adapter; negative weights subtract a task
ALPHA_RANGE = (0.0, 10.0)  # exclusive of 0
MAX_RANK = 4096
MAX_CELL = 300  # characters in a table cell


@dataclass(frozen=True)
class Row:
    """One adapter row, checked: the source as typed, a display name, a finite weight."""

    source: str
    name: str
    weight: float


def number(value, what: str, low: float, high: float, *, low_exclusive: bool = False) -> float:
    """A finite number in [low, high] (or (low, high]); raises CoreMergeError naming `what` and the range."""
    text = str(value).strip() if value is not None else ""
    try:
        result = float(text)
    except (TypeError, ValueError, OverflowError):
        raise CoreMergeError(f"{what}: {_clip(text)!r} is not a number") from None
    too_low = result <= low if low_exclusive else result < low
    if not math.isfinite(result) or too_low or result > high:
        bracket = "(" if low_exclusive else "["
        raise CoreMergeError(f"{what}: {_clip(text)} is out of range; give a number in {bracket}{low:g}, {high:g}]")
    return result


def text_cell(value, what: str) -> str:
    """A table cell as printable text, stripped; raises CoreMergeError for control characters or a long cell."""
    text = ("" if value is None else str(value)).strip()
    if len(text) > MAX_CELL:
        raise CoreMergeError(f"{what}: {len(text)} characters; at most {MAX_CELL}")
    if any(not c.isprintable() for c in text):
        raise CoreMergeError(f"{what}: contains control characters; type plain text")
    return text


def text_block(value, what: str, limit: int = 20_000) -> str:
    """Multi-line text (prompts): tabs and newlines allowed, other control characters not."""
    text = "" if value is None else str(value)
    if len(text) > limit:
        raise CoreMergeError(f"{what}: {len(text)} characters; at most {limit}")
    if any(not c.isprintable() and c not in "\n\r\t" for c in text):
        raise CoreMergeError(f"{what}: contains control characters; type plain text")
    return text


def adapter_rows(table) -> tuple[tuple[Row, ...], list[str]]:
    """The adapter table's rows (blank rows skipped; an empty weight is 1) and notes for the page: duplicate
    adapters and weights of 0.

    Raises:
        CoreMergeError: naming the row and the cell that is wrong.
    """
    if table is None:
        table = []
    if not isinstance(table, (list, tuple)) or any(not isinstance(r, (list, tuple)) for r in table):
        raise CoreMergeError("adapters: expected a table of rows (source, name, weight)")
    rows, notes, first_row_of = [], [], {}
    for number_, cells in enumerate(table, 1):
        cells = list(cells)[:3] + [None] * (3 - len(list(cells)[:3]))
        source = text_cell(cells[0], f"adapter row {number_}, source")
        name = text_cell(cells[1], f"adapter row {number_}, name")
        weight_text = text_cell(cells[2], f"adapter row {number_}, weight")
        if not (source or name or weight_text):
            continue
        if not source:
            raise CoreMergeError(f"adapter row {number_}: no source; give a Hub ID, a preset path or upload:file")
        weight = number(weight_text, f"adapter row {number_}, weight", *WEIGHT_RANGE) if weight_text else 1.0
        if weight == 0:
            notes.append(f"adapter row {number_} has weight 0: it adds nothing to the merge")
        key = _same_adapter_key(source)
        if key in first_row_of:
            notes.append(f"adapter rows {first_row_of[key]} and {number_} are the same adapter ({source}): "
                         "it counts twice")
        first_row_of.setdefault(key, number_)
        rows.append(Row(source, name or source.rstrip("/").split("/")[-1] or source, weight))
    return tuple(rows), notes


def _same_adapter_key(source: str) -> str:
    parts = [p for p in source.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts).lower()


def method_name(value) -> str:
    if not isinstance(value, str) or value not in METHODS:
        raise CoreMergeError(f"method {_clip(str(value))!r}: unknown; choose one of {', '.join(METHODS)}")
    return value


def space_name(value) -> str:
    if not isinstance(value, str) or value not in SPACES:
        raise CoreMergeError(f"space {_clip(str(value))!r}: unknown; choose one of {', '.join(SPACES)}")
    return value


def preset_name(value) -> str:
    names = [p.name for p in list_presets()]
    if not isinstance(value, str) or value not in names:
        raise CoreMergeError(f"preset {_clip(str(value))!r}: unknown; choose one of {', '.join(names)}")
    return value


def alpha_value(value) -> float:
    return number(value, "alpha", *ALPHA_RANGE, low_exclusive=True)


def rank_value(value) -> Optional[int]:
    """Empty or 0: the exact (numerical) rank; else a whole number in [1, MAX_RANK]."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    rank = number(value, "rank", 0, MAX_RANK)
    if rank != int(rank):
        raise CoreMergeError(f"rank: {rank:g} is not a whole number")
    return int(rank) or None


def parameter_value(parameter: Parameter, value) -> float:
    """A method parameter in the registry's range, named as the page names it."""
    what = parameter.name.replace("_", " ")
    result = number(value, what, parameter.low, parameter.high, low_exclusive=parameter.low_exclusive)
    if parameter.kind is int:
        if result != int(result):
            raise CoreMergeError(f"{what}: {result:g} is not a whole number")
        return int(result)
    return result


def fit_to_preset(preset: Preset, adapters: Sequence[Adapter], reference: Optional[Adapter],
                  shown: Sequence[str]) -> Optional[str]:
    """None if the adapters run on the preset's model; else why the side by side is left out (every adapter
    is of one other base model). `reference` is one of the preset's own adapters (None for a Hub preset).

    Raises:
        CoreMergeError: some adapters fit the preset's model and others do not; names the first that does not.
    """
    model = normalized_base(reference.base_model) if reference is not None else normalized_base(preset.base_model)
    fits = [_fits(adapter, model, reference) for adapter in adapters]
    if all(fits):
        return None
    if any(fits):
        number_ = fits.index(False) + 1
        theirs = normalized_base(adapters[number_ - 1].base_model) or "another model"
        raise CoreMergeError(f"adapter row {number_} ({shown[number_ - 1]}) is for {theirs}, not for {model}, the "
                             f"model of preset {preset.name}; remove it, or merge it with adapters of its own model")
    theirs = normalized_base(adapters[0].base_model) or "another model"
    runs = [p.name for p in list_presets() if normalized_base(p.base_model) == theirs and p.name != preset.name]
    where = f"; preset {runs[0]} runs it" if runs else "; no preset here runs that model"
    return (f"No side by side: these adapters are for {theirs}, and preset {preset.name} runs {model}{where}. "
            "The merged adapter, its report and the download are ready.")


def _fits(adapter: Adapter, model: Optional[str], reference: Optional[Adapter]) -> bool:
    """Same base model by name when both are named; else every module both adapt has the same shape."""
    base = normalized_base(adapter.base_model)
    if base is not None and model is not None:
        return base == model
    if reference is None:
        return True  # nothing to tell by: let the comparison try
    common = set(adapter.modules) & set(reference.modules)
    return bool(common) and all(adapter.modules[m].shape == reference.modules[m].shape for m in common)


def _clip(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 40 else text[:37] + "..."
