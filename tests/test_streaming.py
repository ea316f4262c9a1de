"""Out-of-core GFRE/GFRD/LFRE (:mod:`umlip_latents.metrics.streaming`) against the in-memory engine.

The in-memory engine equals scikit-matter's (``tests/test_metrics*.py``); here the streamed
matrix must give its numbers from row chunks: to 1e-8 relative on well-conditioned features
and 1e-6 on rank-deficient ones, for any chunk size, from arrays, memory maps and ``.npy``
files alike, with intervals over re-drawn splits, and without mapping the file into memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from umlip_latents.metrics import reconstruction_matrix
from umlip_latents.metrics.streaming import NpyRows, rows_of, streamed_matrix


def _panel(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 10))
    feats = {}
    for i, d in enumerate([6, 12, 20]):
        x = np.tanh(latent @ rng.standard_normal((10, d))) + 0.1 * rng.standard_normal((n, d))
        feats[f"m{i}"] = (x + 3.0).astype(np.float32)  # an offset: centring must be by the training rows
    return feats


def _rank_deficient(feats):
    """Columns repeated and a near-null direction: singular values from 1 down to ~1e-8 and 0."""
    base = feats["m1"].astype(np.float64)
    tiny = 1e-8 * np.random.default_rng(1).standard_normal((len(base), 1))
    out = dict(feats)
    out["dup"] = np.concatenate([base[:, :5], base[:, :5], base[:, :1] + tiny], axis=1).astype(np.float64)
    return out


def _compare(a, b, rtol, atol=1e-12):
    assert list(zip(a.source, a.target, a.metric)) == list(zip(b.source, b.target, b.metric))
    np.testing.assert_allclose(b.value.to_numpy(), a.value.to_numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_rows", [97, 500, None])
def test_streamed_equals_in_memory_on_well_conditioned_features(chunk_rows):
    feats = _panel()
    ref = reconstruction_matrix(feats, ["gfre", "gfrd"], test_size=0.4, seed=3, device="cpu")
    got = streamed_matrix(feats, ["gfre", "gfrd"], test_size=0.4, seed=3, device="cpu", chunk_rows=chunk_rows)
    _compare(ref, got, 1e-8)
    assert got.attrs["n_train"] == ref.attrs["n_train"] and got.attrs["streamed"]
    off = got[got.source != got.target]
    assert (off.value > 0.05).all()  # the values compared are not all ~0


@pytest.mark.parametrize("partitions", [2, 7, 400])
def test_partitions_change_the_values_only_by_rounding(partitions):
    """Partial sums and R factors per row range, combined in order: the one-pass values to
    rounding. 400 partitions of ~2 rows leave many without test rows or rows of a CV fold."""
    feats = _panel()
    kw = dict(metric=["gfre", "gfrd"], test_size=0.4, seed=3, device="cpu", chunk_rows=97)
    one, many = streamed_matrix(feats, **kw), streamed_matrix(feats, partitions=partitions, **kw)
    _compare(one, many, 1e-11)
    assert many.attrs["partitions"] == partitions and one.attrs["partitions"] == 1
    again = streamed_matrix(feats, partitions=partitions, **kw)
    assert again.value.to_numpy().tobytes() == many.value.to_numpy().tobytes()


def test_partitions_on_rank_deficient_features():
    feats = _rank_deficient(_panel())
    ref = reconstruction_matrix(feats, ["gfre", "gfrd"], test_size=300, seed=0, device="cpu")
    got = streamed_matrix(feats, ["gfre", "gfrd"], test_size=300, seed=0, device="cpu", chunk_rows=211, partitions=3)
    _compare(ref, got, 1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_partitions_are_refused(bad):
    with pytest.raises(ValueError, match="partitions must be a positive integer"):
        streamed_matrix(_panel(), "gfre", device="cpu", partitions=bad)


def test_streamed_equals_in_memory_on_rank_deficient_features():
    feats = _rank_deficient(_panel())
    ref = reconstruction_matrix(feats, ["gfre", "gfrd"], test_size=300, seed=0, device="cpu")
    got = streamed_matrix(feats, ["gfre", "gfrd"], test_size=300, seed=0, device="cpu", chunk_rows=211)
    # the near-null direction (1e-8) is resolved to ~eps / 1e-8 here, so a model reconstructing
    # itself through it gives 3e-9 instead of 3e-15: equal to 1e-6 on the scale of the metric (~1)
    _compare(ref, got, 1e-6, atol=1e-6)
    assert (got[got.source == "dup"].value.iloc[:3] > 0.05).all()


@pytest.mark.parametrize("n_local_points", [None, "determined", 45])
def test_streamed_lfre_equals_in_memory(n_local_points, tmp_path):
    """Neighbours searched chunk by chunk and read back by index from .npy files: the in-memory LFRE.

    Chunks of 97 rows are smaller than every k here, so the running top-k merges many chunks.
    Values ~1e-16 (a model reconstructing itself) agree only in absolute terms.
    """
    feats = _panel(900)
    paths = {}
    for key, x in feats.items():
        paths[key] = tmp_path / f"{key}.npy"
        np.save(paths[key], x)
    ref = reconstruction_matrix(feats, ["lfre", "gfre"], test_size=60, seed=2, device="cpu",
                                n_local_points=n_local_points)
    got = streamed_matrix(paths, ["lfre", "gfre"], test_size=60, seed=2, device="cpu", chunk_rows=97,
                          n_local_points=n_local_points)
    _compare(ref, got, 1e-8, atol=1e-12)
    off = got[(got.source != got.target) & (got.metric == "lfre")]
    assert (off.value > 0.02).all()


def test_streamed_lfre_reads_only_what_it_needs(tmp_path):
    """The training rows are read in chunks and by index, never as a whole: a reader that refuses
    a read of more than 200 rows still gives the matrix."""
    feats = _panel(800)

    class Small(NpyRows):
        def read(self, lo, hi):
            assert hi - lo <= 200, (lo, hi)
            return super().read(lo, hi)

        def take(self, rows):
            assert len(rows) <= 5000, len(rows)
            return super().take(rows)

    readers = {}
    for key, x in feats.items():
        np.save(tmp_path / f"{key}.npy", x)
        readers[key] = Small(tmp_path / f"{key}.npy")
    ref = reconstruction_matrix(feats, "lfre", test_size=50, seed=0, device="cpu")
    got = streamed_matrix(readers, "lfre", test_size=50, seed=0, device="cpu", chunk_rows=200, batch_size=7)
    _compare(ref, got, 1e-8, atol=1e-12)


def test_intervals_over_redrawn_splits_match(tmp_path):
    feats = _panel(600)
    ref = reconstruction_matrix(feats, "gfre", test_size=0.5, seed=0, n_boot=3, device="cpu")
    got = streamed_matrix(feats, "gfre", test_size=0.5, seed=0, n_boot=3, device="cpu", chunk_rows=128)
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(got[col], ref[col], rtol=1e-8, atol=1e-12)
    assert len(got.attrs["replicates"]) == 4 * len(got)


def test_npy_files_and_memory_maps_read_by_rows(tmp_path):
    feats = _panel(700)
    paths = {}
    for key, x in feats.items():
        paths[key] = tmp_path / f"{key}.npy"
        np.save(paths[key], x)
    maps = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
    assert all(isinstance(rows_of(m), NpyRows) for m in maps.values())  # read through the file, not mapped
    np.testing.assert_array_equal(rows_of(paths["m1"]).read(13, 57), feats["m1"][13:57])
    view = maps["m2"][250:600]  # a row slice of a memory map keeps its parent's offset: read its own rows
    assert isinstance(rows_of(view), NpyRows)
    np.testing.assert_array_equal(rows_of(view).read(0, 350), feats["m2"][250:600])
    np.testing.assert_array_equal(rows_of(view).read(10, 20), feats["m2"][260:270])
    a = streamed_matrix(feats, "gfre", device="cpu", test_size=0.5)
    for source in (paths, maps, {k: str(p) for k, p in paths.items()}):
        b = streamed_matrix(source, "gfre", device="cpu", test_size=0.5, chunk_rows=100)
        np.testing.assert_allclose(b.value, a.value, rtol=1e-10, atol=1e-13)


def test_bad_inputs_are_named(tmp_path):
    feats = _panel(300)
    kw = dict(device="cpu", test_size=0.5)
    with pytest.raises(ValueError, match="not streamed"):
        streamed_matrix(feats, "cka")
    with pytest.raises(ValueError, match="n_local_points=301"):
        streamed_matrix(feats, "lfre", n_local_points=301, **kw)
    with pytest.raises(ValueError, match="'determined' or None"):
        streamed_matrix(feats, "lfre", n_local_points="all", **kw)
    with pytest.raises(ValueError, match=r"sources\['short'\] has 299 rows"):
        streamed_matrix({**feats, "short": feats["m0"][:-1]}, "gfre", **kw)
    bad = feats["m0"].copy()
    bad[250, 2] = np.nan
    with pytest.raises(ValueError, match=r"features\['bad'\] hold NaN or infinite values in rows"):
        streamed_matrix({**feats, "bad": bad}, "gfre", **kw)
    with pytest.raises(ValueError, match="zero variance"):
        streamed_matrix({**feats, "flat": np.ones((300, 3), np.float32)}, "gfre", **kw)
    cut = tmp_path / "cut.npy"
    np.save(cut, feats["m2"])
    with open(cut, "r+b") as fh:
        fh.truncate(cut.stat().st_size - 40)
    with pytest.raises(ValueError, match="truncated"):
        streamed_matrix({"a": feats["m2"], "cut": cut}, "gfre", **kw)
