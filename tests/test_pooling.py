"""Cumulant pooling: equality with scipy, invariances, exact zeros, nesting, bad input."""

from __future__ import annotations

from math import factorial

import numpy as np
import pytest
from scipy import stats

from umlip_latents.features import Block, FeatureSet
from umlip_latents.pooling import (
    cumulant_blocks,
    cumulant_features,
    pool_featureset,
    signed_root,
)

ORDERS = range(1, 9)


def random_structures(seed: int, n_structures: int = 12, dim: int = 5):
    """Features of structures with uneven sizes (1..15 atoms), atoms shuffled across structures."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 16, size=n_structures)
    index = np.repeat(np.arange(n_structures), sizes)
    rng.shuffle(index)
    # Skewed, shifted features so every cumulant is far from zero.
    values = rng.gamma(2.0, 1.0, size=(len(index), dim)) * rng.uniform(0.5, 2, dim) + 3.0
    return values, index


def scipy_cumulants(x: np.ndarray, order: int) -> np.ndarray:
    """Population cumulants of the columns of x (n, D) -> (order, D), from scipy central moments.

    Independent of the recursion in the package: the cumulant generating function is the
    logarithm of the moment generating function, K(t) = log(1 + u(t)) with
    u(t) = sum_{n>=2} mu_n t^n / n! (central moments), expanded as a truncated power series.
    """
    mu = [stats.moment(x, order=n, axis=0) for n in range(2, order + 1)]
    u = np.zeros((order + 1, x.shape[1]))  # u[j] = coefficient of t^j
    for n, m in zip(range(2, order + 1), mu):
        u[n] = m / factorial(n)

    def mul(a, b):
        c = np.zeros_like(a)
        for i in range(order + 1):
            for j in range(order + 1 - i):
                c[i + j] += a[i] * b[j]
        return c

    log, term = np.zeros_like(u), u.copy()
    for p in range(1, order + 1):  # log(1+u) = sum (-1)^(p+1) u^p / p
        log += (-1) ** (p + 1) * term / p
        term = mul(term, u)
    kappa = np.array([factorial(n) * log[n] for n in range(order + 1)])
    kappa[1] = x.mean(axis=0)
    return kappa[1:]


def reference(values, index, order):
    """scipy_cumulants of every structure, shape (n_structures, order * D)."""
    return np.array([scipy_cumulants(values[index == s].astype(np.float64), order).reshape(-1)
                     for s in range(index.max() + 1)])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("transform", [None, "signed_root"])
def test_equals_scipy(order, transform):
    """Raw cumulants match scipy; signed roots match once raised back to the n-th power.

    (Signed roots are compared after inversion because a cumulant that is exactly zero,
    e.g. kappa_3 of a two-atom structure, is ~1e-16 in the reference and its 8th root is not.)
    """
    values, index = random_structures(seed=order)
    d = values.shape[1]
    got = cumulant_features(values, index, order=order, transform=transform)
    assert got.shape == (index.max() + 1, order * d)
    if transform == "signed_root":
        n = np.repeat(np.arange(1, order + 1), d)
        got = np.sign(got) * np.abs(got) ** n
    np.testing.assert_allclose(got, reference(values, index, order), rtol=1e-10, atol=1e-10)


def test_closed_forms():
    """kappa_4 = mu4 - 3 mu2^2 and kappa_6 = mu6 - 15 mu4 mu2 - 10 mu3^2 + 30 mu2^3."""
    values, index = random_structures(seed=11, n_structures=3)
    got = cumulant_features(values, index, order=6, transform=None)
    d = values.shape[1]
    for s in range(3):
        m = {n: stats.moment(values[index == s], order=n, axis=0) for n in range(2, 7)}
        np.testing.assert_allclose(got[s, 3 * d:4 * d], m[4] - 3 * m[2] ** 2, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got[s, 5 * d:6 * d],
                                   m[6] - 15 * m[4] * m[2] - 10 * m[3] ** 2 + 30 * m[2] ** 3,
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_invariant_to_atom_order(seed):
    values, index = random_structures(seed)
    perm = np.random.default_rng(seed + 100).permutation(len(index))
    a = cumulant_features(values, index, order=8, transform=None)
    b = cumulant_features(values[perm], index[perm], order=8, transform=None)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("repeats", [2, 5])
def test_intensive_under_supercell(repeats):
    values, index = random_structures(seed=repeats)
    big_values, big_index = np.tile(values, (repeats, 1)), np.tile(index, repeats)
    a = cumulant_features(values, index, order=8, transform=None)
    b = cumulant_features(big_values, big_index, order=8, transform=None)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shared_feature_vector_has_zero_higher_cumulants(dtype):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 6)).astype(dtype) * 10 + 0.1
    sizes = np.array([3, 7, 1, 10])
    values, index = np.repeat(rows, sizes, axis=0), np.repeat(np.arange(4), sizes)
    for transform in (None, "signed_root"):
        got = cumulant_features(values, index, order=8, transform=transform)
        assert np.array_equal(got[:, :6], rows.astype(np.float64))
        assert np.all(got[:, 6:] == 0.0)


def test_single_atom_structures():
    values, index = random_structures(seed=5)
    lone = np.random.default_rng(1).normal(size=(2, values.shape[1]))
    n = index.max() + 1
    values = np.vstack([values, lone])
    index = np.concatenate([index, [n, n + 1]])
    got = cumulant_features(values, index, order=8)
    assert np.array_equal(got[n:, :values.shape[1]], lone)
    assert np.all(got[n:, values.shape[1]:] == 0.0)


@pytest.mark.parametrize("transform", [None, "signed_root"])
def test_orders_nest(transform):
    values, index = random_structures(seed=7)
    d = values.shape[1]
    prev = cumulant_features(values, index, order=1, transform=transform)
    for k in range(2, 9):
        cur = cumulant_features(values, index, order=k, transform=transform)
        np.testing.assert_array_equal(cur[:, :(k - 1) * d], prev)
        prev = cur


def test_signed_root_inverts():
    values, index = random_structures(seed=9)
    raw = cumulant_features(values, index, order=8, transform="none")
    rooted = cumulant_features(values, index, order=8, transform="signed_root")
    for n, b in enumerate(cumulant_blocks(values.shape[1], 8), start=1):
        y = rooted[:, b.start:b.stop]
        np.testing.assert_allclose(np.sign(y) * np.abs(y) ** n, raw[:, b.start:b.stop],
                                   rtol=1e-10, atol=1e-12)
        assert np.array_equal(np.sign(y), np.sign(raw[:, b.start:b.stop]))


def test_blocks_cover_columns():
    blocks = cumulant_blocks(5, 3)
    assert [b.name for b in blocks] == ["kappa_1", "kappa_2", "kappa_3"]
    assert [(b.start, b.stop) for b in blocks] == [(0, 5), (5, 10), (10, 15)]


def test_pool_featureset_matches_arrays():
    values, index = random_structures(seed=3)
    n = index.max() + 1
    fs = FeatureSet(values=values.astype(np.float32), structure_index=index,
                    species=np.ones(len(index), dtype=np.int64),
                    blocks=[Block("all", 0, values.shape[1])],
                    structure_ids=[f"s{i}" for i in range(n)])
    matrix, ids = pool_featureset(fs, order=3, transform=None)
    assert ids == fs.structure_ids
    np.testing.assert_array_equal(matrix, cumulant_features(fs.values, index, order=3, transform=None))


def test_empty_input():
    assert cumulant_features(np.zeros((0, 4)), np.zeros(0, dtype=int), order=2).shape == (0, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(order=0), "order"),
    (dict(order=9), "order"),
    (dict(order=2.0), "order"),
    (dict(transform="log"), "transform"),
    (dict(values=np.zeros(6)), "2-D"),
    (dict(structure_index=np.array([0, 0, 1])), "shape"),
    (dict(structure_index=np.array([0, 0, 1, 1, 2, -1])), "non-negative"),
    (dict(structure_index=np.array([0, 0, 2, 2, 3, 3])), "contiguous"),
    (dict(structure_index=np.array([0, 0, 1, 1, 2, 2.0])), "integers"),
    (dict(n_structures=4), "contiguous"),
    (dict(n_structures=2), "n_structures"),
])
def test_bad_input(kwargs, match):
    args = dict(values=np.ones((6, 2)), structure_index=np.array([0, 0, 1, 1, 2, 2]), order=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cumulant_features(**args)
