"""Small float64 linear-algebra helpers shared by the spaces and the methods."""

import torch

EPS64 = torch.finfo(torch.float64).eps


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Count singular values above `S_max * max(shape) * eps(float64)` (SPEC section 4)."""
    if singular_values.numel() == 0:
        return 0
    threshold = singular_values.max() * max(shape) * EPS64
    return int((singular_values > threshold).sum())


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64: `matrix = U @ diag(S) @ Vh`."""
    return torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Closest matrix with orthonormal columns: `P @ Q^T` from `P diag Q^T = svd(matrix)`.

    Only the numerically non-null singular directions are kept: for a rank-deficient matrix the
    null ones are arbitrary (LAPACK's choice), and this keeps the result deterministic.
    """
    p, s, qh = svd(matrix)
    k = numerical_rank(s, tuple(matrix.shape))
    return p[:, :k] @ qh[:k]


def left_singular_basis(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of a tall stack (m x R) without an m x m or m x n product.

    With `stack = Q @ Rf` (reduced QR) and `Rf = P S Z^T`, the left singular vectors are
    `Q @ P`, and `(Q @ P)^T @ stack = P^T @ Rf` comes for free.

    Returns:
        basis: (m, min(m, R)) orthonormal columns, ordered by singular value.
        coordinates: (min(m, R), R), the stack expressed in that basis.
    """
    q, r = torch.linalg.qr(stack.to(torch.float64))  # q: (m, K), r: (K, R)
    p, _, _ = torch.linalg.svd(r, full_matrices=False)  # p: (K, K)
    return q @ p, p.T @ r


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
