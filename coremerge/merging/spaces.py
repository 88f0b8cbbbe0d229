"""The spaces a module's tasks are merged in: core (SPEC 2), full and knots (SPEC 3).

Each space returns the merged update in factored form `dW = U @ core @ V^T`, with orthonormal
bases U and V, so that the export needs only a small SVD. Core space also merges a batch of
same-shaped modules at once (`merge_batch`): the same steps, each one call for all of them.
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import CoreMergeError
from ..formats.adapter import TaskFactors, TaskStacks
from .linalg import EPS64, Basis, SingularTriplets, isotropic_flatten, left_singular_basis, numerical_ranks, svd
from .methods import get_method
from .options import MergeOptions

KNOTS_THRESHOLD = 1e-5  # singular values of the concatenation kept by KnOTS


@dataclass(frozen=True)
class FactoredUpdate:
    """A merged update `left @ core @ right^T`; `None` stands for an identity. A batch's update has a leading
    module dimension in each tensor, and one noise floor per module."""

    core: torch.Tensor  # (K, J)
    left: Optional[Basis] = None  # U: (m, K), orthonormal columns
    right: Optional[Basis] = None  # V: (n, J), orthonormal columns
    noise_floor: Union[float, tuple[float, ...]] = 0.0  # singular values below it are rounding error of the inputs
    core_svd: Optional[SingularTriplets] = None  # the core's SVD, when the method built it as one

    def dense(self) -> torch.Tensor:
        """The m x n update (for tests and small modules only)."""
        out = self.core
        if self.left is not None:
            out = self.left.apply(out)
        if self.right is not None:
            out = self.right.apply(out.mT).mT
        return out


def _apply_method(items: Sequence[torch.Tensor], tasks: Sequence[TaskFactors], options: MergeOptions,
                  generators: Sequence[torch.Generator], factors: Optional[Sequence[tuple]] = None,
                  as_triplets: bool = False) -> Union[SingularTriplets, torch.Tensor]:
    """`alpha * method({w_t * X_t})`; `factors` (L_t, R_t) with X_t = L_t R_t^T, if known, speed some methods up.

    Items with a leading module dimension are a batch (`generators`: one per module): a method that does not
    take batches is called module by module. With `as_triplets`, methods that build their result as an SVD
    return it as `SingularTriplets`.
    """
    weighted = [item if task.weight == 1 else task.weight * item for task, item in zip(tasks, items)]
    if factors is not None:
        factors = [(left if task.weight == 1 else task.weight * left, right)
                   for task, (left, right) in zip(tasks, factors)]
    method = get_method(options.method)
    params, ranks = dict(options.params), [t.rank for t in tasks]
    if weighted[0].dim() == 2 or method.batched:
        merged = method(weighted, params, ranks, generators[0], factors, as_triplets)
    else:
        merged = torch.stack([
            method([x[i] for x in weighted], params, ranks, generator,
                   None if factors is None else [(left[i], right[i]) for left, right in factors])
            for i, generator in enumerate(generators)
        ])
    return merged.scaled(options.alpha) if isinstance(merged, SingularTriplets) else options.alpha * merged


def _maybe_isotropize(update: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    if not options.isotropize:
        return update
    return isotropic_flatten(update) if update.dim() == 2 else torch.stack([isotropic_flatten(u) for u in update])


def a_stack_of(tasks: Sequence[TaskFactors], stacks: Optional[TaskStacks]) -> torch.Tensor:
    """A_stack (R, n) = [A~_1; ...; A~_T] in float64: `stacks.a` if the factors were read into it, else concatenated."""
    return stacks.a if stacks is not None else torch.cat([t.a for t in tasks]).to(torch.float64)


def b_stack_of(tasks: Sequence[TaskFactors], stacks: Optional[TaskStacks]) -> torch.Tensor:
    """B_stack (m, R) = [B~_1 ... B~_T] in float64: `stacks.b` when the factors were read into it, else concatenated."""
    return stacks.b if stacks is not None else torch.cat([t.b for t in tasks], dim=1).to(torch.float64)


def core_space_merge(tasks: Sequence[TaskFactors], options: MergeOptions, generator: torch.Generator,
                     stacks: Optional[TaskStacks] = None) -> FactoredUpdate:
    """Merge in core space: the tasks' R_B x R_A core matrices in shared reference bases."""
    return _core_space(a_stack_of(tasks, stacks), b_stack_of(tasks, stacks), tasks, options, [generator])


def merge_batch(tasks: Sequence[Sequence[TaskFactors]], options: MergeOptions,
                generators: Sequence[torch.Generator], stacks: TaskStacks) -> FactoredUpdate:
    """Merge G same-shaped modules in core space at once: `stacks` holds their factors with a leading module
    dimension, a (G, R, n) and b (G, m, R); `tasks[i]` are module i's tasks (the same ranks and weights in
    every module) and `generators[i]` its randomness. Each module's result is its `merge_module` one, up to
    rounding.

    Returns:
        One update with a leading module dimension.
    Raises:
        NotUniform: the modules need different shapes on the way (TSV keeps different numbers of triplets):
            merge them one at a time.
    """
    update = _core_space(stacks.a, stacks.b, tasks[0], options, generators)
    return replace(update, noise_floor=tuple(noise_floor(module_tasks, options) for module_tasks in tasks))


def _core_space(a_stack: torch.Tensor, b_stack: torch.Tensor, tasks: Sequence[TaskFactors], options: MergeOptions,
                generators: Sequence[torch.Generator]) -> FactoredUpdate:
    """Core space on A_stack (R, n) and B_stack (m, R), or on a batch of them (leading module dimension)."""
    # Reference bases: U_ref (m, R_B) and V_ref (n, R_A), with the stacks' coordinates in them
    u_ref, b_coords = left_singular_basis(b_stack)  # b_coords = U_ref^T B_stack: (R_B, R)
    v_ref, a_coords = left_singular_basis(a_stack.mT)  # a_coords = V_ref^T A_stack^T: (R_A, R)
    # Core matrices M_t = (U_ref^T B~_t)(A~_t V_ref), never an m x n product
    bounds = torch.tensor([0] + [t.rank for t in tasks]).cumsum(0).tolist()
    factors = [(b_coords[..., lo:hi], a_coords[..., lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    cores = [left @ right.mT for left, right in factors]  # (R_B, R_A)
    merged = _apply_method(cores, tasks, options, generators, factors, as_triplets=not options.isotropize)
    if isinstance(merged, SingularTriplets):  # already an SVD: the export needs none
        return FactoredUpdate(merged.dense(), left=u_ref, right=v_ref, core_svd=merged)
    return FactoredUpdate(_maybe_isotropize(merged, options), left=u_ref, right=v_ref)


def full_space_merge(tasks: Sequence[TaskFactors], options: MergeOptions, generator: torch.Generator,
                     stacks: Optional[TaskStacks] = None) -> FactoredUpdate:
    """Merge the full m x n updates (the expensive baseline)."""
    updates = [t.b.to(torch.float64) @ t.a.to(torch.float64) for t in tasks]  # (m, n) each
    return FactoredUpdate(_maybe_isotropize(_apply_method(updates, tasks, options, [generator]), options))


def knots_merge(tasks: Sequence[TaskFactors], options: MergeOptions, generator: torch.Generator,
                stacks: Optional[TaskStacks] = None) -> FactoredUpdate:
    """KnOTS: merge the per-task right factors V_t^T of the SVD of [dW_1 | ... | dW_T].

    The concatenation equals `B_stack @ blockdiag(A~_t)`, so its SVD comes from the QR
    factors of B_stack and of each A~_t^T without forming it.
    """
    b_stack = b_stack_of(tasks, stacks)  # (m, R)
    u_b, b_coords = left_singular_basis(b_stack)  # (m, K), (K, R)
    qrs = [torch.linalg.qr(t.a.to(torch.float64).T) for t in tasks]  # A~_t^T = Q_t R_t: (n, q_t), (q_t, r_t)
    # Small matrix with the concatenation's spectrum: B_coords @ blockdiag(R_t^T)   (K, sum q_t)
    bounds = torch.tensor([0] + [t.rank for t in tasks]).cumsum(0).tolist()
    small = torch.cat([b_coords[:, lo:hi] @ r.T for (_, r), lo, hi in zip(qrs, bounds, bounds[1:])], dim=1)
    p, s, zh = svd(small)
    keep = s > KNOTS_THRESHOLD
    u, s, zh = u_b.then(p[:, keep]), s[keep], zh[keep]  # U (m, k), S (k,)
    # Per-task items V_t^T = Z_t^T Q_t^T   (k, n)
    widths = torch.tensor([0] + [q.shape[1] for q, _ in qrs]).cumsum(0).tolist()
    items = [zh[:, lo:hi] @ q.T for (q, _), lo, hi in zip(qrs, widths, widths[1:])]
    core = torch.diag(s) @ _apply_method(items, tasks, options, [generator])  # (k, n): dW = U @ core
    return FactoredUpdate(_maybe_isotropize(core, options), left=u)


SPACE_MERGES: dict[str, Callable[..., FactoredUpdate]] = {
    "core": core_space_merge,
    "full": full_space_merge,
    "knots": knots_merge,
}


def merge_module(tasks: Sequence[TaskFactors], options: MergeOptions, generator: torch.Generator,
                 stacks: Optional[TaskStacks] = None) -> FactoredUpdate:
    """Merge one module's tasks in the space the options name (`stacks`: the tasks' factors, if read stacked)."""
    update = SPACE_MERGES[options.space](tasks, options, generator, stacks)
    return replace(update, noise_floor=noise_floor(tasks, options))


SAFE_SCALE = 1e200  # float64 SVDs and products of updates up to this size stay finite


def check_finite_scale(name: str, tasks: Sequence[TaskFactors], alpha: float) -> None:
    """Refuse weights and alpha whose product with an update would overflow float64 in the merge.

    Raises:
        CoreMergeError: naming the module and the adapter.
    """
    for task in tasks:
        bound = abs(alpha) * abs(task.weight) * task.norm_bound
        if not bound <= SAFE_SCALE:
            raise CoreMergeError(
                f"{task.source or 'an adapter'}: module {name}: its update times its weight ({task.weight:g}) and "
                f"--alpha ({alpha:g}) is too large to merge (over {SAFE_SCALE:g}); use smaller weights or alpha"
            )


def noise_floor(tasks: Sequence[TaskFactors], options: MergeOptions) -> float:
    """Rounding level of the inputs: eps * max(m, n) * |alpha| * sum_t |w_t| ||B~_t||_F ||A~_t||_F.

    Without it, updates that cancel (weights w and -w) would keep their rounding noise as
    spurious rank, since the numerical rank is relative to the result's own largest value.
    """
    m, n = tasks[0].b.shape[0], tasks[0].a.shape[1]
    scale = abs(options.alpha) * sum(abs(t.weight) * t.norm_bound for t in tasks)
    return EPS64 * max(m, n) * scale


def to_lora(update: FactoredUpdate, max_rank: Optional[int] = None,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a merged update as a scaling-1 LoRA (SPEC 2, step 6): `to_loras` of one module."""
    (factors,) = to_loras(update, max_rank, dtype)
    return factors


def to_loras(update: FactoredUpdate, max_rank: Optional[int] = None,
             dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factor a merged update as a scaling-1 LoRA (SPEC 2, step 6), each module of a batched one on its own.

    With `core = P S Q^T` (the SVD the method built, `core_svd`, else one taken here):
    `lora_B = U @ P_k @ diag(S_k)`, `lora_A = Q_k^T @ V^T`, k = the
    numerical rank of `core` (ignoring values under the inputs' noise floor), or `max_rank` if that
    is smaller (truncation).

    The SVD is float64; the final tall products run in `dtype` (float32 suffices when the adapter
    is written in 16 bits: its rounding is 2^-24 against their 2^-8 or 2^-11).

    Returns:
        Per module, lora_B (m, k) and lora_A (k, n) in `dtype`; k may be 0 for a zero update.
    """
    p, s, qh = update.core_svd.descending() if update.core_svd is not None else svd(update.core)
    floors = update.noise_floor if isinstance(update.noise_floor, tuple) else (update.noise_floor,)
    above_floor = (s > torch.tensor(floors, dtype=s.dtype).reshape(*s.shape[:-1], 1)).sum(-1).reshape(-1).tolist()
    ranks = [min(rank, above) for rank, above in zip(numerical_ranks(s, tuple(update.core.shape[-2:])), above_floor)]
    if max_rank is not None:
        ranks = [min(rank, max_rank) for rank in ranks]
    k = max(ranks)  # products for the largest rank of the batch; each module keeps its first columns
    lora_b = p[..., :k] * s[..., :k].unsqueeze(-2)
    lora_a = qh[..., :k, :]
    lora_b = lora_b.to(dtype) if update.left is None else update.left.apply(lora_b, dtype)
    lora_a = lora_a.to(dtype) if update.right is None else update.right.apply(lora_a.mT, dtype).mT
    if lora_b.dim() == 2:
        return [(lora_b, lora_a)]
    return [(b[:, :rank], a[:rank]) for b, a, rank in zip(lora_b, lora_a, ranks)]
