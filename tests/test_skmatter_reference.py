"""scikit-matter's own reconstruction-measure tests, run against :mod:`umlip_latents.metrics`.

The cases are those of ``ReconstructionMeasuresTests`` in scikit-matter's ``tests/test_metrics.py``
(https://github.com/scikit-learn-contrib/scikit-matter/blob/ccec98fe2da3279151edecf2246d7779141adbd8/tests/test_metrics.py,
BSD-3-Clause): the same data (first 20 iris rows, 2 columns and the same 2 columns twice), the
same rotation, thresholds and neighbour count, rewritten as pytest functions. The prediction
rigidity and distance tests of that file test other functions and are left out.

skmatter's functions take ``(X, Y, test_idx, train_idx)`` (LFRE: ``(X, Y, n_local_points,
test_idx, train_idx)``), ours ``(X, Y, train_idx, test_idx)``: the adapters below keep
skmatter's signatures and call ours by keyword. With the default half/half split (10 training
rows) or 5 training rows, upstream's ``n_local_points=15`` is more than the training rows;
skmatter then fits on all of them, and so do we, with a :class:`LocalPointsWarning`.
"""

from __future__ import annotations

import numpy as np
import pytest
import skmatter.metrics as sk
from sklearn.datasets import load_iris
from sklearn.utils import check_random_state, extmath

from umlip_latents import metrics
from umlip_latents.metrics import LocalPointsWarning

EPS = 1e-5
N_LOCAL_POINTS = 15

_iris = load_iris().data
FEATURES_SMALL = _iris[:20, [0, 1]]
FEATURES_LARGE = _iris[:20, [0, 1, 0, 1]]
_rotation = extmath.randomized_range_finder(np.eye(2), size=2, n_iter=10, random_state=check_random_state(0))
FEATURES_ROTATED_SMALL = FEATURES_SMALL @ _rotation


# skmatter's argument order, mapped onto ours by keyword
def global_reconstruction_error(X, Y, test_idx=None, train_idx=None):
    return metrics.gfre(X, Y, train_idx=train_idx, test_idx=test_idx, device="cpu")


def global_reconstruction_distortion(X, Y, test_idx=None, train_idx=None):
    return metrics.gfrd(X, Y, train_idx=train_idx, test_idx=test_idx, device="cpu")


def local_reconstruction_error(X, Y, n_local_points, test_idx=None, train_idx=None):
    return metrics.lfre(X, Y, train_idx=train_idx, test_idx=test_idx, n_local_points=n_local_points, device="cpu")


def pointwise_local_reconstruction_error(X, Y, n_local_points, test_idx=None, train_idx=None):
    return metrics.pointwise_lfre(X, Y, train_idx=train_idx, test_idx=test_idx, n_local_points=n_local_points,
                                  device="cpu")


# ReconstructionMeasuresTests, case by case

def test_global_reconstruction_error_identity():
    assert abs(global_reconstruction_error(FEATURES_LARGE, FEATURES_LARGE)) < EPS


def test_global_reconstruction_error_small_to_large():
    assert abs(global_reconstruction_error(FEATURES_SMALL, FEATURES_LARGE)) < EPS


def test_global_reconstruction_error_large_to_small():
    assert abs(global_reconstruction_error(FEATURES_LARGE, FEATURES_SMALL)) < EPS


def test_global_reconstruction_distortion_identity():
    assert abs(global_reconstruction_distortion(FEATURES_LARGE, FEATURES_LARGE)) < EPS


def test_global_reconstruction_distortion_small_to_large():
    global_reconstruction_error(FEATURES_SMALL, FEATURES_LARGE)    # upstream: "should just run"


def test_global_reconstruction_distortion_large_to_small():
    global_reconstruction_error(FEATURES_LARGE, FEATURES_SMALL)    # upstream: "should just run"


def test_global_reconstruction_distortion_small_to_rotated_small():
    assert abs(global_reconstruction_distortion(FEATURES_SMALL, FEATURES_ROTATED_SMALL)) < EPS


def test_local_reconstruction_error_identity():
    with pytest.warns(LocalPointsWarning, match="using all 10"):
        assert abs(local_reconstruction_error(FEATURES_LARGE, FEATURES_LARGE, N_LOCAL_POINTS)) < EPS


def test_local_reconstruction_error_small_to_large():
    with pytest.warns(LocalPointsWarning, match="using all 10"):
        assert abs(local_reconstruction_error(FEATURES_SMALL, FEATURES_LARGE, N_LOCAL_POINTS)) < EPS


def test_local_reconstruction_error_large_to_small():
    with pytest.warns(LocalPointsWarning, match="using all 10"):
        assert abs(local_reconstruction_error(FEATURES_LARGE, FEATURES_SMALL, N_LOCAL_POINTS)) < EPS


def test_local_reconstruction_error_train_idx():
    n = len(FEATURES_LARGE)
    with pytest.warns(LocalPointsWarning, match="using all 5"):
        values = pointwise_local_reconstruction_error(FEATURES_LARGE, FEATURES_LARGE, N_LOCAL_POINTS,
                                                      train_idx=np.arange(n // 4))
    assert len(values) == n - n // 4


def test_local_reconstruction_error_test_idx():
    n = len(FEATURES_LARGE)
    values = pointwise_local_reconstruction_error(FEATURES_LARGE, FEATURES_LARGE, N_LOCAL_POINTS,
                                                  test_idx=np.arange(n // 4))
    assert len(values) == n // 4


# beyond upstream: on each of those inputs, our number is skmatter's
_CASES = {
    "gfre_identity": ("global_reconstruction_error", FEATURES_LARGE, FEATURES_LARGE, {}),
    "gfre_small_to_large": ("global_reconstruction_error", FEATURES_SMALL, FEATURES_LARGE, {}),
    "gfre_large_to_small": ("global_reconstruction_error", FEATURES_LARGE, FEATURES_SMALL, {}),
    "gfrd_identity": ("global_reconstruction_distortion", FEATURES_LARGE, FEATURES_LARGE, {}),
    "gfrd_rotated": ("global_reconstruction_distortion", FEATURES_SMALL, FEATURES_ROTATED_SMALL, {}),
    "lfre_identity": ("local_reconstruction_error", FEATURES_LARGE, FEATURES_LARGE, {}),
    "lfre_small_to_large": ("local_reconstruction_error", FEATURES_SMALL, FEATURES_LARGE, {}),
    "lfre_large_to_small": ("local_reconstruction_error", FEATURES_LARGE, FEATURES_SMALL, {}),
    "lfre_train_idx": ("pointwise_local_reconstruction_error", FEATURES_LARGE, FEATURES_LARGE,
                       {"train_idx": np.arange(5)}),
    "lfre_test_idx": ("pointwise_local_reconstruction_error", FEATURES_LARGE, FEATURES_LARGE,
                      {"test_idx": np.arange(5)}),
}


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.filterwarnings("ignore::umlip_latents.metrics.LocalPointsWarning")  # asserted above
def test_same_values_as_skmatter(case):
    name, X, Y, kw = _CASES[case]
    args = (X, Y, N_LOCAL_POINTS) if "local" in name else (X, Y)
    ours, ref = globals()[name](*args, **kw), getattr(sk, name)(*args, **kw)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-10)
