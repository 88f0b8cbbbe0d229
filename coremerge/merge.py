"""Merge loaded adapters module by module, reading each module's factors only when it is merged."""

import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from .adapter import Adapter, ModuleSpec
from .checks import check_module_shapes, check_same_base_model, check_sources
from .options import MergeOptions
from .peft_format import load_peft_adapter
from .sources import resolve_source
from .spaces import merge_module, to_lora

MODULES_PER_READ = 16  # files are reopened per chunk so that their memory maps do not pile up


def load_adapter(source: str) -> Adapter:
    """Resolve a source (Hub ID, folder or file) and read its config and tensor index."""
    return load_peft_adapter(resolve_source(source))


def load_adapters(sources: Sequence[str]) -> list[Adapter]:
    """Load every source and check that they can be merged together."""
    check_sources(sources)
    adapters = [load_adapter(source) for source in sources]
    check_same_base_model(adapters)
    check_module_shapes(adapters)
    return adapters


@dataclass(frozen=True)
class MergedModule:
    """One module of the merged adapter: `dW = lora_b @ lora_a` (float64, flattened)."""

    name: str
    template: ModuleSpec  # kind and stored shapes, from an input adapter
    lora_a: torch.Tensor  # (k, n)
    lora_b: torch.Tensor  # (m, k)
    input_ranks: dict[int, int]  # adapter index -> rank

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class Timings:
    loading: float = 0.0
    merging: float = 0.0
    writing: float = 0.0
    extra: dict = field(default_factory=dict)


def module_generator(seed: int, name: str) -> torch.Generator:
    """The seeded randomness of one module (dare): the same seed and module give the same mask."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def module_names(adapters: Sequence[Adapter]) -> list[str]:
    return sorted({name for adapter in adapters for name in adapter.modules})


def merge_adapters(
    adapters: Sequence[Adapter],
    options: MergeOptions,
    timings: Optional[Timings] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Iterator[MergedModule]:
    """Merge module by module; a module counts only the adapters that target it (SPEC 1).

    Yields:
        One `MergedModule` per module, in name order.
    """
    weights = options.weights_for(len(adapters))
    timings = timings or Timings()
    names = module_names(adapters)
    seed = int(options.params.get("seed", 0))
    for start in range(0, len(names), MODULES_PER_READ):
        chunk = names[start:start + MODULES_PER_READ]
        with ExitStack() as stack:
            readers = [stack.enter_context(adapter.open()) for adapter in adapters]
            for offset, name in enumerate(chunk):
                clock = time.perf_counter()
                users = [i for i, adapter in enumerate(adapters) if name in adapter.modules]
                tasks = [adapters[i].read_factors(readers[i], name, weights[i]) for i in users]
                timings.loading += time.perf_counter() - clock
                clock = time.perf_counter()
                lora_b, lora_a = to_lora(merge_module(tasks, options, module_generator(seed, name)), options.rank)
                timings.merging += time.perf_counter() - clock
                template = adapters[users[0]].modules[name]
                yield MergedModule(name, template, lora_a, lora_b, {i: adapters[i].modules[name].rank for i in users})
                if progress is not None:
                    progress(start + offset + 1, len(names))
