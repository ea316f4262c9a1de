"""Reconstruction measures: equality with scikit-matter, mathematical properties, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import skmatter.metrics as sk

from umlip_latents import metrics
from umlip_latents.features import Block, FeatureSet

RTOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small problems: one BLAS/torch thread (oversubscribed threads are erratic on shared CPUs)."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def _latent(n=300, seed=0, dims=(24, 16), noise=0.1):
    """Features of several 'models' sharing a non-linear function of one latent state."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    return [np.tanh(z @ rng.normal(size=(6, d))) + noise * rng.normal(size=(n, d)) for d in dims]


def _split(n, n_test, seed=1):
    idx = np.random.default_rng(seed).permutation(n)
    return idx[n_test:], idx[:n_test]


def _structured(n=240, seed=2):
    """Rank-deficient source with exactly repeated rows; target holds extra information."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(40, 5))
    X = protos[rng.integers(0, 40, n)] @ rng.normal(size=(5, 12))    # rank 5, duplicate rows
    X = np.hstack([X, X[:, :3]])                                       # duplicate columns
    Y = np.hstack([np.sin(X[:, :4]), rng.normal(size=(n, 3))])
    return X, Y


def _close(ours, ref, atol=1e-12):
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("case", ["random", "swapped", "structured"])
def test_global_measures_equal_skmatter(case):
    if case == "structured":
        X, Y = _structured()
    else:
        X, Y = _latent()
        X, Y = (Y, X) if case == "swapped" else (X, Y)
    tr, te = _split(len(X), 80)
    kw = dict(train_idx=tr, test_idx=te)
    _close(metrics.pointwise_gfre(X, Y, tr, te, device="cpu"), sk.pointwise_global_reconstruction_error(X, Y, **kw))
    _close(metrics.gfre(X, Y, tr, te, device="cpu"), sk.global_reconstruction_error(X, Y, **kw))
    # skmatter's GFRD only runs for D_x <= D_y
    a, b = (X, Y) if X.shape[1] <= Y.shape[1] else (Y, X)
    _close(metrics.pointwise_gfrd(a, b, tr, te, device="cpu"),
           sk.pointwise_global_reconstruction_distortion(a, b, **kw))
    _close(metrics.gfrd(a, b, tr, te, device="cpu"), sk.global_reconstruction_distortion(a, b, **kw))


def test_wide_and_ill_conditioned_equal_skmatter():
    rng = np.random.default_rng(9)
    # fewer training rows than features
    X, Y = _latent(n=60, dims=(40, 30), seed=9)
    tr, te = _split(60, 20)
    kw = dict(train_idx=tr, test_idx=te)
    _close(metrics.gfre(X, Y, tr, te, device="cpu"), sk.global_reconstruction_error(X, Y, **kw))
    _close(metrics.gfrd(Y, X, tr, te, device="cpu"), sk.global_reconstruction_distortion(Y, X, **kw))
    _close(metrics.lfre(X, Y, tr, te, n_local_points=14, device="cpu"),
           sk.local_reconstruction_error(X, Y, 14, **kw))
    # float32 features of low rank: singular values at float32 noise, inside the cutoff range
    Z = rng.normal(size=(300, 6))
    A = (Z @ rng.normal(size=(6, 32))).astype(np.float32)
    B = np.hstack([A[:, :10], np.tanh(Z[:, :3])]).astype(np.float32)
    tr, te = _split(300, 100)
    for s, t in [(A, A), (A, B), (B, A)]:
        ref = sk.global_reconstruction_error(s.astype(float), t.astype(float), train_idx=tr, test_idx=te)
        assert metrics.gfre(s, t, tr, te, device="cpu") == pytest.approx(ref, rel=RTOL, abs=1e-9)


def test_default_split_and_float32_equal_skmatter():
    X, Y = _latent(n=200, seed=3)
    _close(metrics.gfre(X, Y, device="cpu"), sk.global_reconstruction_error(X, Y))
    # float32 storage: computed in float64, equal to skmatter on the float64 values
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    _close(metrics.gfre(X32, Y32, device="cpu"), sk.global_reconstruction_error(X32.astype(float), Y32.astype(float)))


@pytest.mark.parametrize("case", ["random", "structured"])
def test_local_measures_equal_skmatter(case):
    X, Y = _structured() if case == "structured" else _latent(n=200)
    tr, te = _split(len(X), 25)
    k = 14
    ref = sk.pointwise_local_reconstruction_error(X, Y, k, train_idx=tr, test_idx=te)
    _close(metrics.pointwise_lfre(X, Y, tr, te, n_local_points=k, device="cpu", batch_size=4), ref)
    _close(metrics.lfre(Y, X, tr, te, n_local_points=k, device="cpu"),
           sk.local_reconstruction_error(Y, X, k, train_idx=tr, test_idx=te))


def test_lfre_default_neighbours_is_min_dim():
    X, Y = _latent(n=160, dims=(20, 12))
    tr, te = _split(len(X), 10)
    _close(metrics.lfre(X, Y, tr, te, device="cpu"), sk.local_reconstruction_error(X, Y, 12, train_idx=tr, test_idx=te))


def test_lfre_more_neighbours_than_training_rows_uses_all_and_warns():
    # skmatter takes all training rows when n_local_points exceeds them (up to n_samples)
    X, Y = _latent(n=60, dims=(8, 6), seed=10)
    tr, te = _split(len(X), 40)                                               # 20 training rows
    ref = sk.pointwise_local_reconstruction_error(X, Y, 30, train_idx=tr, test_idx=te)
    msg = r"n_local_points=30 exceeds the 20 training rows; using all 20"
    with pytest.warns(metrics.LocalPointsWarning, match=msg):
        ours = metrics.pointwise_lfre(X, Y, tr, te, n_local_points=30, device="cpu", batch_size=7)
    _close(ours, ref)
    # exactly the training rows: no warning, the same fit
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.LocalPointsWarning)
        _close(metrics.pointwise_lfre(X, Y, tr, te, n_local_points=20, device="cpu"), ref)
    # default k = min(D_x, D_y) above the training rows: capped as well
    with pytest.warns(metrics.LocalPointsWarning, match="n_local_points=6 exceeds the 4 training rows"):
        v = metrics.lfre(X, Y, tr[:4], te, device="cpu")
    assert v == pytest.approx(sk.local_reconstruction_error(X, Y, 6, train_idx=tr[:4], test_idx=te), rel=RTOL)
    # the matrix caps every pair the same way
    with pytest.warns(metrics.LocalPointsWarning, match="using all 20"):
        df = metrics.reconstruction_matrix({"a": X, "b": Y}, metric="lfre", test_size=40, n_local_points=30,
                                           device="cpu")
    tr, te = metrics.split_indices(60, 40, None, 0)
    assert df.set_index(["source", "target"]).value["a", "b"] == pytest.approx(
        sk.local_reconstruction_error(X, Y, 30, train_idx=tr, test_idx=te), rel=RTOL)


def test_properties():
    X, Y = _latent(n=400, dims=(24, 16))
    tr, te = _split(len(X), 100)
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    assert metrics.gfre(X, X, tr, te, device="cpu") < 1e-8                      # reconstructs itself
    assert metrics.gfrd(X, X @ Q, tr, te, device="cpu") < 1e-8                  # rotation: no distortion
    assert metrics.gfre(X, X @ rng.normal(size=(24, 10)), tr, te, device="cpu") < 1e-8  # linear function of X
    assert metrics.gfre(X, np.hstack([X, rng.normal(size=(400, 8))]), tr, te, device="cpu") > 0.3  # extra info
    assert metrics.gfre(X, rng.normal(size=(400, 8)), tr, te, device="cpu") > 0.9  # nothing shared
    X0 = X.copy()
    assert metrics.lfre(X, X, tr, te, n_local_points=40, device="cpu") < 1e-8  # needs k > D
    np.testing.assert_array_equal(X, X0)                                        # inputs untouched
    assert metrics.gfrd(X, Y, tr, te, device="cpu") >= 0                       # D_x > D_y: padded, runs
    assert metrics.linear_cka(X, X @ Q * 3.0) == pytest.approx(1.0)
    assert metrics.linear_cka(X, Y) == pytest.approx(metrics.linear_cka(Y, X))
    assert 0 < metrics.linear_cka(X, Y) < 1


def test_nonlinear_gfre_recovers_nonlinear_information():
    rng = np.random.default_rng(5)
    X = rng.uniform(-2, 2, size=(500, 2))
    Y = np.column_stack([np.sin(2 * X[:, 0]), X[:, 0] * X[:, 1], np.cos(X[:, 1] ** 2)])
    tr, te = _split(len(X), 150)
    lin = metrics.gfre(X, Y, tr, te, device="cpu")
    kern = metrics.nonlinear_gfre(X, Y, tr, te, n_components=300, device="cpu")
    assert lin > 0.5 and kern < 0.3 * lin


def _featureset(values, species, ids=("a", "b")):
    n = len(values)
    return FeatureSet(values=values.astype(np.float32), structure_index=np.repeat([0, 1], [n // 2, n - n // 2]),
                      species=species, blocks=[Block("all", 0, values.shape[1])], structure_ids=list(ids))


def test_reconstruction_matrix_direction_and_layout():
    small, other = _latent(n=400, dims=(12, 20), seed=6)
    big = np.hstack([small, np.random.default_rng(7).normal(size=(400, 6))])
    species = np.full(400, 14)
    feats = {"small": _featureset(small, species), "big": _featureset(big, species), "other": other}
    df = metrics.reconstruction_matrix(feats, metric=["gfre", "lfre", "cka", "gfrd", "nonlinear_gfre"],
                                       test_size=100, device="cpu", n_local_points=40, n_components=200)
    assert list(df.columns) == ["source", "target", "metric", "value", "ci_low", "ci_high"]
    assert len(df) == 5 * 9 and df.attrs["n_test"] == 100
    assert set(df.metric) == set(metrics.METRICS) and (df.value >= 0).all()
    g = df[df.metric == "gfre"].set_index(["source", "target"]).value
    assert g["big", "small"] < 1e-6 and g["small", "big"] > 0.2 and g["small", "small"] < 1e-8
    l = df[df.metric == "lfre"].set_index(["source", "target"]).value
    assert l["big", "small"] < 1e-6 and l["small", "big"] > 0.2
    # each entry equals the pair function on the same split (float32 storage as stored)
    tr, te = metrics.split_indices(400, 100, None, 0)
    assert g["other", "big"] == pytest.approx(metrics.gfre(other, big.astype(np.float32), tr, te, device="cpu"),
                                              rel=1e-10)
    # every measure, every ordered pair: the matrix (training rows in fold order for the global
    # fits, one buffer per pass) equals the pair functions on the same split
    arrays = {"small": small.astype(np.float32), "big": big.astype(np.float32), "other": other}
    pair = {"gfre": metrics.gfre, "gfrd": metrics.gfrd,
            "lfre": lambda X, Y, *a, **k: metrics.lfre(X, Y, *a, n_local_points=40, **k),
            "nonlinear_gfre": lambda X, Y, *a, **k: metrics.nonlinear_gfre(X, Y, *a, n_components=200, **k)}
    table = df.set_index(["metric", "source", "target"]).value
    for m, fn in pair.items():
        for s in arrays:
            for t in arrays:
                assert table[m, s, t] == pytest.approx(fn(arrays[s], arrays[t], tr, te, device="cpu"),
                                                       rel=1e-8, abs=1e-12), (m, s, t)
    assert df[["ci_low", "ci_high"]].isna().all().all()
    c = df[df.metric == "cka"].set_index(["source", "target"]).value
    assert c["small", "big"] == pytest.approx(c["big", "small"]) and c["big", "big"] == pytest.approx(1.0)


def test_reconstruction_matrix_bootstrap_and_stratify():
    a, b = _latent(n=200, dims=(8, 6), seed=8)
    labels = np.repeat(["x", "y"], 100)
    df = metrics.reconstruction_matrix({"a": a, "b": b}, metric="gfre", test_size=0.25, stratify="subset",
                                       subsets=labels, n_boot=4, seed=1, device="cpu")
    assert df.attrs["n_test"] == 50
    assert (df.ci_low <= df.ci_high).all() and df.ci_low.notna().all()
    tr, te = metrics.split_indices(200, 0.25, labels, 1)
    assert (labels[te] == "x").sum() == 25


def test_bad_input():
    X, Y = _latent(n=100, dims=(6, 4))
    species = np.full(100, 14)
    with pytest.raises(ValueError, match="must match"):
        metrics.gfre(X, Y[:50])
    with pytest.raises(ValueError, match="NaN"):
        metrics.gfre(np.where(np.eye(100, 6) > 0, np.nan, X), Y)
    with pytest.raises(ValueError, match="2-D"):
        metrics.gfre(X[:, 0], Y)
    with pytest.raises(ValueError, match="zero variance"):
        metrics.gfre(np.ones_like(X), Y)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        metrics.gfre(X, Y, alphas=[0.5, 1.0])
    with pytest.raises(ValueError, match="n_local_points=101"):   # more than the samples, as skmatter
        metrics.lfre(X, Y, np.arange(10), np.arange(10, 20), n_local_points=101, device="cpu")
    with pytest.raises(ValueError, match="at least 2"):
        metrics.lfre(X, Y, n_local_points=1, device="cpu")
    with pytest.raises(ValueError, match="n_local_points=101"):
        metrics.reconstruction_matrix({"a": X, "b": Y}, metric="lfre", test_size=10, n_local_points=101)
    with pytest.raises(ValueError, match="n_atoms differ"):
        metrics.reconstruction_matrix({"a": X, "b": Y[:90]})
    # a NaN or inf in a training or a test atom: the model and the atom are named, for every metric
    tr, te = metrics.split_indices(100, 10, None, 0)
    for atom, bad in ((tr[3], np.nan), (te[2], np.inf), (tr[0], -np.inf)):
        Yb = Y.copy()
        Yb[atom, 1] = bad
        for metric in ("gfre", "lfre"):
            with pytest.raises(ValueError, match=rf"features\['b'\] holds NaN or infinite values \(atoms {atom}\)"):
                metrics.reconstruction_matrix({"a": X, "b": Yb}, metric=metric, test_size=10, device="cpu")
    # finite values whose variance overflows: an error, not a silent scale of infinity
    huge = Y * np.array([1e200, 1, 1, 1])
    for call in (lambda: metrics.gfre(X, huge, device="cpu"),
                 lambda: metrics.reconstruction_matrix({"a": X, "b": huge}, test_size=10, device="cpu")):
        with pytest.raises(ValueError, match="too large to scale"):
            call()
    other = species.copy()
    other[3] = 8
    with pytest.raises(ValueError, match="atom 3"):
        metrics.reconstruction_matrix({"a": _featureset(X, species), "b": _featureset(Y, other)})
    with pytest.raises(ValueError, match="different structures"):
        metrics.reconstruction_matrix({"a": _featureset(X, species), "b": _featureset(Y, species, ("a", "c"))})
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.reconstruction_matrix({"a": X, "b": Y}, metric="gfr")
    with pytest.raises(ValueError, match="test_size"):
        metrics.reconstruction_matrix({"a": X, "b": Y}, test_size=1000)
    with pytest.raises(ValueError, match="subsets="):
        metrics.reconstruction_matrix({"a": X, "b": Y}, test_size=10, stratify="subset")
    with pytest.raises(TypeError):
        metrics.reconstruction_matrix([X, Y])
