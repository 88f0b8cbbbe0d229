"""Every merge setting with its default, in one frozen object (STYLE 5)."""

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from ..errors import CoreMergeError
from .methods import METHODS, get_method

SPACES = ("core", "full", "knots")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class MergeOptions:
    """How to merge: method and its parameters, space, user weights, global scale, export rank.

    Build it with `MergeOptions.create(...)`, which fills the method's defaults and validates.
    """

    method: str = "tsv"
    space: str = "core"
    weights: Optional[tuple[float, ...]] = None
    alpha: float = 1.0
    params: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    isotropize: bool = False
    rank: Optional[int] = None
    dtype: Optional[str] = None

    @classmethod
    def create(
        cls,
        method: str = "tsv",
        space: str = "core",
        weights: Optional[Sequence[float]] = None,
        alpha: float = 1.0,
        isotropize: bool = False,
        rank: Optional[int] = None,
        dtype: Optional[str] = None,
        **params: float,
    ) -> "MergeOptions":
        """Validate the settings and fill in the method's parameter defaults.

        Raises:
            CoreMergeError: an unknown method, space or dtype, a parameter the method does not take,
                or a value out of range.
        """
        chosen = get_method(method)
        if space not in SPACES:
            raise CoreMergeError(f"--space {space}: unknown space; choose one of {', '.join(SPACES)}")
        if dtype is not None and dtype not in DTYPES:
            raise CoreMergeError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        if rank is not None and (rank != int(rank) or rank < 1):
            raise CoreMergeError(f"--rank {rank}: must be a positive integer")
        if not math.isfinite(alpha):
            raise CoreMergeError(f"--alpha {alpha}: must be a finite number")
        if weights is not None and not all(math.isfinite(w) for w in weights):
            raise CoreMergeError(f"--weights {' '.join(map(str, weights))}: must be finite numbers")
        known = {p.name: p for p in chosen.parameters}
        for name in params:
            if name not in known:
                takes = ", ".join(known) or "no parameters"
                raise CoreMergeError(f"--{name.replace('_', '-')}: method {method} does not take it (it takes {takes})")
        resolved = {name: p.validate(params.get(name, p.default)) for name, p in known.items()}
        return cls(
            method=method,
            space=space,
            weights=None if weights is None else tuple(float(w) for w in weights),
            alpha=float(alpha),
            params=MappingProxyType(resolved),
            isotropize=bool(isotropize),
            rank=None if rank is None else int(rank),
            dtype=dtype,
        )

    def weights_for(self, n_sources: int) -> tuple[float, ...]:
        """One weight per source (default 1 each)."""
        if self.weights is None:
            return (1.0,) * n_sources
        if len(self.weights) != n_sources:
            raise CoreMergeError(
                f"--weights: got {len(self.weights)} weight(s) for {n_sources} source(s); give one per source"
            )
        return self.weights

    def __reduce__(self):
        """Pickle the read-only params as a plain dict (ZeroGPU sends the options to another process)."""
        return _rebuild, (self.method, self.space, self.weights, self.alpha, dict(self.params), self.isotropize,
                          self.rank, self.dtype)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "space": self.space,
            "weights": None if self.weights is None else list(self.weights),
            "alpha": self.alpha,
            "params": dict(self.params),
            "isotropize": self.isotropize,
            "rank": self.rank,
            "dtype": self.dtype,
        }


def _rebuild(method, space, weights, alpha, params, isotropize, rank, dtype) -> MergeOptions:
    return MergeOptions(method, space, weights, alpha, MappingProxyType(params), isotropize, rank, dtype)


__all__ = ["MergeOptions", "SPACES", "DTYPES", "METHODS"]
