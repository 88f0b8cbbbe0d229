"""Spaces on real peft adapters: lossless core space, core == full where SPEC says so, identities."""

from dataclasses import replace

import pytest
import torch

from coremerge import MergeOptions, load_adapters, merge_module, to_lora
from coremerge.merging.linalg import left_singular_basis
from coremerge.merging.merge import module_generator, module_names

KINDS = ("plain", "rslora", "pattern", "named", "moslora")  # ranks 4, 8, 4/2, 3, 4


@pytest.fixture(scope="module")
def module_tasks(adapters):
    """{module: [TaskFactors]} over adapters with different ranks, alphas and target sets."""
    loaded = load_adapters([str(adapters[k]) for k in KINDS])
    tasks = {}
    for name in module_names(loaded):
        users = [a for a in loaded if name in a.modules]
        tasks[name] = []
        for weight, adapter in zip((1.0, 0.7, -0.4, 1.3, 0.5), users):
            with adapter.open() as reader:
                tasks[name].append(adapter.read_factors(reader, name, weight))
    return tasks


def merged(tasks, name, **options):
    return merge_module(tasks, MergeOptions.create(**options), module_generator(0, name))


def test_core_space_is_lossless(module_tasks):
    """U_ref @ M_t @ V_ref^T == B~_t @ A~_t (the paper's theorem)."""
    for tasks in module_tasks.values():
        u_ref, b_coords = left_singular_basis(torch.cat([t.b for t in tasks], dim=1))
        v_ref, a_coords = left_singular_basis(torch.cat([t.a for t in tasks]).T)
        start = 0
        for task in tasks:
            cols = slice(start, start + task.rank)
            core = b_coords[:, cols] @ a_coords[:, cols].T
            torch.testing.assert_close(u_ref.dense() @ core @ v_ref.dense().T, task.b @ task.a)
            start += task.rank


@pytest.mark.parametrize("method, isotropize", [("ta", False), ("tsv", False), ("iso_c", False), ("ta", True),
                                                ("tsv", True), ("iso_cts", False)])
def test_core_equals_full_space(module_tasks, method, isotropize):
    for name, tasks in module_tasks.items():
        core = merged(tasks, name, method=method, space="core", isotropize=isotropize).dense()
        full = merged(tasks, name, method=method, space="full", isotropize=isotropize).dense()
        torch.testing.assert_close(core, full, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("space", ["core", "full", "knots"])
def test_ta_is_the_weighted_sum(module_tasks, space):
    for name, tasks in module_tasks.items():
        expected = sum(t.weight * t.b @ t.a for t in tasks)
        torch.testing.assert_close(merged(tasks, name, method="ta", space=space, alpha=0.5).dense(), 0.5 * expected)


@pytest.mark.parametrize("space", ["core", "full", "knots"])
@pytest.mark.parametrize("method", ["ta", "tsv", "iso_cts"])
def test_one_adapter_alone_returns_itself(module_tasks, space, method):
    for name, tasks in module_tasks.items():
        task = tasks[0]
        alone = merged([type(task)(task.a, task.b, 1.0)], name, method=method, space=space)
        if method == "iso_cts":  # flattens the spectrum: same subspace, not the same update
            continue
        torch.testing.assert_close(alone.dense(), task.b @ task.a)


@pytest.mark.parametrize("space", ["core", "full", "knots"])
@pytest.mark.parametrize("method", ["ta", "iso_c", "cart"])  # those linear in the sum of the tasks
def test_weights_w_and_minus_w_cancel(module_tasks, space, method):
    for name, tasks in module_tasks.items():
        task = tasks[0]
        pair = [type(task)(task.a, task.b, 1.0), type(task)(task.a, task.b, -1.0)]
        dw = merged(pair, name, method=method, space=space).dense()
        assert dw.abs().max() < 1e-12, (name, method, space)
        assert to_lora(merged(pair, name, method="ta", space=space))[0].shape[1] == 0


def test_ties_and_dare_differ_between_spaces(module_tasks):
    name, tasks = next((n, t) for n, t in module_tasks.items() if len(t) >= 3)
    for method in ("ties", "dare"):
        core = merged(tasks, name, method=method, space="core").dense()
        full = merged(tasks, name, method=method, space="full").dense()
        assert (core - full).abs().max() > 1e-3


def test_rank_truncation_is_the_best_low_rank_approximation(module_tasks):
    name, tasks = next((n, t) for n, t in module_tasks.items() if len(t) >= 3)
    update = merged(tasks, name, method="ta", space="core")
    lora_b, lora_a = to_lora(update, max_rank=3)
    assert lora_a.shape[0] == lora_b.shape[1] == 3
    u, s, vh = torch.linalg.svd(update.dense())
    torch.testing.assert_close(lora_b @ lora_a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])


@pytest.mark.parametrize("alpha, max_rank", [(1.0, None), (-0.7, None), (1.3, 3)])
def test_export_from_the_methods_triplets_equals_the_export_from_an_svd(module_tasks, alpha, max_rank):
    """TSV in core space hands its SVD to the export; a negative alpha flips U, truncation keeps the largest values."""
    name, tasks = next((n, t) for n, t in module_tasks.items() if len(t) >= 3)
    update = merged(tasks, name, method="tsv", space="core", alpha=alpha)
    assert update.core_svd is not None
    lora_b, lora_a = to_lora(update, max_rank)
    via_svd_b, via_svd_a = to_lora(replace(update, core_svd=None), max_rank)
    assert lora_a.shape == via_svd_a.shape
    torch.testing.assert_close(lora_b @ lora_a, via_svd_b @ via_svd_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(lora_b.norm(dim=0), via_svd_b.norm(dim=0), rtol=1e-10, atol=0)  # same singular values
    torch.testing.assert_close(lora_a @ lora_a.T, torch.eye(lora_a.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_exact_export_rank_is_the_numerical_rank(module_tasks):
    for name, tasks in module_tasks.items():
        lora_b, lora_a = to_lora(merged(tasks, name, method="ta", space="core"))
        assert lora_a.shape[0] == torch.linalg.matrix_rank(sum(t.weight * t.b @ t.a for t in tasks)).item()


def test_noise_floor_uses_the_larger_side_of_the_update_by_hand():
    """eps * max(m, n) * |alpha| * sum_t |w_t| ||B~_t||_F ||A~_t||_F, with m the update's rows (not the rank).

    Here m = 10, n = 3, r = 2: ||B~|| = sqrt(10 * 2 * 1) = sqrt(20), ||A~|| = sqrt(2 * 3 * 4) = sqrt(24) (entries 1 and
    2), weight -0.5 and alpha 3: floor = eps * 10 * 3 * 0.5 * sqrt(20 * 24).
    """
    from coremerge import TaskFactors
    from coremerge.merging.linalg import EPS64
    from coremerge.merging.spaces import noise_floor

    task = TaskFactors(a=torch.full((2, 3), 2.0, dtype=torch.float64), b=torch.ones(10, 2, dtype=torch.float64),
                       weight=-0.5)
    expected = EPS64 * 10 * 3 * 0.5 * (20 * 24) ** 0.5
    assert noise_floor([task], MergeOptions.create(method="ta", alpha=3.0)) == pytest.approx(expected, rel=1e-12, abs=0)
