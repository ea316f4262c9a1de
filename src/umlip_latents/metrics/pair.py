"""One (source, target) pair: the scikit-matter reconstruction measures, CKA and kernel GFRE."""

from __future__ import annotations

import numpy as np

from ._engine import (
    _device,
    _tensor,
    _check_alphas,
    _resolve_split,
    _scale_split,
    _prepare_pair,
    _Folds,
    _global_errors,
    _local_errors,
    _rms,
    RANDOM_STATE,
)


# ---------------------------------------------------------------------------------------------
# one pair (the skmatter.metrics functions)
# ---------------------------------------------------------------------------------------------

def pointwise_gfre(X, Y, train_idx=None, test_idx=None, *, alphas=None, alpha_type="relative",
                   random_state=RANDOM_STATE, device="auto") -> np.ndarray:
    """Global feature reconstruction error of each test sample (Goscinski et al. 2021).

    ``||y_i - x_i W||`` for scaled rows, ``W`` the 2-fold-CV cutoff ridge fit of ``Y`` on ``X``
    over the training rows; equal to ``skmatter.metrics.pointwise_global_reconstruction_error``
    with its defaults.

    Parameters
    ----------
    X : array of shape (n_samples, D_x)
        Source features; they reconstruct ``Y``.
    Y : array of shape (n_samples, D_y)
        Target features.
    train_idx, test_idx : int arrays, optional
        Row indices. Both ``None``: skmatter's seeded half/half split; one ``None``: the
        complement of the other. (Every skmatter reconstruction function but
        ``pointwise_global_reconstruction_error`` takes ``test_idx`` before ``train_idx``, and
        its LFRE functions take ``n_local_points`` third; pass them by keyword when switching.)
    alphas : array of shape (n_alphas,), default ``geomspace(1e-9, 0.9, 20)``
        Singular-value cutoffs tried by the 2-fold CV, relative to the largest singular value
        of the two folds unless ``alpha_type="absolute"``.
    random_state : int
        Seed of the 2-fold CV split (skmatter's ``0x5F3759DF``).
    device : str
        ``"auto"`` (a GPU when visible), ``"cpu"`` or ``"cuda"``; the arithmetic is float64.

    Returns
    -------
    ndarray of shape (n_test,)
    """
    alphas = _check_alphas(alphas, alpha_type)
    Xtr, Xte, Ytr, Yte = _prepare_pair(X, Y, train_idx, test_idx, device)
    err = _global_errors(Xtr, Xte, _Folds(Ytr, [Ytr.shape[1]], random_state), Yte, alphas=alphas,
                         alpha_type=alpha_type)
    return err[0].cpu().numpy()


def gfre(X, Y, train_idx=None, test_idx=None, **kwargs) -> float:
    """Global feature reconstruction error: RMS over test samples of :func:`pointwise_gfre`.

    Equal to ``skmatter.metrics.global_reconstruction_error``: about 0 when ``X`` holds all
    the (linearly decodable) information of ``Y``, about 1 when it holds none. Arguments as
    :func:`pointwise_gfre`.
    """
    return _rms(pointwise_gfre(X, Y, train_idx, test_idx, **kwargs))


def pointwise_gfrd(X, Y, train_idx=None, test_idx=None, *, alphas=None, alpha_type="relative",
                   random_state=RANDOM_STATE, device="auto") -> np.ndarray:
    """Global feature reconstruction distortion of each test sample (Goscinski et al. 2021).

    Distance between the ridge reconstruction of ``Y`` and its best orthogonal (Procrustes)
    reconstruction from ``X``; equal to
    ``skmatter.metrics.pointwise_global_reconstruction_distortion``. skmatter raises for
    ``D_x > D_y``; here both sides are zero-padded to ``max(D_x, D_y)``. Arguments as
    :func:`pointwise_gfre`.

    Returns
    -------
    ndarray of shape (n_test,)
    """
    alphas = _check_alphas(alphas, alpha_type)
    Xtr, Xte, Ytr, Yte = _prepare_pair(X, Y, train_idx, test_idx, device)
    err = _global_errors(Xtr, Xte, _Folds(Ytr, [Ytr.shape[1]], random_state), Yte, alphas=alphas,
                         alpha_type=alpha_type, distortion=True)
    return err[0].cpu().numpy()


def gfrd(X, Y, train_idx=None, test_idx=None, **kwargs) -> float:
    """Global feature reconstruction distortion: RMS of :func:`pointwise_gfrd`.

    Equal to ``skmatter.metrics.global_reconstruction_distortion``; about 0 when ``Y`` is an
    orthogonal transform of ``X``. Arguments as :func:`pointwise_gfre`.
    """
    return _rms(pointwise_gfrd(X, Y, train_idx, test_idx, **kwargs))


def pointwise_lfre(X, Y, train_idx=None, test_idx=None, *, n_local_points=None, alphas=None,
                   alpha_type="relative", random_state=RANDOM_STATE, device="auto",
                   batch_size=None) -> np.ndarray:
    """Local feature reconstruction error of each test sample (Goscinski et al. 2021).

    For each test sample, its ``n_local_points`` nearest training samples in scaled ``X`` are
    centred and fitted onto the same samples of ``Y`` by the 2-fold-CV cutoff ridge; the error
    is that of the sample's reconstruction. Equal to
    ``skmatter.metrics.pointwise_local_reconstruction_error``. Other arguments as
    :func:`pointwise_gfre`.

    Parameters
    ----------
    n_local_points : int, optional
        Neighbours per local fit; skmatter has no default, here ``min(D_x, D_y)``. As in
        skmatter, a value above the number of training rows uses all of them (here with a
        :class:`~umlip_latents.metrics.LocalPointsWarning`), and one above ``n_samples`` is a ``ValueError``.
    batch_size : int, optional
        Test samples fitted together (default: from a ~256 MB budget).

    Returns
    -------
    ndarray of shape (n_test,)
    """
    alphas = _check_alphas(alphas, alpha_type)
    Xtr, Xte, Ytr, Yte = _prepare_pair(X, Y, train_idx, test_idx, device)
    if n_local_points is not None and n_local_points > len(X):
        raise ValueError(f"X has {len(X)} samples but n_local_points={n_local_points}; "
                         "must have at least n_local_points samples")
    k = int(n_local_points or min(Xtr.shape[1], Ytr.shape[1]))
    err = _local_errors(Xtr, Xte, Ytr, Yte, [Ytr.shape[1]], [k], alphas=alphas, alpha_type=alpha_type,
                        random_state=random_state, batch_size=batch_size)
    return err[0].cpu().numpy()


def lfre(X, Y, train_idx=None, test_idx=None, **kwargs) -> float:
    """Local feature reconstruction error: RMS of :func:`pointwise_lfre`.

    Equal to ``skmatter.metrics.local_reconstruction_error``. Arguments as :func:`pointwise_lfre`.
    """
    return _rms(pointwise_lfre(X, Y, train_idx, test_idx, **kwargs))


def linear_cka(X, Y) -> float:
    """Linear centred kernel alignment (Kornblith, Norouzi, Lee and Hinton, ICML 2019).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``:
    symmetric, in [0, 1], invariant to orthogonal transforms and isotropic scaling.

    Parameters
    ----------
    X : array of shape (n_samples, D_x)
    Y : array of shape (n_samples, D_y)
    """
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X and Y must be 2-D with the same number of rows, got {X.shape} and {Y.shape}")
    X, Y = X - X.mean(0), Y - Y.mean(0)
    denom = np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)
    if denom == 0:
        raise ValueError("linear CKA is undefined for a constant feature matrix")
    return float(np.linalg.norm(Y.T @ X) ** 2 / denom)


def rbf_features(X_train, X_test, gamma, n_components: int, seed: int):
    """Scaled RBF Nystroem features of train and test rows (float64)."""
    from sklearn.kernel_approximation import Nystroem

    if gamma is None:  # 1 / median squared distance between (up to 1000) training rows
        sub = X_train[np.random.default_rng(seed).permutation(len(X_train))[:1000]]
        sq = (sub ** 2).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2 * sub @ sub.T)[np.triu_indices(len(sub), 1)]
        gamma = 1.0 / np.median(d2[d2 > 0]) if np.any(d2 > 0) else 1.0
    ny = Nystroem(kernel="rbf", gamma=gamma, n_components=min(n_components, len(X_train)), random_state=seed)
    F = ny.fit(X_train).transform(np.concatenate([X_train, X_test]))
    n = len(X_train)
    return _scale_split(F, np.arange(n), np.arange(n, len(F)), "kernel features")


def nonlinear_gfre(X, Y, train_idx=None, test_idx=None, *, gamma=None, n_components=1000, seed=0,
                   alphas=None, alpha_type="relative", random_state=RANDOM_STATE, device="auto") -> float:
    """GFRE with kernel ridge regression (RBF kernel) in place of linear ridge.

    Scaled ``X`` is mapped to RBF Nystroem features (exact kernel features when
    ``n_components >= n_train``, a seeded approximation otherwise) that reconstruct scaled
    ``Y`` with the same cutoff ridge and 2-fold CV as :func:`gfre`. A value well below
    :func:`gfre` means the linear error comes from non-linearity, not missing information.

    Parameters
    ----------
    X : array of shape (n_samples, D_x)
    Y : array of shape (n_samples, D_y)
    gamma : float, optional
        RBF ``exp(-gamma ||x - x'||^2)`` on scaled ``X``; default 1 / median squared distance
        between training rows.
    n_components : int
        Nystroem landmarks, training rows drawn with ``seed``.
    Other arguments as :func:`pointwise_gfre`.
    """
    alphas = _check_alphas(alphas, alpha_type)
    if len(X) != len(Y):
        raise ValueError(f"First dimension of X ({len(X)}) and Y ({len(Y)}) must match")
    train_idx, test_idx = _resolve_split(len(X), train_idx, test_idx)
    dev = _device(device)
    Ftr, Fte = rbf_features(*_scale_split(X, train_idx, test_idx, "X"), gamma, n_components, seed)
    Ytr, Yte = (_tensor(a, dev) for a in _scale_split(Y, train_idx, test_idx, "Y"))
    err = _global_errors(_tensor(Ftr, dev), _tensor(Fte, dev), _Folds(Ytr, [Ytr.shape[1]], random_state), Yte,
                         alphas=alphas, alpha_type=alpha_type)
    return _rms(err[0].cpu().numpy())
