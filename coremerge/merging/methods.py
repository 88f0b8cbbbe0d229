"""Merge methods: one small pure function each, and the registry that the CLI, app and tests read.

Every method takes same-shaped float64 matrices X_1..X_T (already multiplied by the user weights)
and returns one matrix of that shape (SPEC section 4). A method that needs the adapters' ranks or
randomness declares a `ranks` or `generator` keyword; the caller passes them only then. A method
may also declare `factors`: per task `(L_t, R_t)` with `X_t = L_t @ R_t^T` when the space knows them
(core space), else None; it must give the same result either way, only faster with them. A method whose
result is built as an SVD may register a `triplets` variant that returns it as `SingularTriplets`, which
spares the export an SVD (TSV). A method registered as `batched` also takes a batch: items of shape
(G, p, q), one slice per module, merged each on its own; the others are called module by module.
"""

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import CoreMergeError
from .linalg import (SingularTriplets, factored_svd, isotropic_flatten, low_rank_approximation, numerical_rank,
                     numerical_ranks, polar_factor, svd, uniform)

Matrices = Sequence[torch.Tensor]
Factors = Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]]


# ---------------------------------------------------------------- shared parts (STYLE 3)


def magnitude_trim(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Per task, keep the entries with |x| >= the k-th smallest |x|, k = d - floor(d * density).

    Args:
        stacked: (T, ...) one slice per task.
        density: fraction kept, in (0, 1]; 1 keeps everything.
    Returns:
        A new (T, ...) tensor with the trimmed entries set to zero.
    """
    flat = stacked.reshape(stacked.shape[0], -1)  # (T, d)
    d = flat.shape[1]
    k = d - math.floor(d * density)
    if k == 0:
        return stacked.clone()
    threshold = flat.abs().kthvalue(k, dim=1, keepdim=True).values  # (T, 1)
    return torch.where(flat.abs() >= threshold, flat, 0.0).reshape(stacked.shape)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """Sign of the summed tasks; entries where it is zero take the sign of its total."""
    sign = torch.sign(stacked.sum(dim=0))
    return torch.where(sign == 0, torch.sign(sign.sum()), sign)


def disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over tasks whose value is non-zero and has the elected sign (0 where none)."""
    agrees = (stacked != 0) & (torch.sign(stacked) == sign)
    kept_sum = torch.where(agrees, stacked, 0.0).sum(dim=0)
    return kept_sum / agrees.sum(dim=0).clamp(min=1)


def dare_drop_and_rescale(matrix: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (Bernoulli) and divide the kept ones by `density`."""
    # drawn on the CPU generator, then moved: the same seed gives the same mask on any device
    keep = (torch.rand(matrix.shape, generator=generator, dtype=torch.float64) < density).to(matrix.device)
    return torch.where(keep, matrix, 0.0) / density


def truncated_triplets(matrix: torch.Tensor, limit: int,
                       factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, ...]:
    """Top `min(limit, numerical rank)` singular triplets of `matrix`: (U_k, S_k, Vh_k).

    With `factors` (L, R), `matrix = L @ R^T`, the SVD comes from them (cost (p + q) r^2, not p q min(p, q)).

    Raises:
        NotUniform: the matrices of a batch keep different numbers of triplets.
    """
    u, s, vh = svd(matrix) if factors is None else factored_svd(*factors)
    k = uniform([min(limit, rank) for rank in numerical_ranks(s, tuple(matrix.shape[-2:]))])
    return u[..., :k], s[..., :k], vh[..., :k, :]


def orthogonalized_sum(us: Matrices, ss: Matrices,
                       vhs: Matrices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Concatenate triplets and replace U and V by their polar factors: (U_perp, S, Vh_perp, orthonormal).

    `orthonormal`: both concatenations had full rank, so U_perp and Vh_perp are orthonormal (and the triplets
    are an SVD of the result, up to order); otherwise their null directions were dropped.
    """
    u, u_full_rank = polar_factor(torch.cat(list(us), dim=-1))  # (m, K)
    v, v_full_rank = polar_factor(torch.cat(list(vhs), dim=-2).mT)  # (n, K)
    return u, torch.cat(list(ss), dim=-1), v.mT, u_full_rank and v_full_rank


# ---------------------------------------------------------------- methods


def task_arithmetic(items: Matrices) -> torch.Tensor:
    """Task arithmetic: the sum of the task matrices.

    Args:
        items: T same-shaped matrices.
    Returns:
        `sum_t X_t`.
    """
    return torch.stack(list(items)).sum(dim=0)


def ties(items: Matrices, density: float) -> torch.Tensor:
    """TIES-merging: trim by magnitude, elect a sign per entry, average the agreeing tasks.

    Args:
        items: T same-shaped matrices.
        density: fraction of entries each task keeps.
    Returns:
        The disjoint mean of the trimmed tasks.
    """
    # Trim
    trimmed = magnitude_trim(torch.stack(list(items)), density)
    # Elect sign
    sign = elect_sign(trimmed)
    # Disjoint merge
    return disjoint_mean(trimmed, sign)


def dare(items: Matrices, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries at random, rescale the survivors by 1/density, then sum.

    Args:
        items: T same-shaped matrices.
        density: keep probability of each entry.
        generator: the seeded source of randomness.
    Returns:
        `sum_t X_t * Bernoulli(density) / density`.
    """
    return torch.stack([dare_drop_and_rescale(x, density, generator) for x in items]).sum(dim=0)


def dare_ties(items: Matrices, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE-TIES: the DARE random drop and rescale, then TIES's sign election and disjoint mean.

    Args:
        items: T same-shaped matrices.
        density: keep probability of each entry.
        generator: the seeded source of randomness.
    Returns:
        The disjoint mean of the randomly trimmed tasks.
    """
    # Random trim and rescale
    dropped = torch.stack([dare_drop_and_rescale(x, density, generator) for x in items])
    # Elect sign
    sign = elect_sign(dropped)
    # Disjoint merge
    return disjoint_mean(dropped, sign)


def tsv(items: Matrices, ranks: Sequence[int], factors: Factors = None) -> torch.Tensor:
    """Task Singular Vectors (TSV-Merge): each task's top singular triplets, decorrelated.

    Args:
        items: T same-shaped matrices.
        ranks: the adapters' LoRA ranks r_t, which set each task's share of the D directions.
        factors: optional low-rank factors of the items, for cheaper per-task SVDs.
    Returns:
        `U_perp diag(S) V_perp^T` of the concatenated truncated triplets.
    """
    merged = tsv_triplets(items, ranks, factors)
    if isinstance(merged, SingularTriplets):
        return merged.dense()
    return merged


def tsv_triplets(items: Matrices, ranks: Sequence[int],
                 factors: Factors = None) -> Union[SingularTriplets, torch.Tensor]:
    """TSV-Merge as `SingularTriplets` (U_perp, S, V_perp^T) when the polar factors are orthonormal, else
    (a rank-deficient concatenation, or no triplet at all) as the matrix `tsv` returns."""
    d = min(items[0].shape[-2:])
    total_rank = sum(ranks)
    # Per task: keep the top k_t = min(numerical rank, floor(D * r_t / R)) triplets
    triplets = [truncated_triplets(x, math.floor(d * r / total_rank), f)
                for x, r, f in zip(items, ranks, factors or [None] * len(items))]
    us, ss, vhs = zip(*triplets)
    if sum(s.shape[-1] for s in ss) == 0:
        return torch.zeros_like(items[0])
    # Concatenate and decorrelate with the polar factors
    u, s, vh, orthonormal = orthogonalized_sum(us, ss, vhs)
    triplets = SingularTriplets(u, s, vh)
    return triplets if orthonormal else triplets.dense()


def iso_c(items: Matrices) -> torch.Tensor:
    """Iso-C: the sum of the tasks with an isotropic (flat) spectrum.

    Args:
        items: T same-shaped matrices.
    Returns:
        The task sum with its non-zero singular values set to their mean.
    """
    return isotropic_flatten(task_arithmetic(items))


def iso_cts(items: Matrices, common_fraction: float) -> torch.Tensor:
    """Iso-CTS: a common subspace of the task sum plus task-specific directions, flat spectrum.

    Args:
        items: T same-shaped matrices.
        common_fraction: share of the directions taken from the common subspace.
    Returns:
        `mean(S) * U_perp V_perp^T` over the common and task-specific triplets.
    """
    total = task_arithmetic(items)
    u, s, vh = svd(total)
    n_tasks = len(items)
    d = numerical_rank(s, tuple(total.shape))
    if d == 0:
        return torch.zeros_like(total)
    # Common size k_c and per-task size (clamped at zero for very small fractions)
    common = max(0, d - n_tasks * round((d - math.floor(common_fraction * d)) / n_tasks))
    per_task = (d - common) // n_tasks
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    # Task-specific directions: project the common left space out, keep the top triplets
    u_common = u[:, :common]
    for x in items:
        residual = x - u_common @ (u_common.T @ x)
        u_t, s_t, vh_t = truncated_triplets(residual, per_task)
        us.append(u_t), ss.append(s_t), vhs.append(vh_t)
    u_perp, s_all, vh_perp, _ = orthogonalized_sum(us, ss, vhs)
    # Isotropic spectrum: every kept singular value becomes their mean
    return s_all.mean() * (u_perp @ vh_perp)


def cart(items: Matrices, rank_fraction: float, cart_lambda: float) -> torch.Tensor:
    """CART: the average plus a scaled sum of low-rank approximations of the centred tasks.

    Args:
        items: T same-shaped matrices.
        rank_fraction: rank of each centred task's approximation as a fraction of D = min(shape).
        cart_lambda: the scale of the centred low-rank terms.
    Returns:
        `avg + lambda * sum_t LR_k(X_t - avg)`, k = ceil(rank_fraction * D).
    """
    stacked = torch.stack(list(items))
    average = stacked.mean(dim=0)
    k = math.ceil(rank_fraction * min(average.shape))
    return average + cart_lambda * sum(low_rank_approximation(x - average, k) for x in stacked)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Parameter:
    """A method's tunable parameter, with its default and valid range."""

    name: str
    default: float
    low: float
    high: float
    help: str
    kind: type = float
    low_exclusive: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: float) -> float:
        too_low = value <= self.low if self.low_exclusive else value < self.low
        if not math.isfinite(value) or too_low or value > self.high or (self.kind is int and value != int(value)):
            bracket = "(" if self.low_exclusive else "["
            raise CoreMergeError(
                f"{self.flag} {value}: must be {'an integer' if self.kind is int else 'a number'} "
                f"in {bracket}{self.low:g}, {self.high:g}]"
            )
        return self.kind(value)


@dataclass(frozen=True)
class Method:
    """A registered merge method."""

    name: str
    display_name: str
    paper_url: str
    summary: str
    function: Callable[..., torch.Tensor]
    parameters: tuple[Parameter, ...] = ()
    changes_single: bool = False  # whether one task alone comes out changed (trimmed, dropped or flattened)
    # the same merge returning `SingularTriplets` when its result is built as an SVD (else the matrix)
    triplets: Optional[Callable[..., Union[SingularTriplets, torch.Tensor]]] = None
    # whether `function` (and `triplets`) take a batch of modules (leading dimension); only for methods without
    # randomness: a batch shares one call, so it could not give each module its own generator
    batched: bool = False

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.parameters}

    def __call__(self, items: Matrices, params: dict, ranks: Sequence[int], generator: torch.Generator,
                 factors: Factors = None, as_triplets: bool = False) -> Union[SingularTriplets, torch.Tensor]:
        """The merged matrix; with `as_triplets`, its `SingularTriplets` if the method has them."""
        available = {**params, "ranks": ranks, "generator": generator, "factors": factors}
        function = self.triplets if as_triplets and self.triplets is not None else self.function
        return function(items, **{k: v for k, v in available.items() if k in keywords_of(function)})


@functools.cache
def keywords_of(function: Callable) -> frozenset[str]:
    """The parameter names of a method's function (looked up once: a merge asks for every module)."""
    return frozenset(inspect.signature(function).parameters)


def _density(default: float, meaning: str) -> Parameter:
    return Parameter("density", default, 0.0, 1.0, meaning, low_exclusive=True)


SEED = Parameter("seed", 0, 0, 2**63 - 1, "random seed of the drop mask", kind=int)

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.batched and "generator" in keywords_of(method.function):
        raise ValueError(f"method {method.name}: a batched method cannot give each module of a batch its generator")
    METHODS[method.name] = method
    return method


register(Method("ta", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                "Sum of the task updates.", task_arithmetic, batched=True))
register(Method("ties", "TIES", "https://arxiv.org/abs/2306.01708",
                "Trim small entries, elect a sign per entry, average the agreeing tasks.", ties,
                (_density(0.2, "fraction of entries each task keeps"),), changes_single=True))
register(Method("dare", "DARE", "https://arxiv.org/abs/2311.03099",
                "Drop entries at random, rescale the rest, sum.", dare,
                (_density(0.9, "probability of keeping each entry"), SEED), changes_single=True))
register(Method("dare_ties", "DARE-TIES", "https://arxiv.org/abs/2311.03099",
                "DARE's random drop, then TIES's sign election and disjoint mean.", dare_ties,
                (_density(0.9, "probability of keeping each entry"), SEED), changes_single=True))
register(Method("tsv", "TSV-Merge", "https://arxiv.org/abs/2412.00081",
                "Each task's top singular directions, decorrelated (polar factors).", tsv, triplets=tsv_triplets,
                batched=True))
register(Method("iso_c", "Iso-C", "https://arxiv.org/abs/2502.04959",
                "Task sum with a flat (isotropic) spectrum.", iso_c, changes_single=True))
register(Method("iso_cts", "Iso-CTS", "https://arxiv.org/abs/2502.04959",
                "Common plus task-specific directions, flat spectrum.", iso_cts,
                (Parameter("common_fraction", 0.8, 0.0, 1.0, "share of directions from the common subspace"),),
                changes_single=True))
register(Method("cart", "CART", "https://arxiv.org/abs/2412.12153",
                "Average plus a scaled low-rank sum of the centred tasks.", cart,
                (Parameter("rank_fraction", 0.04, 0.0, 1.0, "rank of each centred term as a fraction of min(shape)",
                           low_exclusive=True),
                 Parameter("cart_lambda", 0.1, 0.0, 1e6, "scale of the centred low-rank terms"))))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CoreMergeError(f"--method {name}: unknown method; choose one of {', '.join(METHODS)}")
    return METHODS[name]
