"""Compatibility checks across the adapters of one merge, each failing with one clear message."""

from typing import Optional, Sequence

from ..errors import CoreMergeError, IncompatibleAdaptersError
from .adapter import Adapter
from .diffusion_family import same_family


def check_sources(sources: Sequence[str]) -> None:
    if not sources:
        raise CoreMergeError("no adapters given: pass at least one SOURCE (a Hub ID, folder or .safetensors file)")
    for number, source in enumerate(sources, 1):
        if not isinstance(source, str) or not source.strip():
            raise CoreMergeError(f"source {number} is empty; give a Hub ID, folder or .safetensors file")


def duplicate_adapter_warnings(adapters: Sequence[Adapter]) -> list[str]:
    """Two sources that resolve to the same weights file: merged as given, but the user should know."""
    first_source_of, warnings = {}, []
    for adapter in adapters:
        key = adapter.weights_path.resolve()
        if key in first_source_of:
            warnings.append(f"{first_source_of[key]} and {adapter.source} are the same adapter: it counts twice")
        first_source_of.setdefault(key, adapter.source)
    return warnings


def normalized_base(name: Optional[str]) -> Optional[str]:
    """A base model name compared exactly, up to surrounding spaces and a trailing slash."""
    if not name:
        return None
    return name.strip().rstrip("/")


def check_same_base_model(adapters: Sequence[Adapter]) -> Optional[str]:
    """The shared base model name (None if no adapter names one).

    Raises:
        IncompatibleAdaptersError: two adapters name different base models.
    """
    named = [(a, normalized_base(a.base_model)) for a in adapters if normalized_base(a.base_model)]
    for adapter, base in named[1:]:
        first, first_base = named[0]
        if base != first_base:
            raise IncompatibleAdaptersError(
                f"{adapter.source} was trained on {base} but {first.source} on {first_base}; "
                "only adapters of the same base model can be merged"
            )
    return named[0][1] if named else None


def check_same_family(adapters: Sequence[Adapter]) -> None:
    """Diffusion LoRAs only with diffusion LoRAs, and of one Stable Diffusion version.

    Raises:
        IncompatibleAdaptersError: naming both adapters and what each is for.
    """
    first = adapters[0]
    for adapter in adapters[1:]:
        if (adapter.family is None) != (first.family is None):
            diffusion, other = (adapter, first) if adapter.family is not None else (first, adapter)
            raise IncompatibleAdaptersError(
                f"{diffusion.source} is a diffusion LoRA ({diffusion.family}) but {other.source} is not; "
                "only adapters of the same base model can be merged"
            )
    if first.family is None:
        return
    for index, adapter in enumerate(adapters):  # each against every earlier one: UNKNOWN matches any family
        other = next((a for a in adapters[:index] if not same_family(a.family, adapter.family)), None)
        if other is not None:
            raise IncompatibleAdaptersError(
                f"{adapter.source} is a LoRA for {adapter.family} but {other.source} is for {other.family}; "
                "only LoRAs of the same base model can be merged"
            )


def check_module_shapes(adapters: Sequence[Adapter]) -> None:
    """Every module that several adapters target must have one shape and kind.

    Raises:
        IncompatibleAdaptersError: naming the module, both adapters and both shapes.
    """
    seen: dict[str, tuple[Adapter, tuple, str]] = {}
    for adapter in adapters:
        for name, spec in adapter.modules.items():
            shape = (spec.shape, spec.a_shape[1:], spec.b_shape[2:])
            if name not in seen:
                seen[name] = (adapter, shape, spec.kind)
                continue
            other, other_shape, other_kind = seen[name]
            if shape != other_shape or spec.kind != other_kind:
                raise IncompatibleAdaptersError(
                    f"module {name} is {spec.kind} {_describe(spec)} in {adapter.source} but "
                    f"{other_kind} {_describe(other.modules[name])} in {other.source}; "
                    "the adapters do not fit the same base model"
                )


def _describe(spec) -> str:
    return "x".join(map(str, (spec.b_shape[0], *spec.a_shape[1:])))
