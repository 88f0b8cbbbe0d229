"""Spectra and subspace overlaps of the merge report, against dense computations."""

import pytest
import torch

from coremerge import MergeOptions, load_adapter, load_adapters, merge_to_folder
from coremerge.comparison.insights import UpdateSVD, merge_insights, subspace_overlap, update_svd
from coremerge.merging.spaces import TaskFactors


def random_factors(m: int, n: int, r: int, seed: int, weight: float = 1.0) -> TaskFactors:
    generator = torch.Generator().manual_seed(seed)
    return TaskFactors(a=torch.randn(r, n, generator=generator, dtype=torch.float64),
                       b=torch.randn(m, r, generator=generator, dtype=torch.float64), weight=weight)


def test_update_svd_matches_the_dense_svd_and_drops_null_directions():
    factors = random_factors(40, 30, 5, seed=0, weight=-2.0)
    rank_deficient = TaskFactors(a=torch.cat([factors.a, factors.a[:1]]), b=torch.cat([factors.b, factors.b[:, :1]], 1))
    dense = factors.weight * factors.b @ factors.a
    svd = update_svd(factors)
    torch.testing.assert_close(svd.s, torch.linalg.svdvals(dense)[:5])
    torch.testing.assert_close(svd.u @ torch.diag(svd.s) @ svd.vh, dense)
    assert len(update_svd(rank_deficient).s) == 5  # a repeated direction adds nothing


def test_subspace_overlap_is_one_for_the_same_space_and_zero_for_orthogonal_ones():
    factors = random_factors(40, 30, 4, seed=1)
    svd = update_svd(factors)
    assert subspace_overlap(svd, svd) == pytest.approx(1.0)
    assert subspace_overlap(svd, update_svd(TaskFactors(a=3 * factors.a, b=factors.b))) == pytest.approx(1.0)
    eye_m, eye_n = torch.eye(40, dtype=torch.float64), torch.eye(30, dtype=torch.float64)
    first = UpdateSVD(eye_m[:, :4], torch.ones(4, dtype=torch.float64), eye_n[:4])
    second = UpdateSVD(eye_m[:, 4:8], torch.ones(4, dtype=torch.float64), eye_n[4:8])
    half = UpdateSVD(eye_m[:, 2:6], torch.ones(4, dtype=torch.float64), eye_n[:4])  # half the outputs, all inputs
    assert subspace_overlap(first, second) == 0.0
    assert subspace_overlap(first, half) == pytest.approx(0.75)


def test_merge_insights_of_real_adapters(adapters, tmp_path):
    sources = [str(adapters["plain"]), str(adapters["pattern"])]
    merge_to_folder(sources, MergeOptions.create(method="ta", weights=[1.0, 0.5]), tmp_path / "merged")
    inputs, merged = load_adapters(sources), load_adapter(str(tmp_path / "merged"))
    insights = merge_insights(inputs, merged, [1.0, 0.5])

    def dense(adapter, name, weight=1.0):
        with adapter.open() as reader:
            factors = adapter.read_factors(reader, name, weight)
        return factors.weight * factors.b @ factors.a

    norms = {name: torch.linalg.matrix_norm(dense(merged, name)) for name in merged.modules}
    assert insights.module == max(norms, key=norms.get)
    torch.testing.assert_close(torch.tensor(insights.merged_spectrum, dtype=torch.float64),
                               torch.linalg.svdvals(dense(merged, insights.module))[:len(insights.merged_spectrum)])
    expected = torch.linalg.svdvals(dense(inputs[1], insights.module, 0.5))[:len(insights.input_spectra[1])]
    torch.testing.assert_close(torch.tensor(insights.input_spectra[1], dtype=torch.float64), expected)
    assert insights.overlap[0][0] == pytest.approx(1.0) and insights.overlap[1][1] == pytest.approx(1.0)
    assert insights.overlap[0][1] == insights.overlap[1][0] and 0 < insights.overlap[0][1] < 1
