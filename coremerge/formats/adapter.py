"""The canonical adapter: per-module metadata, with the factors read lazily from the weights file."""

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError


@dataclass(frozen=True)
class TaskFactors:
    """One adapter's canonical factors for one module: `dW_t = b @ a` (SPEC section 1)."""

    a: torch.Tensor  # (r, n), A~
    b: torch.Tensor  # (m, r), B~ = s * B @ W
    weight: float = 1.0

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def norm_bound(self) -> float:
        """An upper bound of ||b @ a||_F: ||b||_F ||a||_F."""
        return float(torch.linalg.vector_norm(self.b) * torch.linalg.vector_norm(self.a))


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

    def read_factors(self, reader: TensorReader, name: str, weight: float = 1.0) -> TaskFactors:
        """Canonical factors of one module: `A~ = A` (r x n), `B~ = s * B @ W` (m x r)."""
        spec = self.modules[name]
        a = self._read_float64(reader, spec.a_key, columns=spec.a_columns).reshape(spec.rank, -1)
        b = self._read_float64(reader, spec.b_key, rows=spec.b_rows).reshape(spec.b_shape[0], spec.rank)
        if spec.mixer_key is not None:
            b = b @ self._read_float64(reader, spec.mixer_key)  # MoSLoRA: B @ W
        return TaskFactors(a=a, b=spec.scaling * b, weight=weight)

    def _read_float64(self, reader: TensorReader, key: str, rows: Optional[Ranges] = None,
                       columns: Optional[Ranges] = None) -> torch.Tensor:
        """A tensor (or the given rows / columns of it) upcast exactly to float64, checked for NaN / Inf."""
        if rows is None and columns is None:
            tensor = reader.get_tensor(key)
        else:
            stored = reader.get_slice(key)
            parts = ([stored[start:stop] for start, stop in rows] if rows is not None
                     else [stored[:, start:stop] for start, stop in columns])
            tensor = torch.cat(parts, dim=0 if rows is not None else 1)
        stored_dtype, tensor = tensor.dtype, tensor.to(torch.float64)
        # One float64 sum finds any NaN / Inf of a narrower dtype (it cannot overflow: |x| < 3.5e38 per entry),
        # several times faster than an elementwise isfinite.
        finite = torch.isfinite(tensor).all() if stored_dtype == torch.float64 else torch.isfinite(tensor.sum())
        if not finite:
            raise AdapterFormatError(f"{self.source}: tensor {key} contains NaN or Inf values")
        return tensor


class _DictReader:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get_slice(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def load_pickled_state_dict(source: str, path: Path) -> dict[str, torch.Tensor]:
    """A pickled .bin state dict, read only with `torch.load(weights_only=True)`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is the same user problem
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterFormatError(
            f"{source}: {path.name} cannot be loaded safely with torch.load(weights_only=True) "
            f"({first_line}); convert it to .safetensors"
        ) from error


@dataclass(frozen=True)
class MergedModule:
    """One module of the merged adapter: `dW = lora_b @ lora_a` (flattened)."""

    name: str
    template: ModuleSpec  # kind and stored shapes, from an input adapter
    lora_a: torch.Tensor  # (k, n)
    lora_b: torch.Tensor  # (m, k)
    input_ranks: dict[int, int]  # adapter index -> rank

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]
