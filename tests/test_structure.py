"""Structure-level analysis: composition, energy baseline, information per order, maps, chemiscope."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from umlip_latents.pooling import cumulant_features
from umlip_latents.structure import (
    composition_fractions,
    downstream_ridge_error,
    order_information,
    paper_agreement,
    paper_pooling_numbers,
    pcovr_map,
    residual_energy,
    write_chemiscope,
)

SEEDS = [0, 1, 2]


def random_composition(seed: int, n_structures: int = 40, elements=(1, 8, 26)):
    """Species and structure index of structures of 1..12 atoms, atoms shuffled."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, size=n_structures)
    index = np.repeat(np.arange(n_structures), sizes)
    rng.shuffle(index)
    return rng.choice(elements, size=len(index)), index


def skewed_structures(seed: int, n_structures: int = 80, dim: int = 2):
    """Per-atom features whose shape (not only location and scale) changes between structures."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(20, 40, size=n_structures)
    index = np.repeat(np.arange(n_structures), sizes)
    shape = rng.uniform(0.3, 4.0, size=(n_structures, dim))
    values = rng.gamma(shape[index], 1.0) * rng.uniform(0.5, 2.0, size=(n_structures, dim))[index]
    return values, index


@pytest.mark.parametrize("seed", SEEDS)
def test_composition_rows_sum_to_one_and_ignore_atom_order(seed):
    species, index = random_composition(seed)
    fractions, elements = composition_fractions(species, index)
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert list(elements) == sorted(set(species.tolist()))
    counts = np.bincount(index)
    np.testing.assert_allclose(fractions * counts[:, None], np.round(fractions * counts[:, None]), atol=1e-9)
    perm = np.random.default_rng(seed + 10).permutation(len(species))
    again, _ = composition_fractions(species[perm], index[perm])
    np.testing.assert_array_equal(again, fractions)


@pytest.mark.parametrize("seed", SEEDS)
def test_baseline_removes_energies_linear_in_composition(seed):
    species, index = random_composition(seed, n_structures=60)
    fractions, elements = composition_fractions(species, index)
    mu = np.random.default_rng(seed).uniform(-9, -2, size=len(elements))
    residual = residual_energy(fractions, fractions @ mu, test_size=0.25, seed=seed)
    assert np.abs(residual).max() < 1e-5
    noise = np.random.default_rng(seed + 1).normal(0, 0.1, size=len(fractions))
    residual = residual_energy(fractions, fractions @ mu + noise, test_size=0.25, seed=seed)
    assert 0.02 < residual.std() < 0.2  # the noise stays, the composition part goes


@pytest.mark.parametrize("seed", SEEDS)
def test_order_information_nests_and_higher_orders_add(seed):
    values, index = skewed_structures(seed)
    info = order_information(values, index, max_order=4, test_size=0.25, seed=seed, device="cpu")
    assert info.attrs["n_train"] == 60 and info.attrs["n_test"] == 20
    back = info[info.measure == "k+1->k"]
    step = info[info.measure == "k->k+1"]
    mean = info[info.measure == "1->k"].set_index("k").gfre
    assert list(step.k) == [1, 2, 3] and list(mean.index) == [1, 2, 3, 4]
    assert (back.gfre < 1e-3).all()   # order k+1 holds order k
    assert (step.gfre > 0.05).all()   # ... but not the other way round
    assert mean[1] < 1e-3 and (mean[2:] > 0.05).all()


def test_order_information_bad_input():
    values, index = skewed_structures(0, n_structures=10)
    with pytest.raises(ValueError, match="max_order"):
        order_information(values, index, max_order=1)
    with pytest.raises(ValueError, match="max_order"):
        order_information(values, index, max_order=9)
    with pytest.raises(ValueError, match="test_size"):
        order_information(values, index, max_order=2, test_size=9)


@pytest.mark.parametrize("seed", SEEDS)
def test_downstream_error_falls_when_target_needs_second_order(seed):
    values, index = skewed_structures(seed, n_structures=120)
    order2 = cumulant_features(values, index, order=2)
    y = order2[:, 2] + 0.01 * np.random.default_rng(seed).normal(size=len(order2))  # std of feature 0
    rmse = [downstream_ridge_error(order2[:, :k * 2], y, seed=seed, cv=5) for k in (1, 2)]
    assert rmse[1] < 0.5 * rmse[0]
    assert rmse[1] < 0.05


def test_downstream_error_bad_input():
    X = np.zeros((10, 3))
    with pytest.raises(ValueError, match="to match"):
        downstream_ridge_error(X, np.zeros(9))
    with pytest.raises(ValueError, match="cv"):
        downstream_ridge_error(X, np.zeros(10), cv=1)
    with pytest.raises(ValueError, match="NaN"):
        downstream_ridge_error(np.full((10, 3), np.nan), np.zeros(10))


@pytest.mark.parametrize("seed", SEEDS)
def test_pcovr_with_mixing_one_is_pca(seed):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(50, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])
    y = rng.normal(size=50)
    T = pcovr_map(X, y, mixing=1.0)
    P = PCA(2).fit_transform(StandardScaler().fit_transform(X))
    assert T.shape == (50, 2)
    for i in range(2):
        assert abs(np.corrcoef(T[:, i], P[:, i])[0, 1]) > 0.999
    with pytest.raises(ValueError, match="mixing"):
        pcovr_map(X, y, mixing=1.5)
    with pytest.raises(ValueError, match="n_components"):
        pcovr_map(X, y, n_components=7)


def test_paper_agreement_names_the_numbers():
    import pandas as pd

    info = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "measure": ["k->k+1", "1->k", "1->k"] * 2,
                         "k": [1, 1, 2] * 2, "gfre": [0.3, 0.0, 0.79, 0.1, 0.0, 0.5]})
    first, second = paper_agreement(info, {"k->k+1": (0.24, 0.42), "1->8": 0.80})
    assert "0.10 to 0.30" in first and "1 of 2 models" in first
    assert "GFRE(1→2)" in second and "0.50 to 0.79" in second and "1 of 2 models" in second


def test_paper_numbers_come_from_the_registry():
    ref = paper_pooling_numbers()
    lo, hi = ref["k->k+1"]
    assert 0 < lo < hi < 1 and 0 < ref["1->8"] < 1


@pytest.fixture
def molecules():
    from ase.build import bulk, molecule

    return [molecule("H2O"), bulk("Si", "diamond", a=5.43), molecule("CH4")]


def test_chemiscope_file_is_written_and_reread(tmp_path, molecules):
    path = tmp_path / "sub" / "map.json.gz"
    xy = np.arange(6.0).reshape(3, 2)
    out = write_chemiscope(path, molecules, {"subset": ["a", "b", "a"], "energy residual": np.array([0.1, -0.2, 0.0])},
                           xy, {"name": "test map", "description": "made by a test"}, color="energy residual")
    assert out == path and path.exists()
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    assert data["meta"]["name"] == "test map"
    assert len(data["structures"]) == 3 and data["structures"][1]["size"] == 2
    props = data["properties"]
    assert set(props) == {"PCovR 1", "PCovR 2", "subset", "energy residual"}
    np.testing.assert_allclose(props["PCovR 2"]["values"], xy[:, 1])
    assert props["subset"]["values"] == ["a", "b", "a"]
    assert data["settings"]["map"]["x"]["property"] == "PCovR 1"


def test_chemiscope_bad_input(tmp_path, molecules):
    xy = np.zeros((3, 2))
    good = {"e": np.zeros(3)}
    with pytest.raises(ValueError, match="json"):
        write_chemiscope(tmp_path / "map.txt", molecules, good, xy, {"name": "x"})
    with pytest.raises(ValueError, match="map_xy"):
        write_chemiscope(tmp_path / "map.json.gz", molecules, good, np.zeros((2, 2)), {"name": "x"})
    with pytest.raises(ValueError, match="property 'e'"):
        write_chemiscope(tmp_path / "map.json.gz", molecules, {"e": np.zeros(4)}, xy, {"name": "x"})
    with pytest.raises(ValueError, match="name"):
        write_chemiscope(tmp_path / "map.json.gz", molecules, good, xy, {})
    with pytest.raises(ValueError, match="color"):
        write_chemiscope(tmp_path / "map.json.gz", molecules, good, xy, {"name": "x"}, color="nope")
    assert not list(tmp_path.iterdir())


def test_composition_bad_input():
    with pytest.raises(ValueError, match="not in elements"):
        composition_fractions(np.array([1, 8]), np.array([0, 0]), elements=[1])
    with pytest.raises(ValueError, match="contiguous"):
        composition_fractions(np.array([1, 8]), np.array([0, 2]))
    with pytest.raises(ValueError, match="integer"):
        composition_fractions(np.array([1.0, 8.0]), np.array([0, 0]))
