"""Small float64 linear-algebra helpers shared by the spaces and the methods."""

import math
from dataclasses import dataclass

import numpy
import torch

EPS64 = torch.finfo(torch.float64).eps


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Count singular values above `S_max * max(shape) * eps(float64)` (SPEC section 4)."""
    # counted in Python: a few dozen numbers, where each tensor op would cost more than the count
    values = singular_values.tolist()
    if not values or any(math.isnan(value) for value in values):  # NaN: no value is above the threshold
        return 0
    threshold = max(values) * max(shape) * EPS64
    return sum(value > threshold for value in values)


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
    p, s, zh = svd(r_l @ r_r.T)
    return q_l @ p, s, zh @ q_r.T


def polar_factor(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Closest matrix with orthonormal columns: `P @ Q^T` from `P diag Q^T = svd(matrix)`.

    Only the numerically non-null singular directions are kept: for a rank-deficient matrix the
    null ones are arbitrary (LAPACK's choice), and this keeps the result deterministic.

    Returns:
        The factor, and whether `matrix` has full column rank (only then are its columns orthonormal).
    """
    p, s, qh = svd(matrix)
    k = numerical_rank(s, tuple(matrix.shape))
    return p[:, :k] @ qh[:k], k == matrix.shape[1]


@dataclass(frozen=True)
class SingularTriplets:
    """A matrix `U diag(S) Vh` whose U has orthonormal columns and Vh orthonormal rows: its SVD, up to the
    order of S. A method that builds its result this way (TSV) spares the export an SVD of it."""

    u: torch.Tensor  # (p, K)
    s: torch.Tensor  # (K,), non-negative
    vh: torch.Tensor  # (K, q)

    def dense(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh

    def scaled(self, factor: float) -> "SingularTriplets":
        """`factor * self`, with S kept non-negative (a negative factor flips U)."""
        return SingularTriplets(self.u * (-1.0 if factor < 0 else 1.0), self.s * abs(factor), self.vh)

    def descending(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, Vh) ordered by decreasing singular value, as `svd` gives them."""
        order = torch.argsort(self.s, descending=True)
        return self.u[:, order], self.s[order], self.vh[order]


def gram(stack: torch.Tensor) -> torch.Tensor:
    """`stack^T @ stack` (R x R) of a float64 stack.

    numpy recognises the product of an array with its own transpose and calls BLAS syrk, which
    computes one triangle: half the work of torch's general product (the largest cost of a merge).
    """
    if stack.device.type != "cpu" or stack.requires_grad:
        return stack.T @ stack
    array = stack.numpy()
    return torch.from_numpy(array.T @ array)


def squared_norms(matrix: torch.Tensor, dim: int) -> numpy.ndarray:
    """Sum of squares along `dim` of a float64 CPU matrix: the squared norms of its columns (dim 0) or rows (1).

    numpy's einsum does it in one pass over the matrix; torch's column norms of a row-major matrix take 7x longer.
    """
    array = matrix.numpy()
    return numpy.einsum("ij,ij->j" if dim == 0 else "ij,ij->i", array, array)


GRAM_MAX_CONDITION = 1e4  # beyond it the Gram route loses accuracy (error ~ condition^2 * eps)


@dataclass(frozen=True)
class Basis:
    """Orthonormal columns `U = factor @ mix`, kept implicit so that no m x K product is formed early."""

    factor: torch.Tensor  # (m, R)
    mix: torch.Tensor  # (R, K)

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """`U @ x` for a small x (K, k), at the cost of one (m, R) x (R, k) product in `dtype`."""
        return self.factor.to(dtype) @ (self.mix @ x).to(dtype)

    def then(self, mix: torch.Tensor) -> "Basis":
        """The basis `U @ mix` (for a mix with orthonormal columns)."""
        return Basis(self.factor, self.mix @ mix)

    def dense(self) -> torch.Tensor:
        return self.apply(torch.eye(self.mix.shape[1], dtype=self.mix.dtype, device=self.mix.device))


def left_singular_basis(stack: torch.Tensor) -> tuple[Basis, torch.Tensor]:
    """Left singular vectors U of a tall stack (m x R) and the stack's coordinates `U^T @ stack`.

    Well-conditioned stacks use their R x R Gram matrix: with `stack^T stack = W diag(S^2) W^T`,
    `U = stack @ W @ diag(1/S)` and `U^T stack = diag(S) W^T` (cost m R^2, no m x R QR).
    Rank-deficient or ill-conditioned stacks use a reduced QR, `stack = Q Rf`, `Rf = P S Z^T`:
    `U = Q @ P` and `U^T stack = P^T Rf`.

    Returns:
        basis: U, (m, min(m, R)), ordered by decreasing singular value.
        coordinates: (min(m, R), R).
    """
    stack = float64(stack)
    m, r = stack.shape
    if r <= m:
        eigenvalues, w = torch.linalg.eigh(gram(stack))  # ascending
        smallest, largest = (math.sqrt(max(value, 0.0)) for value in eigenvalues[[0, -1]].tolist())
        if smallest * GRAM_MAX_CONDITION > largest:
            s, w = eigenvalues.flip(0).clamp(min=0).sqrt(), w.flip(1)
            return Basis(stack, w / s), s[:, None] * w.T
    q, rf = torch.linalg.qr(stack)  # (m, K), (K, R)
    p, _, _ = torch.linalg.svd(rf, full_matrices=False)  # (K, K)
    return Basis(q, p), p.T @ rf


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
