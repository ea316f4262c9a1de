"""PCA spectra, effective dimension and the notebook's property checks."""

from __future__ import annotations

import numpy as np

from umlip_latents.checks import invariance_error, transformed_copies
from umlip_latents.features import Block, FeatureSet
from umlip_latents.spectra import components_for_variance, effective_dimension, pca_spectrum


def test_spectrum_equals_numpy_covariance():
    x = np.random.default_rng(0).normal(size=(500, 6)) @ np.diag([5, 3, 1, 1, 0.5, 0.1]) + 7.0
    np.testing.assert_allclose(pca_spectrum(x), np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1], rtol=1e-9)
    corr = np.linalg.eigvalsh(np.corrcoef(x.T))[::-1]
    np.testing.assert_allclose(pca_spectrum(x, standardise=True), corr, rtol=1e-8, atol=1e-12)


def test_effective_dimension_limits():
    assert abs(effective_dimension(np.ones(10)) - 10) < 1e-12
    assert abs(effective_dimension(np.array([1.0, 0, 0])) - 1) < 1e-12
    assert components_for_variance(np.array([0.9, 0.09, 0.01]), 0.99) == 2


def test_invariance_error_sees_a_broken_feature():
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", 5.64).repeat((2, 1, 1))
    copies, maps = transformed_copies([atoms], seed=0)

    def featurise(structures, invariant):
        rows = []
        for a in structures:
            d = a.get_all_distances(mic=True)
            f = np.sort(d, axis=1)[:, 1:4]
            rows.append(f if invariant else np.c_[f, a.positions[:, :1]])
        values = np.concatenate(rows).astype(np.float32)
        idx = np.repeat(np.arange(len(structures)), [len(a) for a in structures])
        return FeatureSet(values, idx, np.concatenate([a.numbers for a in structures]),
                          [Block("f", 0, values.shape[1])], structure_ids=[str(i) for i in range(len(structures))])

    assert invariance_error(featurise([atoms], True), featurise(copies, True), maps) < 1e-6
    assert invariance_error(featurise([atoms], False), featurise(copies, False), maps) > 1e-2
