"""Merge methods on hand-made matrices: hand-computed values, counts and invariants."""

import math

import numpy as np
import pytest
import torch

from coremerge import METHODS, CoreMergeError, MergeOptions
from coremerge.merging.linalg import SingularTriplets
from coremerge.merging.methods import (dare, dare_ties, elect_sign, iso_c, iso_cts, magnitude_trim, ties, tsv,
                                      tsv_triplets)


def test_ties_hand_example():
    x1 = torch.tensor([[3.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    x2 = torch.tensor([[-4.0, -2.0, 1.0, 0.1]], dtype=torch.float64)
    x3 = torch.tensor([[2.0, 0.2, -3.0, 1.0]], dtype=torch.float64)
    # density 0.5, d = 4: k = 4 - 2 = 2, keep |x| >= 2nd smallest |x| (3 entries each)
    # trimmed: x1 [3, -1, 0, 2], x2 [-4, -2, 1, 0], x3 [2, 0, -3, 1]
    # signs of the sums [1, -3, -2, 3] -> [+, -, -, +]
    # disjoint means: [(3+2)/2, (-1-2)/2, -3/1, (2+1)/2]
    merged = ties([x1, x2, x3], density=0.5)
    torch.testing.assert_close(merged, torch.tensor([[2.5, -1.5, -3.0, 1.5]], dtype=torch.float64))


def test_sign_election_breaks_zero_ties_with_the_total_sign():
    stacked = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 1.0, 0.0]])
    # sums [0, 3, -1] -> signs [0, +, -]; sum of signs 0 -> the zero stays zero
    assert elect_sign(stacked).tolist() == [0.0, 1.0, -1.0]
    stacked = torch.tensor([[1.0, 2.0, 1.0], [-1.0, 1.0, 0.0]])
    assert elect_sign(stacked).tolist() == [1.0, 1.0, 1.0]  # total sign + fills the zero


@pytest.mark.parametrize("density", [0.1, 0.2, 0.37, 0.5, 0.9])
def test_magnitude_trim_keeps_floor_d_density_plus_one(density):
    """k = d - floor(d * density), keep |x| >= k-th smallest: floor(d * density) + 1 entries (distinct |x|)."""
    stacked = torch.randperm(200, generator=torch.Generator().manual_seed(1)).double().reshape(2, 10, 10) + 1
    kept = (magnitude_trim(stacked, density) != 0).reshape(2, -1).sum(dim=1)
    assert kept.tolist() == [math.floor(100 * density) + 1] * 2


def test_density_one_keeps_everything():
    stacked = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(magnitude_trim(stacked, 1.0), stacked)


def test_dare_is_seeded_and_keeps_density():
    items = [torch.randn(60, 50, dtype=torch.float64) for _ in range(3)]
    first = dare(items, 0.3, torch.Generator().manual_seed(7))
    again = dare(items, 0.3, torch.Generator().manual_seed(7))
    other = dare(items, 0.3, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    single = dare(items[:1], 0.3, torch.Generator().manual_seed(7))
    kept = single != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(single[kept], items[0][kept] / 0.3)  # survivors rescaled by 1/density


def test_dare_ties_is_seeded_and_elects_signs():
    items = [torch.randn(20, 20, dtype=torch.float64) for _ in range(3)]
    first = dare_ties(items, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, dare_ties(items, 0.5, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    # with density 1 nothing is dropped: plain sign election + disjoint mean
    full = dare_ties(items, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(full, ties(items, 1.0))


def reference_tsv(items, ranks):
    """An independent numpy TSV following SPEC 4 (for comparison only)."""
    d, total = min(items[0].shape), sum(ranks)
    us, ss, vs = [], [], []
    for x, r in zip(items, ranks):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        numerical = int((s > s.max() * max(x.shape) * np.finfo(np.float64).eps).sum())
        k = min(numerical, d * r // total)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    def polar(m):
        p, _, qt = np.linalg.svd(m, full_matrices=False)
        return p @ qt
    return polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


def test_tsv_matches_independent_reference_with_unequal_ranks():
    g = torch.Generator().manual_seed(0)
    ranks = [2, 5, 3]
    items = [torch.randn(30, r, generator=g, dtype=torch.float64) @ torch.randn(r, 20, generator=g, dtype=torch.float64)
             for r in ranks]
    expected = reference_tsv([x.numpy() for x in items], ranks)
    torch.testing.assert_close(tsv(items, ranks), torch.from_numpy(expected))


def test_tsv_from_factors_matches_the_same_reference():
    """Core space hands TSV each item's factors X_t = L_t R_t^T: the per-task SVDs come from them, same result."""
    g = torch.Generator().manual_seed(1)
    ranks = [2, 5, 3]
    factors = [(torch.randn(30, r, generator=g, dtype=torch.float64), torch.randn(20, r, generator=g, dtype=torch.float64))
               for r in ranks]
    items = [left @ right.T for left, right in factors]
    expected = torch.from_numpy(reference_tsv([x.numpy() for x in items], ranks))
    torch.testing.assert_close(tsv(items, ranks, factors), expected)


def test_tsv_triplets_are_an_svd_of_the_same_merge():
    """With full-rank concatenations TSV's U_perp and V_perp are orthonormal: its triplets are the SVD (up to order)
    of the same matrix, which the export then uses instead of a new SVD."""
    g = torch.Generator().manual_seed(2)
    ranks = [2, 5, 3]
    factors = [(torch.randn(30, r, generator=g, dtype=torch.float64),
                torch.randn(20, r, generator=g, dtype=torch.float64)) for r in ranks]
    items = [left @ right.T for left, right in factors]
    triplets = tsv_triplets(items, ranks, factors)
    assert isinstance(triplets, SingularTriplets)
    k = triplets.s.numel()
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(triplets.u.T @ triplets.u, eye, atol=1e-13, rtol=0)
    torch.testing.assert_close(triplets.vh @ triplets.vh.T, eye, atol=1e-13, rtol=0)
    expected = torch.from_numpy(reference_tsv([x.numpy() for x in items], ranks))
    torch.testing.assert_close(triplets.dense(), expected)
    _, s, _ = triplets.descending()
    torch.testing.assert_close(s, torch.linalg.svdvals(expected)[:k])


def test_tsv_with_a_rank_deficient_concatenation_gives_the_matrix():
    """Two identical tasks X = U S V^T: the concatenation [U, U] = U [I, I] has rank 4 of 8, its polar factor
    (null directions dropped) is U [I, I] / sqrt(2), not orthonormal, so no triplets; the merge is then
    U [I, I] / sqrt(2) diag(S, S) [I; I] V^T / sqrt(2) = X."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 20, generator=g, dtype=torch.float64)
    merged = tsv_triplets([x, x], [4, 4])
    assert isinstance(merged, torch.Tensor)
    torch.testing.assert_close(merged, x, rtol=0, atol=1e-12)


def test_iso_c_flattens_the_spectrum():
    g = torch.Generator().manual_seed(0)
    items = [torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g, dtype=torch.float64)
             for _ in range(2)]
    s_sum = torch.linalg.svdvals(items[0] + items[1])
    s = torch.linalg.svdvals(iso_c(items))
    torch.testing.assert_close(s[:6], s_sum[:6].mean().expand(6))
    assert s[6:].abs().max() < 1e-12


def test_iso_cts_keeps_numerical_rank_with_a_flat_spectrum():
    g = torch.Generator().manual_seed(0)
    items = [torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g, dtype=torch.float64)
             for _ in range(3)]
    s = torch.linalg.svdvals(iso_cts(items, common_fraction=0.8))
    # D' = 12, k_c = 12 - 3 * round((12 - 9) / 3) = 9, per task 1: 12 directions with one value
    assert int((s > 1e-9).sum()) == 12
    torch.testing.assert_close(s[:12], s[:12].mean().expand(12))


def test_registry_drives_options():
    for method in METHODS.values():
        assert method.paper_url.startswith("https://arxiv.org/abs/")
        options = MergeOptions.create(method=method.name)
        assert dict(options.params) == method.defaults()
    assert MergeOptions.create(method="ties").params["density"] == 0.2
    assert MergeOptions.create(method="dare").params["density"] == 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nope"}, "--method nope: unknown method; choose one of ta, ties, dare"),
    ({"method": "ties", "density": 0.0}, "--density 0.0: must be a number in (0, 1]"),
    ({"method": "ties", "density": 1.5}, "--density 1.5: must be a number in (0, 1]"),
    ({"method": "tsv", "density": 0.5}, "--density: method tsv does not take it (it takes no parameters)"),
    ({"method": "tsv", "space": "mars"}, "--space mars: unknown space; choose one of core, full, knots"),
    ({"method": "tsv", "rank": 0}, "--rank 0: must be a positive integer"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(CoreMergeError) as error:
        MergeOptions.create(**kwargs)
    assert str(error.value).startswith(message)
