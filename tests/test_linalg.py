"""The reference bases: both routes (Gram and QR) give the stack's left singular vectors."""

import pytest
import torch

from coremerge.merging.linalg import (GRAM_MAX_CONDITION, NotUniform, SingularTriplets, factored_svd, gram,
                                     left_singular_basis, numerical_rank, numerical_ranks, polar_factor, uniform)


def stack_with_condition(condition: float, m: int = 300, r: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), r, dtype=torch.float64)
    return u @ torch.diag(s) @ w.T


@pytest.mark.parametrize("condition", [10.0, 1e3, 1e8])  # Gram, Gram, QR route
def test_basis_is_the_left_singular_basis(condition):
    stack = stack_with_condition(condition)
    basis, coordinates = left_singular_basis(stack)
    u = basis.dense()
    assert (basis.factor is stack) == (condition < GRAM_MAX_CONDITION)  # which route was taken
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(u @ coordinates, stack, atol=1e-12, rtol=0)
    # same singular vectors as an SVD, up to sign
    reference, s, _ = torch.linalg.svd(stack, full_matrices=False)
    torch.testing.assert_close((reference.T @ u).abs().diagonal(), torch.ones(u.shape[1], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(coordinates), s)


def test_rank_deficient_and_wide_stacks_use_qr():
    b = torch.randn(50, 3, dtype=torch.float64)
    basis, coordinates = left_singular_basis(torch.cat([b, b], dim=1))  # rank 3 of 6
    assert basis.factor.shape == (50, 6) and numerical_rank(torch.linalg.svdvals(coordinates), (50, 6)) == 3
    wide = torch.randn(10, 25, dtype=torch.float64)
    basis, coordinates = left_singular_basis(wide)
    assert coordinates.shape == (10, 25)
    torch.testing.assert_close(basis.dense() @ coordinates, wide)


def test_polar_factor_ignores_null_directions():
    u = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))[0]
    duplicated = torch.cat([u, -u], dim=1)  # rank 3: [U, -U] = U [I, -I]
    expected = u @ torch.cat([torch.eye(3), -torch.eye(3)], dim=1).double() / 2 ** 0.5
    factor, full_rank = polar_factor(duplicated)
    torch.testing.assert_close(factor, expected)
    assert not full_rank


def test_polar_factor_of_a_full_rank_matrix_has_orthonormal_columns():
    matrix = torch.randn(20, 6, dtype=torch.float64)
    factor, full_rank = polar_factor(matrix)
    assert full_rank
    torch.testing.assert_close(factor.T @ factor, torch.eye(6, dtype=torch.float64), atol=1e-13, rtol=0)
    # the polar decomposition matrix = factor @ H with H symmetric positive definite
    h = factor.T @ matrix
    torch.testing.assert_close(h, h.T, atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(h).min() > 0


def test_gram_of_a_stack_and_of_a_transposed_view():
    stack = torch.randn(40, 7, dtype=torch.float64)
    torch.testing.assert_close(gram(stack), stack.T @ stack, atol=1e-12, rtol=0)
    wide = torch.randn(7, 40, dtype=torch.float64)
    torch.testing.assert_close(gram(wide.T), wide @ wide.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shapes", [(30, 20, 4), (30, 20, 25)])  # r small, and r above a side (QR is then wide)
def test_factored_svd_is_the_svd_of_the_product(shapes):
    p, q, r = shapes
    left, right = torch.randn(p, r, dtype=torch.float64), torch.randn(q, r, dtype=torch.float64)
    u, s, vh = factored_svd(left, right)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, left @ right.T)
    torch.testing.assert_close(s[:min(p, q, r)], torch.linalg.svdvals(left @ right.T)[:min(p, q, r)])
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64))


def test_numerical_rank_counts_values_above_s_max_times_max_shape_times_eps():
    eps = torch.finfo(torch.float64).eps
    values = torch.tensor([2.0, 2.0 * 100 * eps * 1.01, 2.0 * 100 * eps, 1e-20], dtype=torch.float64)
    assert numerical_rank(values, (100, 10)) == 2  # the value at the threshold is not above it
    assert numerical_rank(values, (10, 10)) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_numerical_rank_of_a_non_finite_spectrum_is_zero(bad):
    """As a tensor comparison gives: nothing is above a NaN or infinite threshold, wherever the value sits."""
    for values in ([bad, 1.0, 0.5], [1.0, bad, 0.5], [1.0, 0.5, bad]):
        assert numerical_rank(torch.tensor(values, dtype=torch.float64), (3, 3)) == 0


def test_numerical_rank_of_an_empty_spectrum_is_zero():
    """A module whose every task has rank 0 after truncation has no spectrum at all (a surviving mutant said 1)."""
    assert numerical_rank(torch.empty(0, dtype=torch.float64), (3, 4)) == 0


# ---------------------------------------------------------------- batches: each matrix as it would be alone


def test_a_batch_of_well_conditioned_stacks_takes_the_gram_route_and_gives_each_stacks_basis():
    batch = torch.stack([stack_with_condition(10.0), stack_with_condition(1e3), torch.randn(300, 24).double()])
    basis, coordinates = left_singular_basis(batch)
    assert basis.factor is batch
    for g, stack in enumerate(batch):
        alone, alone_coordinates = left_singular_basis(stack)
        assert alone.factor is stack  # the same route
        torch.testing.assert_close(basis.dense()[g], alone.dense(), atol=1e-12, rtol=0)
        torch.testing.assert_close(coordinates[g], alone_coordinates, atol=1e-12, rtol=0)


def test_gram_of_a_batch_and_of_its_transposed_view():
    batch = torch.randn(3, 40, 7, dtype=torch.float64)
    torch.testing.assert_close(gram(batch), batch.mT @ batch, atol=1e-12, rtol=0)
    torch.testing.assert_close(gram(batch.mT.contiguous().mT), batch.mT @ batch, atol=1e-12, rtol=0)


def test_polar_factor_of_a_batch_with_full_and_deficient_ranks_is_each_ones():
    u = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))[0]
    batch = torch.stack([torch.randn(20, 6, dtype=torch.float64), torch.cat([u, -u], dim=1)])  # ranks 6 and 3
    factor, full_rank = polar_factor(batch)
    assert not full_rank  # not every matrix
    for g, matrix in enumerate(batch):
        torch.testing.assert_close(factor[g], polar_factor(matrix)[0], atol=1e-13, rtol=0)
    factor, full_rank = polar_factor(batch[:1].expand(2, -1, -1))
    assert full_rank


def test_singular_triplets_of_a_batch_sort_each_matrix_on_its_own():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(2, 8, 4, generator=g, dtype=torch.float64))[0]
    vh = torch.linalg.qr(torch.randn(2, 6, 4, generator=g, dtype=torch.float64))[0].mT
    s = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, 0.1, 5.0, 2.0]], dtype=torch.float64)
    triplets = SingularTriplets(u, s, vh)
    ordered_u, ordered_s, ordered_vh = triplets.descending()
    for i in range(2):
        alone = SingularTriplets(u[i], s[i], vh[i])
        torch.testing.assert_close(triplets.dense()[i], alone.dense(), atol=1e-14, rtol=0)
        for batched, single in zip((ordered_u[i], ordered_s[i], ordered_vh[i]), alone.descending()):
            assert torch.equal(batched, single)
    assert ordered_s.tolist() == [[3.0, 2.0, 1.0, 0.5], [5.0, 4.0, 2.0, 0.1]]


def test_numerical_ranks_of_a_batch_and_their_uniform_value():
    spectra = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1e-20, 0.0], [float("nan"), 1.0, 1.0]], dtype=torch.float64)
    assert numerical_ranks(spectra, (3, 3)) == [2, 1, 0]
    assert uniform([4, 4, 4]) == 4
    with pytest.raises(NotUniform):
        uniform([4, 3, 4])


@pytest.mark.parametrize("condition, gram_route", [(1.0, True), (5.0, True), (9.5, True), (11.0, False), (1e6, False)])
def test_polar_factor_takes_the_gram_route_only_when_well_conditioned_and_equals_the_svd_one(
        condition, gram_route, monkeypatch):
    from coremerge.merging import linalg

    svd_calls = []
    monkeypatch.setattr(linalg, "svd", lambda matrix: svd_calls.append(matrix) or torch.linalg.svd(
        matrix, full_matrices=False))
    matrix = stack_with_condition(condition, m=40, r=12)
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    for candidate in (matrix, torch.stack([matrix, stack_with_condition(2.0, m=40, r=12)])):
        svd_calls.clear()
        factor, full_rank = polar_factor(candidate)
        assert full_rank and bool(svd_calls) != gram_route  # a batch takes the Gram route only if all may
        torch.testing.assert_close(factor if candidate.dim() == 2 else factor[0], p @ qh, atol=1e-14, rtol=0)
