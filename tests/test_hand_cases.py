"""Each method on matrices small enough to merge on paper (2 x 2, 3 x 2, one 4 x 4), the arithmetic alongside.

Each case is checked on coremerge's registered method and on the independent reference (tests/reference_merge.py).
"""

import math

import numpy as np
import pytest
import torch

from coremerge import METHODS

import reference_merge as ref

R2 = math.sqrt(2)


def mat(rows):
    return np.array(rows, dtype=np.float64)


def both(method, items, params=None, ranks=None, seed=0):
    """(coremerge's answer, the reference's answer) for numpy items."""
    params = {**ref.DEFAULTS[method], **(params or {})}
    ranks = ranks or [1] * len(items)
    ours = METHODS[method]([torch.from_numpy(x) for x in items], params, ranks,
                           torch.Generator().manual_seed(seed)).numpy()
    generator = torch.Generator().manual_seed(seed)
    uniforms = [torch.rand(x.shape, generator=generator, dtype=torch.float64).numpy() for x in items]
    return ours, ref.run_method(method, items, params, ranks, uniforms)


def check(method, items, expected, **kwargs):
    ours, reference = both(method, items, **kwargs)
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    np.testing.assert_allclose(reference, expected, atol=1e-12)


def test_ta():
    # [[1, 2], [3, 4]] + [[0, -1], [2, 0]] = [[1, 1], [5, 4]]
    check("ta", [mat([[1, 2], [3, 4]]), mat([[0, -1], [2, 0]])], mat([[1, 1], [5, 4]]))


def test_ties():
    x1, x2 = mat([[1, -2], [3, 0.5]]), mat([[-3, 1], [1.5, 2]])
    # density 0.5, d = 4: k = 4 - floor(2) = 2; keep |x| >= the 2nd smallest |x|
    #   x1: |x| sorted 0.5, 1, 2, 3 -> threshold 1   -> [[1, -2], [3, 0]]
    #   x2: |x| sorted 1, 1.5, 2, 3 -> threshold 1.5 -> [[-3, 0], [1.5, 2]]
    # sum of the trimmed [[-2, -2], [4.5, 2]] -> signs [[-, -], [+, +]]
    # disjoint mean: (0,0) only x2's -3; (0,1) only x1's -2; (1,0) (3 + 1.5) / 2 = 2.25; (1,1) only x2's 2
    check("ties", [x1, x2], mat([[-3, -2], [2.25, 2]]), params={"density": 0.5})
    # density 1 trims nothing: signs of [[-2, -1], [4.5, 2.5]]; (0,1): -2 alone (x2's 1 disagrees);
    # (1,0): (3 + 1.5) / 2; (1,1): (0.5 + 2) / 2
    check("ties", [x1, x2], mat([[-3, -2], [2.25, 1.25]]), params={"density": 1.0})


def test_ties_zero_sum_takes_the_sign_of_the_total():
    # sums [[0, 3], [1, -1]] -> signs [[0, +], [+, -]]; total of the signs +1, so (0,0) is elected +
    # and keeps x1's 2 alone; density 1 keeps everything
    x1, x2 = mat([[2, 1], [1, -1]]), mat([[-2, 2], [0, 0]])
    check("ties", [x1, x2], mat([[2, 1.5], [1, -1]]), params={"density": 1.0})


# The generator seeded 0 draws, task after task (torch.rand, float64):
#   task 1: [[0.970, 0.708], [0.459, 0.921]] -> kept where < 0.75: [[no, yes], [yes, no]]
#   task 2: [[0.645, 0.791], [0.179, 0.351]] -> kept where < 0.75: [[yes, no], [yes, yes]]
DARE_X = [mat([[1, 2], [3, 4]]), mat([[-2, 1], [1, -1]])]


def test_dare_draws():
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.rand((2, 2), generator=generator, dtype=torch.float64).numpy() for _ in range(2))
    np.testing.assert_allclose(first, [[0.970, 0.708], [0.459, 0.921]], atol=1e-3)
    np.testing.assert_allclose(second, [[0.645, 0.791], [0.179, 0.351]], atol=1e-3)


def test_dare():
    # kept and divided by 0.75: x1 -> [[0, 8/3], [4, 0]], x2 -> [[-8/3, 0], [4/3, -4/3]]; sum:
    check("dare", DARE_X, mat([[-8 / 3, 8 / 3], [16 / 3, -4 / 3]]), params={"density": 0.75})
    # density 1 keeps every entry (every draw is < 1): the plain sum
    check("dare", DARE_X, DARE_X[0] + DARE_X[1], params={"density": 1.0})


def test_dare_ties():
    # same drops as above; signs of the sum [[-, +], [+, -]]; disjoint mean:
    # (0,0) -8/3 alone; (0,1) 8/3 alone; (1,0) (4 + 4/3) / 2 = 8/3; (1,1) -4/3 alone
    check("dare_ties", DARE_X, mat([[-8 / 3, 8 / 3], [8 / 3, -4 / 3]]), params={"density": 0.75})


def test_tsv_orthogonal_tasks_3x2():
    x1, x2 = mat([[1, 0], [0, 0], [0, 0.5]]), mat([[1, 0], [0, 0], [0, 5]])
    # D = 2, ranks 1 and 1: k_t = floor(2 * 1 / 2) = 1 triplet each
    #   x1's top: 1 * e1 e1^T (0.5 dropped); x2's top: 5 * e3 e2^T (1 dropped)
    #   U = [e1 e3], V = [e1 e2] already orthonormal: polar factors unchanged
    check("tsv", [x1, x2], mat([[1, 0], [0, 0], [0, 5]]), ranks=[1, 1])
    # ranks 1 and 3: k_1 = floor(2 * 1 / 4) = 0, k_2 = floor(2 * 3 / 4) = 1: x2's top triplet alone
    check("tsv", [x1, x2], mat([[0, 0], [0, 0], [0, 5]]), ranks=[1, 3])


def test_tsv_decorrelates_a_shared_direction():
    # x1 = 1 * e1 e1^T, x2 = 2 * e1 e2^T: both use the left direction e1
    # U = [e1 e1] = e1 [1 1] = P sigma Q^T with P = e1, sigma = sqrt 2, Q = (1, 1) / sqrt 2
    #   -> polar factor (non-null part) P Q^T = [[1/sqrt2, 1/sqrt2], [0, 0]]; V = [e1 e2] = I stays I
    # result = U_perp diag(1, 2) I = [[1/sqrt2, 2/sqrt2], [0, 0]]  (task arithmetic would give [[1, 2], [0, 0]])
    check("tsv", [mat([[1, 0], [0, 0]]), mat([[0, 2], [0, 0]])], mat([[1 / R2, 2 / R2], [0, 0]]), ranks=[1, 1])


def test_iso_c():
    # 2x2: sum diag(3, 1): singular values 3, 1 -> both become their mean 2
    check("iso_c", [mat([[3, 0], [0, 0]]), mat([[0, 0], [0, 1]])], mat([[2, 0], [0, 2]]))
    # 3x2: sum [[4, 0], [0, 0], [0, 2]]: singular values 4, 2 -> 3, same singular vectors
    check("iso_c", [mat([[4, 0], [0, 0], [0, 0]]), mat([[0, 0], [0, 0], [0, 2]])], mat([[3, 0], [0, 0], [0, 3]]))
    # rank 1 sum [[3, 4], [0, 0]] (singular value 5): the null direction is not counted in the mean
    check("iso_c", [mat([[3, 0], [0, 0]]), mat([[0, 4], [0, 0]])], mat([[3, 4], [0, 0]]))


def test_iso_cts():
    x1, x2 = mat([[3, 0], [0, 1]]), mat([[0.5, 0], [0, 2]])
    # sum diag(3.5, 3): D' = 2, T = 2
    # common_fraction 0: k_c = 2 - 2 * round((2 - 0) / 2) = 0; 1 task direction each:
    #   x1's top 3 e1 e1^T, x2's top 2 e2 e2^T; U = V = I; every value -> mean(3, 2) = 2.5
    check("iso_cts", [x1, x2], mat([[2.5, 0], [0, 2.5]]), params={"common_fraction": 0.0})
    # common_fraction 1: k_c = 2 - 2 * round(0 / 2) = 2: the sum's own directions, values -> mean(3.5, 3)
    check("iso_cts", [x1, x2], mat([[3.25, 0], [0, 3.25]]), params={"common_fraction": 1.0})
    # common_fraction 0.5: k_c = 2 - 2 * round(1 / 2) = 2 - 2 * 0 = 2 (Python's round(0.5) is 0, as in the
    # authors' code): the same as fraction 1
    check("iso_cts", [x1, x2], mat([[3.25, 0], [0, 3.25]]), params={"common_fraction": 0.5})


def test_iso_cts_common_and_task_directions_4x4():
    x1, x2 = np.diag([4.0, 0, 1, 0.5]), np.diag([0.0, 3, 0, 0])
    # sum diag(4, 3, 1, 0.5): D' = 4; fraction 0.5: k_c = 4 - 2 * round((4 - 2) / 2) = 2 (e1 and e2, values 4, 3)
    # per task (4 - 2) / 2 = 1: x1 minus its part on e1, e2 = diag(0, 0, 1, 0.5) -> top 1 * e3 e3^T;
    # x2 minus its part on e1, e2 = 0 -> nothing. Kept values 4, 3, 1 -> mean 8/3 on e1, e2, e3; e4 dropped
    check("iso_cts", [x1, x2], np.diag([8 / 3, 8 / 3, 8 / 3, 0]), params={"common_fraction": 0.5})


def test_cart():
    x = [mat([[3, 0], [0, 0]]), mat([[0, 0], [0, 3]]), mat([[0, 0], [0, 1.5]])]
    # avg = diag(1, 1.5); centred: diag(2, -1.5), diag(-1, 1.5), diag(-1, 0)
    # rank_fraction 0.5: k = ceil(0.5 * 2) = 1: best rank-1 parts diag(2, 0), diag(0, 1.5), diag(-1, 0)
    # their sum diag(1, 1.5); lambda 0.1: diag(1, 1.5) + 0.1 * diag(1, 1.5) = diag(1.1, 1.65)
    check("cart", x, mat([[1.1, 0], [0, 1.65]]), params={"rank_fraction": 0.5, "cart_lambda": 0.1})
    # lambda 2: diag(1, 1.5) + 2 * diag(1, 1.5) = diag(3, 4.5)
    check("cart", x, mat([[3, 0], [0, 4.5]]), params={"rank_fraction": 0.5, "cart_lambda": 2.0})
    # rank_fraction 1: k = 2, the centred terms sum to exactly zero: the average
    check("cart", x, mat([[1, 0], [0, 1.5]]), params={"rank_fraction": 1.0, "cart_lambda": 2.0})
    # rank_fraction 0.04 (default): k = ceil(0.08) = 1, as for 0.5
    check("cart", x, mat([[1.1, 0], [0, 1.65]]))


def test_cart_of_two_tasks_is_their_average():
    # T = 2: X_2 - avg = -(X_1 - avg), and LR_k(-D) = -LR_k(D): the centred terms cancel
    x1, x2 = mat([[1, 2], [0, 1], [3, 0]]), mat([[0, 1], [2, 0], [1, 1]])
    check("cart", [x1, x2], (x1 + x2) / 2, params={"rank_fraction": 0.5, "cart_lambda": 5.0})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_has_a_hand_case(method):
    assert f"def test_{method}" in open(__file__).read()


def test_iso_cts_rank_one_and_zero_sums():
    # sum diag(4, 0): D' = 1; fraction 0.8: k_c = 1 - 2 * round((1 - 0) / 2) = 1 - 2 * 0 = 1, no task directions:
    # the sum's one direction with its one value, 4
    check("iso_cts", [mat([[3, 0], [0, 0]]), mat([[1, 0], [0, 0]])], mat([[4, 0], [0, 0]]))
    # tasks that cancel: D' = 0, the zero matrix (as for iso_c and tsv)
    x = mat([[1, 2], [3, 4], [5, 6]])
    for method in ("iso_cts", "iso_c", "tsv"):
        check(method, [x, -x], np.zeros((3, 2)))
    # tsv of zero tasks: no task has a non-null direction, nothing to concatenate
    check("tsv", [np.zeros((3, 2)), np.zeros((3, 2))], np.zeros((3, 2)))
    # tsv with more tasks than directions: k_t = floor(2 * 1 / 3) = 0 for each of the three tasks
    check("tsv", [x, 2 * x, -x], np.zeros((3, 2)), ranks=[1, 1, 1])


def test_flattening_works_in_float64_whatever_the_input():
    from coremerge.merging.linalg import isotropic_flatten

    # diag(3, 1) -> diag(2, 2); the zero matrix (numerical rank 0) -> zeros; both float64 like every linalg helper
    for given, expected in ((torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2) * 2), (torch.zeros(2, 2), torch.zeros(2, 2))):
        flat = isotropic_flatten(given.to(torch.float32))
        assert flat.dtype == torch.float64
        torch.testing.assert_close(flat, expected.double())
