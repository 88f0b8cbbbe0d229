"""The canonical adapter: per-module metadata, with the factors read lazily from the weights file."""

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError, describe_os_error

UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class TaskFactors:
    """One adapter's canonical factors for one module: `dW_t = b @ a` (SPEC section 1)."""

    a: torch.Tensor  # (r, n), A~
    b: torch.Tensor  # (m, r), B~ = s * B @ W
    weight: float = 1.0
    source: str = ""  # the adapter it comes from, for messages
    known_bound: Optional[float] = field(default=None, repr=False)  # norm_bound, if the reader computed it

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @cached_property
    def norm_bound(self) -> float:
        """An upper bound of ||b @ a||_F: ||b||_F ||a||_F (computed once: the checks and the noise floor share it)."""
        if self.known_bound is not None:
            return self.known_bound
        return float(torch.linalg.vector_norm(self.b) * torch.linalg.vector_norm(self.a))


@dataclass(frozen=True)
class TaskStacks:
    """One module's factors of all its tasks, read into two float64 tensors: `a` (R, n) = [A~_1; ...; A~_T] and
    `b` (m, R) = [B~_1 ... B~_T]; each task's own `a` and `b` are views of them, so no space concatenates them."""

    a: torch.Tensor
    b: torch.Tensor


Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ModuleSpec:
    """Where one module's LoRA factors are, and how to fold them into canonical form."""

    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear", "embedding" or "conv"
    rank: int
    scaling: float  # s = alpha / r, or alpha / sqrt(r) with rsLoRA
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]  # as stored (conv kernels keep their 4-D shape)
    b_shape: tuple[int, ...]
    mixer_key: Optional[str] = None  # MoSLoRA's r x r lora_AB
    # A LoRA of a fused projection split onto separate modules (kohya's qkv onto q / k / v): the rows of the
    # file's B (and columns of its A) that belong to this module, as [start, stop) ranges; None: all of them.
    b_rows: Optional[Ranges] = None
    a_columns: Optional[Ranges] = None

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the flattened update dW = B~ @ A~."""
        return self.b_shape[0], _prod(self.a_shape[1:])


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


class TensorReader(Protocol):
    def get_tensor(self, key: str) -> torch.Tensor: ...

    def get_slice(self, key: str): ...  # indexable like the tensor, reading only what is indexed


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter's metadata; the tensors stay in the file until a module is read."""

    source: str
    weights_path: Path
    format: str  # "peft", "peft-moslora", "kohya", "diffusers", "diffusers-old"; Flux also "comfyui", "xlabs", ...
    base_model: Optional[str]
    modules: dict[str, ModuleSpec]
    dtype: torch.dtype
    nbytes: int
    config: dict = field(default_factory=dict)
    revision: Optional[str] = None
    origin: str = "local"
    ignored_keys: tuple[str, ...] = ()
    family: Optional[str] = None  # diffusion LoRAs: the model family (diffusion_family: SDXL, Flux.1, ...); else None

    @property
    def ranks(self) -> dict[str, int]:
        return {name: spec.rank for name, spec in self.modules.items()}

    @contextmanager
    def open(self) -> Iterator[TensorReader]:
        """Open the weights file for reading; closing it releases its memory map."""
        if self.weights_path.suffix == ".safetensors":
            with safe_open(self.weights_path, framework="pt") as handle:
                yield handle
        else:
            yield _DictReader(load_pickled_state_dict(self.source, self.weights_path))

    def read_stored(self, reader: TensorReader, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One module's A (r x n) and B (m x r) as stored (B @ W in float64 for MoSLoRA), and its scaling s."""
        spec = self.modules[name]
        a = self._read(reader, spec.a_key, columns=spec.a_columns).reshape(spec.rank, -1)
        b = self._read(reader, spec.b_key, rows=spec.b_rows).reshape(spec.b_shape[0], spec.rank)
        if spec.mixer_key is not None:  # MoSLoRA: B @ W
            b = b.to(torch.float64) @ self._read(reader, spec.mixer_key).to(torch.float64)
        return a, b, spec.scaling

    def read_factors(self, reader: TensorReader, name: str, weight: float = 1.0) -> TaskFactors:
        """Canonical factors of one module in float64: `A~ = A` (r x n), `B~ = s * B @ W` (m x r).

        Raises:
            AdapterFormatError: a factor that is not floating-point, holds NaN or Inf, or overflows when scaled.
        """
        a, b, scaling = self.read_stored(reader, name)
        task = TaskFactors(a=a.to(torch.float64), b=b.to(torch.float64) * scaling, weight=weight, source=self.source)
        self.check_finite(reader, name, task.norm_bound)
        return task

    def check_finite(self, reader: TensorReader, name: str, norm_bound: float) -> None:
        """A NaN or Inf entry makes the module's norm bound non-finite (it is needed anyway); only then are the
        entries looked at, to name the tensor.

        Raises:
            AdapterFormatError: naming the tensor with a NaN or Inf entry, or the B whose scaling overflows.
                Finite entries whose norms alone overflow pass: the merge's scale check refuses them.
        """
        if math.isfinite(norm_bound):
            return
        spec = self.modules[name]
        stored = ((spec.a_key, None, spec.a_columns), (spec.b_key, spec.b_rows, None), (spec.mixer_key, None, None))
        for key, rows, columns in stored:
            if key is not None and not torch.isfinite(self._read(reader, key, rows, columns)).all():
                raise AdapterFormatError(f"{self.source}: tensor {key} contains NaN or Inf values")
        _, b, scaling = self.read_stored(reader, name)
        if not torch.isfinite(b.to(torch.float64) * scaling).all():
            raise AdapterFormatError(f"{self.source}: module {name}: {spec.b_key} times its scaling "
                                     f"{spec.scaling:.3g} (alpha / r) overflows")

    def _read(self, reader: TensorReader, key: str, rows: Optional[Ranges] = None,
              columns: Optional[Ranges] = None) -> torch.Tensor:
        """A tensor as stored (or the given rows / columns of it), checked to be floating-point."""
        if rows is None and columns is None:
            tensor = reader.get_tensor(key)
        else:
            stored = reader.get_slice(key)
            parts = ([stored[start:stop] for start, stop in rows] if rows is not None
                     else [stored[:, start:stop] for start, stop in columns])
            tensor = torch.cat(parts, dim=0 if rows is not None else 1)
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{self.source}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}, "
                                     "not a floating-point LoRA factor")
        return tensor


class _DictReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get_slice(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def load_pickled_state_dict(source: str, path: Path) -> dict[str, torch.Tensor]:
    """A pickled .bin state dict, read only with `torch.load(weights_only=True)`: nothing in it is run.

    Raises:
        AdapterFormatError: an unreadable file, a pickle holding anything but tensors (torch's own advice to
            retry with weights_only=False is left out: that would run the file's code), or no {name: tensor} dict.
    """
    try:
        with open(path, "rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except OSError as error:
        raise AdapterFormatError(f"{source}: cannot read {path.name} ({describe_os_error(error)})") from error
    except Exception as error:  # noqa: BLE001 - any unpickling failure is the same user problem
        refused = UNSAFE_GLOBAL.search(str(error))
        why = f"it asks for {refused[1]}" if refused else "it is not a plain tensor pickle"
        raise AdapterFormatError(
            f"{source}: {path.name} cannot be loaded safely with torch.load(weights_only=True) ({why}); "
            "coremerge does not run pickled code: convert the adapter to .safetensors where you trust it"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdapterFormatError(f"{source}: {path.name} is not a state dict (a mapping of names to tensors)")
    return state


@dataclass(frozen=True)
class MergedModule:
    """One module of the merged adapter: `dW = lora_b @ lora_a` (flattened)."""

    name: str
    template: ModuleSpec  # kind and stored shapes, from an input adapter
    lora_a: torch.Tensor  # (k, n)
    lora_b: torch.Tensor  # (m, k)
    input_ranks: dict[int, int]  # adapter index -> rank
    exported: object = None  # what the merge driver's `export` made of it (the tensors to write), if asked

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]
