"""Small float64 linear-algebra helpers shared by the spaces and the methods.

Each works on one matrix or on a batch of same-shaped matrices (leading dimensions), so that many small modules
can be merged with one call per step instead of one per module.
"""

import math
from dataclasses import dataclass

import numpy
import torch

EPS64 = torch.finfo(torch.float64).eps


class NotUniform(Exception):
    """The matrices of a batch need different shapes from here on (e.g. different numerical ranks): they are to
    be handled one at a time. Never raised for a single matrix."""


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Count singular values above `S_max * max(shape) * eps(float64)` (SPEC section 4)."""
    return _count_above_threshold(singular_values.tolist(), max(shape))


def numerical_ranks(singular_values: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """`numerical_rank` of each spectrum in a (..., K) batch (one per matrix, in order)."""
    spectra = singular_values.reshape(-1, singular_values.shape[-1]).tolist()
    return [_count_above_threshold(values, max(shape)) for values in spectra]


def _count_above_threshold(values: list[float], size: int) -> int:
    # counted in Python: a few dozen numbers, where each tensor op would cost more than the count
    if not values or any(math.isnan(value) for value in values):  # NaN: no value is above the threshold
        return 0
    threshold = max(values) * size * EPS64
    return sum(value > threshold for value in values)


def uniform(counts: list[int]) -> int:
    """The one value of per-matrix `counts`.

    Raises:
        NotUniform: the matrices of the batch have different counts.
    """
    if len(set(counts)) > 1:
        raise NotUniform(f"counts {sorted(set(counts))} differ within the batch")
    return counts[0]


def float64(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float64; itself if it already is (a merge runs thousands of these small calls: no op for nothing)."""
    return tensor if tensor.dtype == torch.float64 else tensor.to(torch.float64)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64: `matrix = U @ diag(S) @ Vh`."""
    return torch.linalg.svd(float64(matrix), full_matrices=False)


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of `left @ right^T` ((p, r) and (q, r), r small) without forming the p x q product.

    With `left = Q_l R_l` and `right = Q_r R_r` (reduced QR), `left @ right^T = Q_l (R_l R_r^T) Q_r^T`,
    so the SVD `R_l R_r^T = P diag(S) Z^T` gives `U = Q_l P` and `Vh = Z^T Q_r^T`.
    """
    q_l, r_l = torch.linalg.qr(float64(left))
    q_r, r_r = torch.linalg.qr(float64(right))
    p, s, zh = svd(r_l @ r_r.mT)
    return q_l @ p, s, zh @ q_r.mT


POLAR_GRAM_MAX_CONDITION = 10.0  # the Gram route's error grows as condition^2 * eps: here under 1e-14


def polar_factor(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Closest matrix with orthonormal columns: `P @ Q^T` from `P diag Q^T = svd(matrix)`.

    Only the numerically non-null singular directions are kept: for a rank-deficient matrix the
    null ones are arbitrary (LAPACK's choice), and this keeps the result deterministic.

    A well-conditioned matrix (every one of a batch; TSV's concatenations usually are) takes the cheaper Gram
    route: with `matrix^T matrix = W diag(L) W^T`, the factor is `matrix @ W diag(L^-1/2) W^T`.

    Returns:
        The factor, and whether `matrix` (every matrix of a batch) has full column rank (only then are its columns
        orthonormal).
    """
    matrix = float64(matrix)
    if matrix.shape[-2] >= matrix.shape[-1] > 0:
        eigenvalues, w = torch.linalg.eigh(gram(matrix))  # ascending
        if conditioned_below(eigenvalues, POLAR_GRAM_MAX_CONDITION):
            return (matrix @ w) * eigenvalues.rsqrt().unsqueeze(-2) @ w.mT, True
    p, s, qh = svd(matrix)
    ranks = numerical_ranks(s, tuple(matrix.shape[-2:]))
    if all(k == matrix.shape[-1] for k in ranks):
        return p @ qh, True
    # the null directions weigh nothing: P diag(1 for kept, 0 for null) Q^T = P_k Q_k^T
    kept = torch.arange(s.shape[-1]) < torch.tensor(ranks).reshape(*s.shape[:-1], 1)
    return (p * kept.to(p.dtype).unsqueeze(-2)) @ qh, False


@dataclass(frozen=True)
class SingularTriplets:
    """A matrix `U diag(S) Vh` whose U has orthonormal columns and Vh orthonormal rows: its SVD, up to the
    order of S. A method that builds its result this way (TSV) spares the export an SVD of it."""

    u: torch.Tensor  # (..., p, K)
    s: torch.Tensor  # (..., K), non-negative
    vh: torch.Tensor  # (..., K, q)

    def dense(self) -> torch.Tensor:
        return (self.u * self.s.unsqueeze(-2)) @ self.vh

    def scaled(self, factor: float) -> "SingularTriplets":
        """`factor * self`, with S kept non-negative (a negative factor flips U)."""
        return SingularTriplets(self.u * (-1.0 if factor < 0 else 1.0), self.s * abs(factor), self.vh)

    def descending(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, Vh) ordered by decreasing singular value, as `svd` gives them."""
        order = torch.argsort(self.s, dim=-1, descending=True)
        return (self.u.take_along_dim(order.unsqueeze(-2), dim=-1), self.s.take_along_dim(order, dim=-1),
                self.vh.take_along_dim(order.unsqueeze(-1), dim=-2))


def conditioned_below(gram_eigenvalues: torch.Tensor, limit: float) -> bool:
    """Whether every matrix of a batch (or the one matrix) has full column rank and a condition number below
    `limit`, from the ascending eigenvalues of its Gram matrix (the squares of its singular values)."""
    ends = gram_eigenvalues[..., [0, -1]].reshape(-1, 2).tolist()
    return all(smallest > 0 and smallest * limit**2 > largest for smallest, largest in ends)


def gram(stack: torch.Tensor) -> torch.Tensor:
    """`stack^T @ stack` (R x R) of a float64 stack, or of each stack in a batch.

    numpy recognises the product of an array with its own transpose and calls BLAS syrk, which
    computes one triangle: half the work of torch's general product (the largest cost of a merge).
    """
    if stack.device.type != "cpu" or stack.requires_grad:
        return stack.mT @ stack
    array = stack.numpy()
    if array.ndim == 2:
        return torch.from_numpy(array.T @ array)
    return torch.from_numpy(numpy.stack([each.T @ each for each in array.reshape(-1, *array.shape[-2:])])
                            ).reshape(*array.shape[:-2], array.shape[-1], array.shape[-1])


def squared_norms(matrix: torch.Tensor, dim: int) -> numpy.ndarray:
    """Sum of squares along `dim` of a float64 CPU matrix (or batch of matrices): the squared norms of its columns
    (dim -2) or rows (dim -1).

    numpy's einsum does it in one pass over the matrix; torch's column norms of a row-major matrix take 7x longer.
    """
    array = matrix.numpy()
    return numpy.einsum("...ij,...ij->...j" if dim == -2 else "...ij,...ij->...i", array, array)


GRAM_MAX_CONDITION = 1e4  # beyond it the Gram route loses accuracy (error ~ condition^2 * eps)


@dataclass(frozen=True)
class Basis:
    """Orthonormal columns `U = factor @ mix`, kept implicit so that no m x K product is formed early."""

    factor: torch.Tensor  # (..., m, R)
    mix: torch.Tensor  # (..., R, K)

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`U @ x` for a small x (K, k), at the cost of one (m, R) x (R, k) product in `dtype`."""
        return self.factor.to(dtype) @ (self.mix @ x).to(dtype)

    def then(self, mix: torch.Tensor) -> "Basis":
        """The basis `U @ mix` (for a mix with orthonormal columns)."""
        return Basis(self.factor, self.mix @ mix)

    def dense(self) -> torch.Tensor:
        return self.apply(torch.eye(self.mix.shape[-1], dtype=self.mix.dtype, device=self.mix.device))


def left_singular_basis(stack: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """Left singular vectors U of a tall stack (m x R) and the stack's coordinates `U^T @ stack`.

    Well-conditioned stacks use their R x R Gram matrix: with `stack^T stack = W diag(S^2) W^T`,
    `U = stack @ W @ diag(1/S)` and `U^T stack = diag(S) W^T` (cost m R^2, no m x R QR).
    Rank-deficient or ill-conditioned stacks use a reduced QR, `stack = Q Rf`, `Rf = P S Z^T`:
    `U = Q @ P` and `U^T stack = P^T Rf`.

    A batch of stacks takes the Gram route only if every stack in it is well-conditioned.

    Returns:
        basis: U, (m, min(m, R)), ordered by decreasing singular value.
        coordinates: (min(m, R), R).
    """
    stack = float64(stack)
    m, r = stack.shape[-2:]
    if r <= m:
        eigenvalues, w = torch.linalg.eigh(gram(stack))  # ascending
        if conditioned_below(eigenvalues, GRAM_MAX_CONDITION):
            s, w = eigenvalues.flip(-1).clamp(min=0).sqrt(), w.flip(-1)
            return Basis(stack, w / s.unsqueeze(-2)), s.unsqueeze(-1) * w.mT
    q, rf = torch.linalg.qr(stack)  # (m, K), (K, R)
    p, _, _ = torch.linalg.svd(rf, full_matrices=False)  # (K, K)
    return Basis(q, p), p.mT @ rf


def low_rank_approximation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation (truncated SVD)."""
    u, s, vh = svd(matrix)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def isotropic_flatten(matrix: torch.Tensor) -> torch.Tensor:
    """Keep the numerical rank k of `matrix` and set those k singular values to their mean."""
    u, s, vh = svd(matrix)
    k = numerical_rank(s, tuple(matrix.shape))
    if k == 0:
        return torch.zeros_like(matrix, dtype=torch.float64)
    return u[:, :k] @ torch.diag(s[:k].mean().expand(k)) @ vh[:k]
