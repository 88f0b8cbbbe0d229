"""What a merge did, in numbers the report can plot: singular value spectra and subspace overlaps.

Everything here works on the LoRA factors (never an m x n matrix): for `dW = B @ A` with
`B = Q_B R_B` and `A^T = Q_A R_A`, `dW = Q_B (R_B R_A^T) Q_A^T`, so its singular values and
singular vectors come from the small r x r product `R_B R_A^T`.
"""

from dataclasses import dataclass
from typing import Sequence

import torch

from ..formats.adapter import Adapter, TaskFactors
from ..merging.linalg import numerical_rank, svd


@dataclass(frozen=True)
class UpdateSVD:
    """The thin SVD of `dW = b @ a`, numerically non-null part only: `dW = u @ diag(s) @ vh`."""

    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, n)


def update_svd(factors: TaskFactors) -> UpdateSVD:
    """SVD of a low-rank update from its factors, in float64."""
    q_b, r_b = torch.linalg.qr(factors.b.to(torch.float64) * factors.weight)  # (m, r), (r, r)
    q_a, r_a = torch.linalg.qr(factors.a.to(torch.float64).T)  # (n, r), (r, r)
    p, s, qh = svd(r_b @ r_a.T)  # (r, r)
    k = numerical_rank(s, (q_b.shape[0], q_a.shape[0]))
    return UpdateSVD(u=q_b @ p[:, :k], s=s[:k], vh=qh[:k] @ q_a.T)


def subspace_overlap(first: UpdateSVD, second: UpdateSVD) -> float:
    """How much two updates share directions, in [0, 1]: the mean of the squared cosines of the
    principal angles between their output spaces and between their input spaces.

    `||U_1^T U_2||_F^2 / min(k_1, k_2)` is 1 when one space contains the other and 0 when they are orthogonal.
    """
    smaller = min(len(first.s), len(second.s))
    if smaller == 0:
        return 0.0
    outputs = torch.linalg.matrix_norm(first.u.T @ second.u) ** 2
    inputs = torch.linalg.matrix_norm(first.vh @ second.vh.T) ** 2
    return float((outputs + inputs) / (2 * smaller))


def read_svds(adapter: Adapter, names: Sequence[str], weight: float = 1.0) -> dict[str, UpdateSVD]:
    """The SVD of each named module's update of one adapter (modules it does not adapt are left out)."""
    with adapter.open() as reader:
        return {name: update_svd(adapter.read_factors(reader, name, weight))
                for name in names if name in adapter.modules}


@dataclass(frozen=True)
class MergeInsights:
    """The two pictures of a merge: spectra in its largest module, and pairwise subspace overlaps."""

    module: str  # the module whose spectra are shown: the one with the largest merged update
    merged_spectrum: list[float]
    input_spectra: list[list[float]]  # one per input adapter (empty if it does not adapt `module`)
    overlap: list[list[float]]  # T x T, averaged over the modules both adapters adapt


def merge_insights(inputs: Sequence[Adapter], merged: Adapter, weights: Sequence[float]) -> MergeInsights:
    """Spectra and overlaps of the (weighted) input adapters and the merged one."""
    names = sorted(merged.modules)
    merged_svds = read_svds(merged, names)
    module = max(names, key=lambda name: float(torch.linalg.vector_norm(merged_svds[name].s)))
    input_svds = [read_svds(adapter, names, weight) for adapter, weight in zip(inputs, weights)]

    overlap = [[0.0] * len(inputs) for _ in inputs]
    for i, first in enumerate(input_svds):
        for j in range(i, len(input_svds)):  # symmetric
            second = input_svds[j]
            values = [subspace_overlap(first[name], second[name]) for name in first if name in second]
            overlap[i][j] = overlap[j][i] = sum(values) / len(values) if values else 0.0
    return MergeInsights(
        module=module,
        merged_spectrum=merged_svds[module].s.tolist(),
        input_spectra=[svds[module].s.tolist() if module in svds else [] for svds in input_svds],
        overlap=overlap,
    )
