"""Feature-space reconstruction measures between models, exact to scikit-matter and fast.

GFRE, GFRD and LFRE follow Goscinski, Fraux, Imbalzano and Ceriotti, *The role of feature
space in atomistic learning*, Mach. Learn.: Sci. Technol. 2, 025028 (2021), exactly as
``skmatter.metrics`` (0.4.1) implements them: each feature matrix is centred and scaled to
unit total variance on the training atoms (``StandardFlexibleScaler(column_wise=False)``), the
source ``X`` reconstructs the target ``Y`` by ``Ridge2FoldCV(alphas=geomspace(1e-9, 0.9, 20),
alpha_type="relative", regularization_method="cutoff", scoring="neg_root_mean_squared_error")``
and the error of a test atom is the norm of its residual row.

What makes it fast, without changing any number beyond rounding:

- the three SVDs the 2-fold CV needs (fold 1, fold 2, all training rows) are computed once per
  source in float64 and shared by every target, which is only more right-hand-side columns;
- the CV error of every cutoff is read from one cumulative sum over singular components
  (``||y - P_k B_k||^2`` expanded with the Gram matrix of ``P``), not one fit per alpha;
  as in skmatter, one alpha per target is chosen by the mean over its columns of the
  per-column RMSE, averaged over the two folds;
- LFRE: one neighbour search for all test atoms, and the local 2-fold fits of a batch of test
  atoms run as batched torch linear algebra (``device="auto"`` uses a GPU when present).

Beyond the paper: :func:`linear_cka` (Kornblith et al., ICML 2019) and :func:`nonlinear_gfre`
(kernel ridge on RBF Nystroem features) to tell missing information from non-linearity.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Ridge2FoldCV alphas used by skmatter's reconstruction measures (relative alphas must be < 1).
DEFAULT_ALPHAS = np.geomspace(1e-9, 0.9, 20)
#: Seed skmatter uses for its default half/half split and for the 2-fold CV split.
RANDOM_STATE = 0x5F3759DF
METRICS = ("gfre", "gfrd", "lfre", "cka", "nonlinear_gfre")
#: Rough size of the float64 intermediates of one batch (bytes).
_BATCH_BYTES = 2 ** 28


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def _device(device: str):
    import torch

    from .extract.base import resolve_device

    return torch.device(resolve_device(device))


def _check_alphas(alphas, alpha_type: str) -> np.ndarray:
    alphas = DEFAULT_ALPHAS if alphas is None else np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if alphas.ndim != 1 or len(alphas) == 0:
        raise ValueError("alphas must be a non-empty 1-D sequence")
    if alpha_type not in ("relative", "absolute"):
        raise ValueError(f"alpha_type must be 'relative' or 'absolute', got {alpha_type!r}")
    if alpha_type == "relative" and (np.any(alphas < 0) or np.any(alphas >= 1)):
        raise ValueError("relative alphas must lie in [0, 1)")
    return alphas


def _resolve_split(n: int, train_idx, test_idx) -> tuple[np.ndarray, np.ndarray]:
    """skmatter's defaults: a seeded half/half split, or the complement of the one given."""
    if train_idx is None and test_idx is None:
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(np.arange(n), test_size=0.5, train_size=0.5,
                                               random_state=RANDOM_STATE, shuffle=True)
    elif train_idx is None:
        train_idx = np.setdiff1d(np.arange(n), test_idx)
    elif test_idx is None:
        test_idx = np.setdiff1d(np.arange(n), train_idx)
    out = []
    for name, idx in (("train_idx", train_idx), ("test_idx", test_idx)):
        idx = np.asarray(idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D array of integer row indices")
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"{name} holds indices outside 0..{n - 1}")
        out.append(idx)
    if len(out[0]) < 2 or len(out[1]) < 1:
        raise ValueError(f"need at least 2 training and 1 test rows, got {len(out[0])} and {len(out[1])}")
    return out[0], out[1]


def _scale_split(A, train_idx, test_idx, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``A`` centred and scaled to unit total variance with training statistics (float64).

    Same operations as ``StandardFlexibleScaler(column_wise=False)`` on float64 input.
    """
    A = np.asarray(A) if not hasattr(A, "shape") else A
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {A.shape}")
    train = np.asarray(A[train_idx], dtype=np.float64)
    test = np.asarray(A[test_idx], dtype=np.float64)
    if not (np.isfinite(train).all() and np.isfinite(test).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    mean = train.mean(axis=0)
    var = ((train - mean) ** 2).mean(axis=0).sum()
    if var < 1e-12:
        raise ValueError(f"{name} has zero variance on the training rows; it cannot be scaled")
    scale = np.sqrt(var)
    return (train - mean) / scale, (test - mean) / scale


def _prepare_pair(X, Y, train_idx, test_idx, device):
    if len(X) != len(Y):
        raise ValueError(f"First dimension of X ({len(X)}) and Y ({len(Y)}) must match")
    train_idx, test_idx = _resolve_split(len(X), train_idx, test_idx)
    dev = _device(device)
    arrays = [*_scale_split(X, train_idx, test_idx, "X"), *_scale_split(Y, train_idx, test_idx, "Y")]
    return [_tensor(a, dev) for a in arrays]


def _tensor(a, dev):
    import torch

    return torch.as_tensor(a, dtype=torch.float64, device=dev)


# ---------------------------------------------------------------------------------------------
# the engine: Ridge2FoldCV(regularization_method="cutoff") on batches sharing one factorisation
# ---------------------------------------------------------------------------------------------

class _Ridge2FoldCutoff:
    """skmatter's ``Ridge2FoldCV`` with cutoff regularisation, for a batch of source matrices.

    Parameters
    ----------
    X : torch.Tensor of shape (B, n, D), float64
        B independent training matrices with the same number of rows (one per test atom for
        LFRE, B=1 for GFRE). Factorised once; :meth:`fit_predict` takes any number of targets.
    """

    def __init__(self, X, alphas: np.ndarray, alpha_type: str, random_state):
        import torch
        from sklearn.model_selection import KFold

        n_batch, n, dim = X.shape
        folds = next(KFold(n_splits=2, shuffle=True, random_state=random_state).split(np.arange(n)))
        self.X = X
        self.folds = [torch.as_tensor(f, device=X.device) for f in folds]
        self.svd_folds = [torch.linalg.svd(X[:, f], full_matrices=False) for f in self.folds]
        self.svd_all = torch.linalg.svd(X, full_matrices=False)
        self.rcond = max(n, dim) * np.finfo(np.float64).eps  # scipy.linalg.pinv's default, as skmatter
        a = torch.as_tensor(alphas, dtype=X.dtype, device=X.device)[None, :]
        if alpha_type == "relative":
            a = a * torch.maximum(self.svd_folds[0].S[:, :1], self.svd_folds[1].S[:, :1])
        self.scaled = a.expand(n_batch, -1).contiguous()          # (B, A)
        self.cut = self.scaled.clamp(min=self.rcond)              # min(n_fold, #(s > alpha)) as a threshold

    def _fold_rmse(self, Y, a: int, b: int):
        """Per-column RMSE on fold ``b`` of the fits on fold ``a``, for every alpha: (B, A, C)."""
        import torch

        U, s, Vh = self.svd_folds[a]
        X_b, Y_a, Y_b = self.X[:, self.folds[b]], Y[:, self.folds[a]], Y[:, self.folds[b]]
        inv = torch.where(s > self.rcond, 1.0 / s, 0.0)
        P = (X_b @ Vh.mT) * inv[:, None, :]                      # (B, n_b, r): X_b V / s
        Bm = U.mT @ Y_a                                            # (B, r, C):   U^T y_a
        G = P.mT @ P
        # ||y_b - P[:, :k] Bm[:k]||^2 = ||y_b||^2 + sum_{c<k} term_c  (term_c adds component c)
        term = Bm * (2.0 * (torch.tril(G, -1) @ Bm - P.mT @ Y_b) + Bm * torch.diagonal(G, dim1=1, dim2=2)[..., None])
        cum = torch.cat([torch.zeros_like(term[:, :1]), torch.cumsum(term, 1)], 1)
        k = (s[:, None, :] > self.cut[:, :, None]).sum(-1)       # (B, A) components kept per alpha
        sse = (Y_b ** 2).sum(1)[:, None, :] + torch.gather(cum, 1, k[..., None].expand(-1, -1, cum.shape[-1]))
        return (sse.clamp(min=0.0) / Y_b.shape[1]).sqrt()

    def fit_predict(self, Y, X_query, widths):
        """Select one alpha per target by 2-fold CV, refit on all rows, predict ``X_query``.

        Parameters
        ----------
        Y : torch.Tensor of shape (B, n, C)
            Targets side by side; target ``t`` owns ``widths[t]`` consecutive columns.
        X_query : torch.Tensor of shape (B, q, D)

        Returns
        -------
        pred : torch.Tensor of shape (B, q, C)
        best : torch.Tensor of shape (B, T), int64
            Index of the selected alpha of each target.
        """
        import torch

        loss = sum(torch.stack([c.mean(-1) for c in self._fold_rmse(Y, a, b).split(widths, -1)], -1)
                   for a, b in ((0, 1), (1, 0)))                   # (B, A, T)
        best = torch.argmin(loss, dim=1)                           # first best, like np.argmax of -loss/2
        thr = torch.repeat_interleave(torch.gather(self.scaled, 1, best),
                                      torch.as_tensor(widths, device=Y.device), dim=1)
        U, s, Vh = self.svd_all
        Z = (X_query @ Vh.mT) * torch.where(s > 0, 1.0 / s, 0.0)[:, None, :]
        W = (U.mT @ Y) * (s[:, :, None] > thr[:, None, :])
        return Z @ W, best


def _groups(widths, n_rows: int, batch: int = 1) -> list[tuple[int, int]]:
    """Consecutive target ranges whose intermediates fit in ``_BATCH_BYTES``."""
    max_cols = max(1, _BATCH_BYTES // (8 * 6 * max(n_rows, 1) * batch))
    out, lo, cols = [], 0, 0
    for i, w in enumerate(widths):
        if cols and cols + w > max_cols:
            out.append((lo, i))
            lo, cols = i, 0
        cols += w
    out.append((lo, len(widths)))
    return out


def _offsets(widths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(widths)]).astype(int)


def _global_errors(X_train, X_test, Y_train, Y_test, widths, *, alphas, alpha_type, random_state,
                   distortion: bool = False) -> list:
    """Pointwise GFRE (or GFRD) of every target: list of (n_test,) tensors."""
    import torch

    n_train = len(X_train)
    query = torch.cat([X_train, X_test])[None] if distortion else X_test[None]
    model = _Ridge2FoldCutoff(X_train[None], alphas, alpha_type, random_state)
    off = _offsets(widths)
    out = []
    for lo, hi in _groups(widths, n_train):
        w = list(widths[lo:hi])
        pred, _ = model.fit_predict(Y_train[None, :, off[lo]:off[hi]], query, w)
        for t, p in zip(range(lo, hi), pred[0].split(w, 1)):
            if distortion:
                out.append(_distortion(X_train, X_test, p[:n_train], p[n_train:]))
            else:
                out.append(torch.linalg.vector_norm(Y_test[:, off[t]:off[t + 1]] - p, dim=1))
    return out


def _distortion(X_train, X_test, P_train, P_test):
    """skmatter's GFRD step: OrthogonalRegression(use_orthogonal_projector=False) on the ridge fit.

    Both sides are zero-padded to ``m = max(D_x, D_y)``; the Procrustes rotation maps the
    padded ``X`` onto the padded ridge predictions. For ``D_x > D_y`` skmatter fails on a
    shape mismatch; here the prediction is padded too, which is the same padded problem.
    """
    import torch

    dx, dy = X_train.shape[1], P_train.shape[1]
    m = max(dx, dy)
    M = torch.zeros(m, m, dtype=X_train.dtype, device=X_train.device)
    M[:dx, :dy] = X_train.T @ P_train
    u, _, vh = torch.linalg.svd(M)
    orth = X_test @ (u @ vh)[:dx]
    ref = torch.nn.functional.pad(P_test, (0, m - dy))
    return torch.linalg.vector_norm(ref - orth, dim=1)


def _neighbour_order(X_train, X_test, k: int):
    """Indices of the ``k`` nearest training rows of each test row, nearest first: (n_test, k).

    On CPU the squared distances and ``np.argsort`` are skmatter's own expressions, so ties
    are broken the same way; on a GPU ``torch.topk`` is used.
    """
    import torch

    step = max(1, 2 ** 25 // max(len(X_train), 1))
    if X_train.device.type == "cpu":
        a, b = X_train.numpy(), X_test.numpy()
        out = np.empty((len(b), k), dtype=np.int64)
        for lo in range(0, len(b), step):
            d = np.sum(a ** 2, axis=1) + np.sum(b[lo:lo + step] ** 2, axis=1)[:, np.newaxis] - 2 * b[lo:lo + step] @ a.T
            out[lo:lo + step] = np.argsort(d, axis=1)[:, :k]
        return torch.as_tensor(out)
    parts = []
    for lo in range(0, len(X_test), step):
        q = X_test[lo:lo + step]
        d = (X_train ** 2).sum(1) + (q ** 2).sum(1)[:, None] - 2 * q @ X_train.T
        parts.append(torch.topk(d, k, dim=1, largest=False, sorted=True).indices)
    return torch.cat(parts)


def _local_errors(X_train, X_test, Y_train, Y_test, widths, ks, *, alphas, alpha_type, random_state,
                  batch_size=None) -> list:
    """Pointwise LFRE of every target (target ``t`` with ``ks[t]`` neighbours): list of (n_test,)."""
    import torch

    if max(ks) > len(X_train):
        raise ValueError(f"n_local_points={max(ks)} exceeds the {len(X_train)} training rows")
    order = _neighbour_order(X_train, X_test, max(ks)).to(X_train.device)
    off = _offsets(widths)
    out = [None] * len(widths)
    for k in sorted(set(ks)):
        targets = [t for t in range(len(widths)) if ks[t] == k]
        cols = torch.as_tensor(np.concatenate([np.arange(off[t], off[t + 1]) for t in targets]), device=X_train.device)
        w = [widths[t] for t in targets]
        Yg_train, Yg_test = Y_train[:, cols], Y_test[:, cols]
        step = batch_size or max(1, _BATCH_BYTES // (8 * 8 * k * (X_train.shape[1] + len(cols))))
        errors = []
        for lo in range(0, len(X_test), step):
            idx = order[lo:lo + step, :k]
            Xl, Yl = X_train[idx], Yg_train[idx]                 # (b, k, D), (b, k, C)
            mx, my = Xl.mean(1, keepdim=True), Yl.mean(1, keepdim=True)
            model = _Ridge2FoldCutoff(Xl - mx, alphas, alpha_type, random_state)
            pred, _ = model.fit_predict(Yl - my, X_test[lo:lo + step, None, :] - mx, w)
            res = Yg_test[lo:lo + step] - (my + pred)[:, 0]
            errors.append(torch.stack([torch.linalg.vector_norm(r, dim=1) for r in res.split(w, 1)], 1))
        for j, t in enumerate(targets):
            out[t] = torch.cat(errors)[:, j]
    return out


def _rms(pointwise) -> float:
    v = np.asarray(pointwise, dtype=np.float64)
    return float(np.linalg.norm(v) / np.sqrt(len(v)))


# ---------------------------------------------------------------------------------------------
# public pair functions (skmatter.metrics equivalents)
# ---------------------------------------------------------------------------------------------

_PAIR_DOC = """
    Parameters
    ----------
    X : array of shape (n_samples, D_x)
        Source features; they reconstruct ``Y``.
    Y : array of shape (n_samples, D_y)
        Target features.
    train_idx, test_idx : int arrays, optional
        Row indices. Both ``None``: skmatter's seeded half/half split; one ``None``: the
        complement of the other. (skmatter's aggregate functions take ``test_idx`` first when
        passed positionally; pass them by keyword to be safe.)
    alphas : array of shape (n_alphas,), default ``geomspace(1e-9, 0.9, 20)``
        Cutoffs tried by the 2-fold CV, relative to the largest singular value of the folds
        unless ``alpha_type="absolute"``.
    random_state : int
        Seed of the 2-fold CV split (skmatter's ``0x5F3759DF``).
    device : str
        ``"auto"`` (GPU when visible), ``"cpu"`` or ``"cuda"``. Computation is float64.
"""


def pointwise_gfre(X, Y, train_idx=None, test_idx=None, *, alphas=None, alpha_type="relative",
                   random_state=RANDOM_STATE, device="auto") -> np.ndarray:
    """Global feature reconstruction error of each test sample (Goscinski et al. 2021, eq. 3).

    ``||y_i - x_i W||`` with ``W`` the 2-fold-CV cutoff ridge fit of scaled ``Y`` on scaled ``X``;
    equal to ``skmatter.metrics.pointwise_global_reconstruction_error`` with its defaults.
    {doc}
    Returns
    -------
    ndarray of shape (n_test,)
    """
    alphas = _check_alphas(alphas, alpha_type)
    Xtr, Xte, Ytr, Yte = _prepare_pair(X, Y, train_idx, test_idx, device)
    err = _global_errors(Xtr, Xte, Ytr, Yte, [Ytr.shape[1]], alphas=alphas, alpha_type=alpha_type,
                         random_state=random_state)
    return err[0].cpu().numpy()


def gfre(X, Y, train_idx=None, test_idx=None, **kwargs) -> float:
    """Global feature reconstruction error: RMS over test samples of :func:`pointwise_gfre`.

    Equal to ``skmatter.metrics.global_reconstruction_error``. About 0 when ``X`` holds all the
    (linear) information of ``Y``; about 1 when it holds none (Goscinski et al. 2021).
    Keyword arguments as :func:`pointwise_gfre`.
    """
    return _rms(pointwise_gfre(X, Y, train_idx, test_idx, **kwargs))


def pointwise_gfrd(X, Y, train_idx=None, test_idx=None, *, alphas=None, alpha_type="relative",
                   random_state=RANDOM_STATE, device="auto") -> np.ndarray:
    """Global feature reconstruction distortion of each test sample (Goscinski et al. 2021, eq. 5).

    Distance between the ridge reconstruction of ``Y`` and its best orthogonal (Procrustes)
    approximation from ``X``, as ``skmatter.metrics.pointwise_global_reconstruction_distortion``.
    skmatter raises for ``D_x > D_y``; here both are zero-padded to ``max(D_x, D_y)``.
    {doc}
    Returns
    -------
    ndarray of shape (n_test,)
    """
    alphas = _check_alphas(alphas, alpha_type)
    Xtr, Xte, Ytr, Yte = _prepare_pair(X, Y, train_idx, test_idx, device)
    err = _global_errors(Xtr, Xte, Ytr, Yte, [Ytr.shape[1]], alphas=alphas, alpha_type=alpha_type,
                         random_state=random_state, distortion=True)
    return err[0].cpu().numpy()


def gfrd(X, Y, train_idx=None, test_idx=None, **kwargs) -> float:
    """Global feature reconstruction distortion: RMS of :func:`pointwise_gfrd`.

    Equal to ``skmatter.metrics.global_reconstruction_distortion``; about 0 when ``Y`` is an
    orthogonal transform of ``X``. Keyword arguments as :func:`pointwise_gfrd`.
    """
    return _rms(pointwise_gfrd(X, Y, train_idx, test_idx, **kwargs))


def pointwise_lfre(X, Y, train_idx=None, test_idx=None, *, n_local_points=None, alphas=None,
                   alpha_type="relative", random_state=RANDOM_STATE, device="auto",
                   batch_size=None) -> np.ndarray:
    """Local feature reconstruction error of each test sample (Goscinski et al. 2021, eq. 6).

    For each test sample, the ``n_local_points`` nearest training samples in scaled ``X`` are
    centred and a 2-fold-CV cutoff ridge fit maps them onto the same samples of ``Y``; the
    error is that of the sample's reconstruction. Equal to
    ``skmatter.metrics.pointwise_local_reconstruction_error``.
    {doc}
    n_local_points : int, optional
        Neighbours per local fit. skmatter requires it; the default here is
        ``min(D_x, D_y)``.
    batch_size : int, optional
        Test samples fitted together (default: from a ~256 MB budget).

    Returns
    -------
    ndarray of shape (n_test,)
    """
    alphas = _check_alphas(alphas, alpha_type)
    Xtr, Xte, Ytr, Yte = _prepare_pair(X, Y, train_idx, test_idx, device)
    k = n_local_points or min(Xtr.shape[1], Ytr.shape[1])
    if k < 2:
        raise ValueError("n_local_points must be at least 2")
    err = _local_errors(Xtr, Xte, Ytr, Yte, [Ytr.shape[1]], [int(k)], alphas=alphas, alpha_type=alpha_type,
                        random_state=random_state, batch_size=batch_size)
    return err[0].cpu().numpy()


def lfre(X, Y, train_idx=None, test_idx=None, **kwargs) -> float:
    """Local feature reconstruction error: RMS of :func:`pointwise_lfre`.

    Equal to ``skmatter.metrics.local_reconstruction_error``. Keyword arguments as
    :func:`pointwise_lfre`.
    """
    return _rms(pointwise_lfre(X, Y, train_idx, test_idx, **kwargs))


for _f in (pointwise_gfre, pointwise_gfrd, pointwise_lfre):
    _f.__doc__ = _f.__doc__.replace("    {doc}", _PAIR_DOC.strip("\n"))


def linear_cka(X, Y) -> float:
    """Linear centred kernel alignment (Kornblith, Norouzi, Lee, Hinton, ICML 2019).

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``.
    Symmetric, in [0, 1], invariant to orthogonal transforms and isotropic scaling.

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


def _rbf_features(X_train, X_test, gamma, n_components: int, seed: int):
    from sklearn.kernel_approximation import Nystroem

    if gamma is None:  # median heuristic on a seeded subsample of training rows
        rng = np.random.default_rng(seed)
        sub = X_train[rng.choice(len(X_train), min(len(X_train), 1000), replace=False)]
        d2 = ((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1)[np.triu_indices(len(sub), 1)]
        gamma = 1.0 / np.median(d2[d2 > 0]) if np.any(d2 > 0) else 1.0
    ny = Nystroem(kernel="rbf", gamma=gamma, n_components=min(n_components, len(X_train)), random_state=seed)
    ny.fit(X_train)
    return ny.transform(X_train), ny.transform(X_test)


def nonlinear_gfre(X, Y, train_idx=None, test_idx=None, *, gamma=None, n_components=1000, seed=0,
                   alphas=None, alpha_type="relative", random_state=RANDOM_STATE, device="auto") -> float:
    """GFRE with kernel ridge regression (RBF kernel) in place of linear ridge.

    ``X`` and ``Y`` are scaled as for :func:`gfre`; ``X`` is mapped to RBF Nystroem features
    (exact kernel features when ``n_components >= n_train``, a seeded approximation otherwise),
    which then reconstruct ``Y`` with the same cutoff ridge and 2-fold CV. A value well below
    :func:`gfre` means the linear error came from non-linearity, not missing information.

    Parameters
    ----------
    X : array of shape (n_samples, D_x)
    Y : array of shape (n_samples, D_y)
    gamma : float, optional
        RBF width ``exp(-gamma ||x - x'||^2)`` on scaled ``X``; default 1 / median squared
        distance between training rows.
    n_components : int
        Nystroem landmarks (training rows drawn with ``seed``).
    """
    alphas = _check_alphas(alphas, alpha_type)
    if len(X) != len(Y):
        raise ValueError(f"First dimension of X ({len(X)}) and Y ({len(Y)}) must match")
    train_idx, test_idx = _resolve_split(len(X), train_idx, test_idx)
    Xtr, Xte = _scale_split(X, train_idx, test_idx, "X")
    Ftr, Fte = _rbf_features(Xtr, Xte, gamma, n_components, seed)
    n_tr = len(Ftr)
    Ftr, Fte = _scale_split(np.concatenate([Ftr, Fte]), np.arange(n_tr), np.arange(n_tr, n_tr + len(Fte)), "kernel features")
    Ytr, Yte = _scale_split(Y, train_idx, test_idx, "Y")
    dev = _device(device)
    err = _global_errors(*(_tensor(a, dev) for a in (Ftr, Fte, Ytr, Yte)), [Ytr.shape[1]], alphas=alphas,
                         alpha_type=alpha_type, random_state=random_state)
    return _rms(err[0].cpu().numpy())


# ---------------------------------------------------------------------------------------------
# all pairs of models
# ---------------------------------------------------------------------------------------------

def _check_features(features) -> tuple[list, list, list]:
    from .features import FeatureSet

    if not isinstance(features, Mapping) or not features:
        raise TypeError("features must be a non-empty mapping model key -> FeatureSet or (n_atoms, D) array")
    names, arrays, fsets = [], [], []
    for key, f in features.items():
        values = f.values if isinstance(f, FeatureSet) else np.asarray(f)
        if values.ndim != 2:
            raise ValueError(f"features[{key!r}] must be 2-D (n_atoms, D), got shape {values.shape}")
        names.append(key)
        arrays.append(values)
        fsets.append(f if isinstance(f, FeatureSet) else None)
    sizes = {k: len(a) for k, a in zip(names, arrays)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"features are not aligned, n_atoms differ: {sizes}; extract every model on the same structures")
    ref = next(((k, f) for k, f in zip(names, fsets) if f is not None), None)
    for key, f in zip(names, fsets):
        if f is None or ref is None:
            continue
        if not np.array_equal(f.species, ref[1].species):
            i = int(np.flatnonzero(f.species != ref[1].species)[0])
            raise ValueError(f"features are not aligned: atom {i} is Z={f.species[i]} in {key!r} "
                             f"but Z={ref[1].species[i]} in {ref[0]!r}")
        if f.structure_ids and ref[1].structure_ids and f.structure_ids != ref[1].structure_ids:
            raise ValueError(f"features are not aligned: {key!r} and {ref[0]!r} hold different structures")
    return names, arrays, fsets


def _labels(stratify, subsets, fsets, n: int):
    if stratify is None:
        return None
    if isinstance(stratify, str):
        if stratify != "subset":
            raise ValueError(f"stratify must be None, 'subset' or a per-atom label array, got {stratify!r}")
        if subsets is None:
            raise ValueError("stratify='subset' needs subsets=: labels per atom (n_atoms,) or per structure")
        stratify = subsets
    labels = np.asarray(stratify)
    fs = next((f for f in fsets if f is not None), None)
    if len(labels) != n and fs is not None and len(labels) == fs.n_structures:
        labels = labels[fs.structure_index]
    if len(labels) != n:
        raise ValueError(f"stratify labels have length {len(labels)}, expected n_atoms={n}")
    return labels


def split_indices(n: int, test_size=1000, stratify=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of ``n`` atoms, as used by :func:`reconstruction_matrix`.

    Parameters
    ----------
    test_size : int or float
        Test atoms as a count, or as a fraction when a float below 1.
    stratify : array of shape (n,), optional
        Labels whose proportions both sides keep.

    Returns
    -------
    train_idx, test_idx : int arrays
    """
    from sklearn.model_selection import train_test_split

    labels = stratify

    n_test = int(round(test_size * n)) if isinstance(test_size, float) and test_size < 1 else int(test_size)
    if not 1 <= n_test <= n - 2:
        raise ValueError(f"test_size={test_size} leaves no room for a split of {n} atoms (need >= 2 training atoms)")
    return train_test_split(np.arange(n), test_size=n_test, random_state=seed, shuffle=True, stratify=labels)


def _matrix_values(arrays, metrics, train_idx, test_idx, opts, dev) -> dict:
    """``{(metric, source, target): value}`` for one split, sources and targets by position."""
    import torch

    scaled = [_scale_split(a, train_idx, test_idx, f"features[{i}]") for i, a in enumerate(arrays)]
    train = torch.cat([_tensor(s[0], dev) for s in scaled], 1)
    test = torch.cat([_tensor(s[1], dev) for s in scaled], 1)
    widths = [a.shape[1] for a in arrays]
    off = _offsets(widths)
    ridge = {k: opts[k] for k in ("alphas", "alpha_type", "random_state")}
    out = {}
    for s in range(len(arrays)):
        Xtr, Xte = train[:, off[s]:off[s + 1]], test[:, off[s]:off[s + 1]]
        for metric in metrics:
            if metric in ("gfre", "gfrd"):
                errs = _global_errors(Xtr, Xte, train, test, widths, distortion=metric == "gfrd", **ridge)
            elif metric == "lfre":
                ks = [opts["n_local_points"] or min(widths[s], w) for w in widths]
                errs = _local_errors(Xtr, Xte, train, test, widths, ks, batch_size=opts["batch_size"], **ridge)
            elif metric == "nonlinear_gfre":
                Ftr, Fte = _rbf_features(scaled[s][0], scaled[s][1], None, opts["n_components"], opts["seed"])
                n_tr = len(Ftr)
                Ftr, Fte = _scale_split(np.concatenate([Ftr, Fte]), np.arange(n_tr), np.arange(n_tr, n_tr + len(Fte)),
                                        "kernel features")
                errs = _global_errors(_tensor(Ftr, dev), _tensor(Fte, dev), train, test, widths, **ridge)
            else:  # cka, on the test atoms
                for t in range(len(arrays)):
                    out[metric, s, t] = linear_cka(scaled[s][1], scaled[t][1])
                continue
            for t, e in enumerate(errs):
                out[metric, s, t] = _rms(e.cpu().numpy())
    return out


def reconstruction_matrix(features, metric="gfre", test_size=1000, stratify=None, seed=0, n_boot=0,
                          device="auto", subsets=None, *, n_local_points=None, alphas=None,
                          alpha_type="relative", random_state=RANDOM_STATE, n_components=1000,
                          batch_size=None):
    """Every model reconstructing every model (diagonal included), as a tidy table.

    Parameters
    ----------
    features : mapping model key -> FeatureSet or array of shape (n_atoms, D_model)
        Per-atom features of the same atoms in the same order (``n_atoms``, and for
        FeatureSets ``species`` and ``structure_ids``, must agree).
    metric : str or list of str
        Any of ``"gfre"``, ``"gfrd"``, ``"lfre"``, ``"cka"`` (linear CKA on the test atoms),
        ``"nonlinear_gfre"``.
    test_size : int or float
        Test atoms, as a count or (float < 1) a fraction; the rest train.
    stratify : None, "subset" or array of shape (n_atoms,)
        Stratify the split by these labels (``"subset"``: by ``subsets``).
    seed : int
        Seed of the train/test split.
    n_boot : int
        If > 0, the matrix is recomputed on ``n_boot`` re-drawn splits (seeds ``seed + 1``,
        ``seed + 2`` ...) and ``ci_low``/``ci_high`` are their 2.5 and 97.5 percentiles.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    subsets : array of shape (n_atoms,) or (n_structures,), optional
        Per-atom (or, with FeatureSets, per-structure) labels used by ``stratify="subset"``.
    n_local_points : int, optional
        LFRE neighbours; default ``min(D_source, D_target)`` per pair.
    alphas, alpha_type, random_state
        Ridge2FoldCV settings, as :func:`pointwise_gfre`.
    n_components : int
        Nystroem landmarks of ``"nonlinear_gfre"``.
    batch_size : int, optional
        LFRE test atoms per batch.

    Returns
    -------
    pandas.DataFrame
        Columns ``source, target, metric, value, ci_low, ci_high``; ``source`` reconstructs
        ``target``. ``attrs`` records the split sizes and settings.
    """
    import pandas as pd

    names, arrays, fsets = _check_features(features)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    if n_local_points is not None and n_local_points < 2:
        raise ValueError("n_local_points must be at least 2")
    opts = dict(alphas=_check_alphas(alphas, alpha_type), alpha_type=alpha_type, random_state=random_state,
                n_local_points=n_local_points, n_components=n_components, seed=seed, batch_size=batch_size)
    n = len(arrays[0])
    labels = _labels(stratify, subsets, fsets, n)
    dev = _device(device)
    train_idx, test_idx = split_indices(n, test_size, labels, seed)
    values = _matrix_values(arrays, metrics, train_idx, test_idx, opts, dev)
    boots = [_matrix_values(arrays, metrics, *split_indices(n, test_size, labels, seed + 1 + b), opts, dev)
             for b in range(n_boot)]
    rows = []
    for (m, s, t), v in values.items():
        lo, hi = np.percentile([b[m, s, t] for b in boots], [2.5, 97.5]) if boots else (np.nan, np.nan)
        rows.append({"source": names[s], "target": names[t], "metric": m, "value": v, "ci_low": lo, "ci_high": hi})
    df = pd.DataFrame(rows, columns=["source", "target", "metric", "value", "ci_low", "ci_high"])
    df.attrs.update(n_train=len(train_idx), n_test=len(test_idx), seed=seed, n_boot=n_boot, device=str(dev),
                    test_size=test_size, n_local_points=n_local_points, alpha_type=alpha_type,
                    alphas=opts["alphas"].tolist())
    return df
