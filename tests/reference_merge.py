"""An independent reference for every merge method in every space: dense float64 numpy, written from the papers.

Nothing here imports coremerge. Each method takes T same-shaped matrices X_1..X_T (numpy float64) and returns
one. The spaces build those matrices from each task's canonical factors (B~_t, A~_t), with dW_t = B~_t @ A~_t,
and return the merged m x n update. Where coremerge departs on purpose from an author's code, the function says
so (`Departure:`) and this reference follows coremerge's choice, so that the tests pin it.

The only thing taken from torch is DARE's random numbers: coremerge draws them with torch's generator, seeded per
module from the user's seed and the module's name, so the reference draws the same numbers (`dare_uniforms`).
"""

import math
import zlib

import numpy as np
import torch

EPS = np.finfo(np.float64).eps
KNOTS_KEEP = 1e-5  # KnOTS keeps the concatenation's singular values above this


# ---------------------------------------------------------------- small linear algebra


def numerical_rank(s: np.ndarray, shape) -> int:
    """Singular values above S_max * max(shape) * eps."""
    return 0 if s.size == 0 else int((s > s.max() * max(shape) * EPS).sum())


def svd(x: np.ndarray):
    return np.linalg.svd(x, full_matrices=False)


def polar(x: np.ndarray) -> np.ndarray:
    """P Q^T from P diag Q^T = svd(x), over the non-null directions only (coremerge's choice, see tsv)."""
    p, s, qt = svd(x)
    k = numerical_rank(s, x.shape)
    return p[:, :k] @ qt[:k]


def flatten_spectrum(x: np.ndarray) -> np.ndarray:
    """Isotropic flattening: the non-null singular values all become their mean."""
    u, s, vt = svd(x)
    k = numerical_rank(s, x.shape)
    if k == 0:
        return np.zeros_like(x)
    return s[:k].mean() * u[:, :k] @ vt[:k]


def best_rank(x: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = svd(x)
    return u[:, :k] * s[:k] @ vt[:k]


# ---------------------------------------------------------------- methods


def ta(items):
    """Task arithmetic (Ilharco et al. 2023): the sum."""
    return sum(items)


def trim(x: np.ndarray, density: float) -> np.ndarray:
    """TIES trim (the authors' topk_values_mask): k = d - floor(d * density); keep |x| >= the k-th smallest |x|.

    Departure: the authors trim one flattened vector of the whole model; coremerge trims each module on its own.
    """
    d = x.size
    k = d - math.floor(d * density)
    if k == 0:
        return x.copy()
    threshold = np.sort(np.abs(x).ravel())[k - 1]
    return np.where(np.abs(x) >= threshold, x, 0.0)


def elect_and_average(trimmed):
    """TIES's sign election (zeros take the sign of the sum of the signs) and disjoint mean, entry by entry."""
    stacked = np.stack(trimmed)
    sign = np.sign(stacked.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, stacked > 0, stacked < 0)
    count = agree.sum(axis=0)
    return np.where(agree, stacked, 0.0).sum(axis=0) / np.maximum(count, 1)


def ties(items, density):
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""
    return elect_and_average([trim(x, density) for x in items])


def drop(x, density, uniform):
    """DARE's drop and rescale: keep where the uniform draw is below `density`, divide by `density`.

    Departure: the authors draw torch.bernoulli masks; coremerge compares uniform draws with the density
    (the same distribution, other numbers), one draw per entry, task after task, from the module's generator.
    """
    return np.where(uniform < density, x, 0.0) / density


def dare(items, density, uniforms):
    """DARE (Yu et al. 2024): random drop with rescale, then the sum."""
    return sum(drop(x, density, u) for x, u in zip(items, uniforms))


def dare_ties(items, density, uniforms):
    """DARE-TIES: DARE's drop and rescale in place of TIES's trim, then sign election and disjoint mean."""
    return elect_and_average([drop(x, density, u) for x, u in zip(items, uniforms)])


def tsv(items, ranks):
    """TSV-Merge (Gargiulo et al. 2025): each task's top singular triplets, U and V replaced by polar factors.

    Task t keeps k_t = min(numerical rank, floor(D * r_t / R)) triplets, D = min(shape), R = sum r_t (for
    equal ranks the authors' floor(D / T)). Departure: the authors' code can keep null directions (singular
    value 0, basis chosen by LAPACK); coremerge keeps only non-null ones, here and in the polar factors.
    """
    d, total = min(items[0].shape), sum(ranks)
    us, ss, vs = [], [], []
    for x, r in zip(items, ranks):
        u, s, vt = svd(x)
        k = min(numerical_rank(s, x.shape), d * r // total)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    if sum(s.size for s in ss) == 0:
        return np.zeros_like(items[0])
    return polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


def iso_c(items):
    """Iso-C (Marczak et al. 2025): the sum with a flat spectrum."""
    return flatten_spectrum(sum(items))


def iso_cts(items, common_fraction):
    """Iso-CTS (Marczak et al. 2025): common directions of the sum plus each task's own, flat spectrum.

    Departure: the authors size the subspaces from min(shape); coremerge from the sum's numerical rank D'
    (in core space min(shape) counts null directions). k_c = D' - T * round((D' - floor(f D')) / T) with
    Python's round, as in the authors' code.
    """
    total = sum(items)
    u, s, vt = svd(total)
    d = numerical_rank(s, total.shape)
    if d == 0:
        return np.zeros_like(total)
    n_tasks = len(items)
    common = max(0, d - n_tasks * round((d - math.floor(common_fraction * d)) / n_tasks))
    per_task = (d - common) // n_tasks
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common].T]
    uc = u[:, :common]
    for x in items:
        residual = x - uc @ uc.T @ x
        ur, sr, vrt = svd(residual)
        k = min(per_task, numerical_rank(sr, residual.shape))
        us.append(ur[:, :k]), ss.append(sr[:k]), vs.append(vrt[:k].T)
    return np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.hstack(vs)).T


def cart(items, rank_fraction, cart_lambda):
    """CART (Choi et al. 2024): avg + lambda * sum_t LR_k(X_t - avg), k = ceil(rank_fraction * min(shape))."""
    avg = sum(items) / len(items)
    k = math.ceil(rank_fraction * min(avg.shape))
    return avg + cart_lambda * sum(best_rank(x - avg, k) for x in items)


def run_method(method, items, params, ranks, uniforms):
    if method == "ta":
        return ta(items)
    if method == "ties":
        return ties(items, params["density"])
    if method == "dare":
        return dare(items, params["density"], uniforms)
    if method == "dare_ties":
        return dare_ties(items, params["density"], uniforms)
    if method == "tsv":
        return tsv(items, ranks)
    if method == "iso_c":
        return iso_c(items)
    if method == "iso_cts":
        return iso_cts(items, params["common_fraction"])
    if method == "cart":
        return cart(items, params["rank_fraction"], params["cart_lambda"])
    raise ValueError(method)


DEFAULTS = {
    "ta": {}, "ties": {"density": 0.2}, "dare": {"density": 0.9, "seed": 0}, "dare_ties": {"density": 0.9, "seed": 0},
    "tsv": {}, "iso_c": {}, "iso_cts": {"common_fraction": 0.8}, "cart": {"rank_fraction": 0.04, "cart_lambda": 0.1},
}


def dare_uniforms(seed: int, module: str, shape, count: int):
    """The uniform draws coremerge makes for one module: its generator is seeded with crc32("seed:module")."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
    return [torch.rand(tuple(shape), generator=generator, dtype=torch.float64).numpy() for _ in range(count)]


# ---------------------------------------------------------------- spaces


def merge(factors, method, space="core", weights=None, alpha=1.0, isotropize=False, rank=None, module="", **params):
    """The merged update (m x n) of one module.

    Args:
        factors: [(B~_t (m x r_t), A~_t (r_t x n))], the canonical factors of the adapters that target the module.
        method, space, weights, alpha, isotropize, rank: as on the command line; params: the method's.
        module: the module's name (seeds DARE).
    """
    params = {**DEFAULTS[method], **params}
    weights = [1.0] * len(factors) if weights is None else list(weights)
    ranks = [a.shape[0] for _, a in factors]
    updates = [b @ a for b, a in factors]

    def combine(items):
        """alpha * method({w_t X_t})."""
        uniforms = dare_uniforms(int(params.get("seed", 0)), module, items[0].shape, len(items))
        weighted = [w * x for w, x in zip(weights, items)]
        return alpha * run_method(method, weighted, params, ranks, uniforms)

    def maybe_flat(x):
        return flatten_spectrum(x) if isotropize else x

    if space == "full":
        merged = maybe_flat(combine(updates))
    elif space == "core":
        # Core space (Panariello et al. 2025): reference bases from the SVDs of the stacked factors,
        # M_t = U_ref^T dW_t V_ref, merged there and mapped back: dW = U_ref M V_ref^T.
        u_ref = svd(np.hstack([b for b, _ in factors]))[0]  # (m, min(m, R))
        v_ref = svd(np.vstack([a for _, a in factors]))[2].T  # (n, min(n, R))
        cores = [u_ref.T @ dw @ v_ref for dw in updates]
        merged = u_ref @ maybe_flat(combine(cores)) @ v_ref.T
    elif space == "knots":
        # KnOTS (Stoica et al. 2025): [dW_1 | ... | dW_T] = U S [V_1^T ... V_T^T]; merge the V_t^T;
        # dW = U diag(S) merged. coremerge's choice: the user weights multiply the V_t^T (the SVD is of the
        # unweighted updates, as the core space's bases do not depend on the weights).
        u, s, vt = svd(np.hstack(updates))
        keep = s > KNOTS_KEEP
        n = updates[0].shape[1]
        items = [vt[keep][:, t * n:(t + 1) * n] for t in range(len(updates))]
        merged = u[:, keep] @ maybe_flat(np.diag(s[keep]) @ combine(items))
    else:
        raise ValueError(space)
    return merged if rank is None else best_rank(merged, rank)
