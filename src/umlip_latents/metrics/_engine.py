"""The engine of :mod:`umlip_latents.metrics`: input handling and the batched Ridge2FoldCV fits."""

from __future__ import annotations

import warnings

import numpy as np

from ..threads import one_cpu_thread

#: Ridge2FoldCV alphas of skmatter's reconstruction measures (relative alphas must be < 1).
DEFAULT_ALPHAS = np.geomspace(1e-9, 0.9, 20)
#: Seed of skmatter's default half/half split and of its 2-fold CV split.
RANDOM_STATE = 0x5F3759DF
METRICS = ("gfre", "gfrd", "lfre", "cka", "nonlinear_gfre")
#: Rough size of the float64 intermediates of one LFRE batch or test chunk (bytes).
_BATCH_BYTES = 2 ** 28


class LocalPointsWarning(UserWarning):
    """LFRE was asked for more neighbours than there are training rows: all of them are used.

    scikit-matter does the same silently (``argsort(...)[:n_local_points]`` of fewer rows).
    """


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def _device(device: str):
    import torch

    from ..extract.base import resolve_device

    return torch.device(resolve_device(device))


def _tensor(a, dev):
    import torch

    return torch.as_tensor(a, dtype=torch.float64, device=dev)


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


def non_finite_message(A, rows, name: str) -> str:
    """What to say when ``A``'s rows ``rows`` hold a NaN or an infinity: the first such rows (atoms)."""
    rows = np.asarray(rows)
    atoms = np.sort(rows[~np.isfinite(np.asarray(A[rows], dtype=np.float64)).all(1)])
    if not len(atoms):   # finite values whose variance overflows
        return f"{name} holds values too large to scale (their variance overflows float64)"
    return (f"{name} holds NaN or infinite values (atoms {', '.join(map(str, atoms[:5]))}"
            f"{', ...' if len(atoms) > 5 else ''})")


def _scale_split(A, train_idx, test_idx, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and test rows of ``A`` (float64), centred and scaled by the training rows.

    The operations of ``StandardFlexibleScaler(column_wise=False)`` on float64 input, so the
    scaled values (and hence LFRE's neighbour order) are bit-identical to skmatter's.
    """
    A = A if hasattr(A, "shape") else np.asarray(A)
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(A.shape)}")
    train = np.asarray(A[train_idx], dtype=np.float64)   # integer indexing copies: safe to scale in place
    test = np.asarray(A[test_idx], dtype=np.float64)
    if not (np.isfinite(train).all() and np.isfinite(test).all()):
        raise ValueError(non_finite_message(A, np.concatenate([train_idx, test_idx]), name))
    mean = train.mean(axis=0)
    train -= mean
    with np.errstate(over="ignore"):
        var = (train ** 2).mean(axis=0).sum()
    if not np.isfinite(var):
        raise ValueError(non_finite_message(A, np.concatenate([train_idx, test_idx]), name))
    if var < 1e-12:
        raise ValueError(f"{name} has zero variance on the training rows; it cannot be scaled")
    scale = np.sqrt(var)
    train /= scale
    test -= mean
    test /= scale
    return train, test


def _prepare_pair(X, Y, train_idx, test_idx, device):
    if len(X) != len(Y):
        raise ValueError(f"First dimension of X ({len(X)}) and Y ({len(Y)}) must match")
    train_idx, test_idx = _resolve_split(len(X), train_idx, test_idx)
    dev = _device(device)
    arrays = [*_scale_split(X, train_idx, test_idx, "X"), *_scale_split(Y, train_idx, test_idx, "Y")]
    return [_tensor(a, dev) for a in arrays]


# ---------------------------------------------------------------------------------------------
# the engine: Ridge2FoldCV(regularization_method="cutoff"), one factorisation per source
# ---------------------------------------------------------------------------------------------

def _kfold(n: int, random_state) -> list[np.ndarray]:
    """The two CV folds ``Ridge2FoldCV`` draws: ``next(KFold(2, shuffle=True).split(...))``."""
    from sklearn.model_selection import KFold

    return list(next(KFold(n_splits=2, shuffle=True, random_state=random_state).split(np.arange(n))))


def _alpha_cuts(s_a, s_b, alphas, alpha_type: str, rcond: float):
    """Scaled alphas (B, A) and the CV thresholds ``max(alpha, rcond)`` on singular values."""
    import torch

    a = torch.as_tensor(alphas, dtype=s_a.dtype, device=s_a.device)[None, :]
    if alpha_type == "relative":  # relative to the largest singular value of both folds
        a = a * torch.maximum(s_a[:, :1], s_b[:, :1])
    scaled = a.expand(len(s_a), -1).contiguous()
    return scaled, scaled.clamp(min=rcond)


def _safe_inv(s, floor: float):
    import torch

    return torch.where(s > floor, 1.0 / s, 0.0)


def _cv_rmse(s, cut, Bm, PtY, PtP, yy, n_b: int):
    """Per-column RMSE on fold b of the cutoff fits on fold a, for every alpha: (B, A, C).

    With ``P = X_b V_a / s_a`` and ``Bm = U_a^T y_a``, keeping ``k`` components predicts
    ``P[:, :k] Bm[:k]``, whose squared error is ``||y_b||^2`` plus a cumulative sum over
    components of terms built from ``P^T y_b`` and ``P^T P``: all alphas in one pass.

    Parameters
    ----------
    s : (B, r) singular values of fold a, descending;  cut : (B, A) thresholds on ``s``
    Bm, PtY : (B, r, C);  PtP : (B, r, r);  yy : (B, C) ``||y_b||^2``;  n_b : rows of fold b
    """
    import torch

    term = torch.baddbmm(PtY, torch.tril(PtP, -1), Bm, beta=-2.0, alpha=2.0)   # 2 (H - P^T y_b)
    term = Bm * torch.addcmul(term, Bm, torch.diagonal(PtP, dim1=1, dim2=2)[..., None])
    cum = torch.cumsum(term, 1)
    k = (s[:, None, :] > cut[:, :, None]).sum(-1, keepdim=True)      # (B, A, 1) components kept
    gained = torch.gather(cum, 1, (k - 1).clamp(min=0).expand(-1, -1, cum.shape[-1]))
    sse = yy[:, None, :] + torch.where(k > 0, gained, 0.0)
    return (sse.clamp(min=0.0) / n_b).sqrt()


def _best_alphas(losses, scaled, widths):
    """Scaled alpha chosen for each target (B, T): smallest column-mean RMSE summed over folds.

    The same choice as skmatter's ``argmax`` of ``-(rmse_12 + rmse_21) / 2`` (first on ties).
    """
    import torch

    loss = sum(torch.stack([c.mean(-1) for c in rmse.split(widths, -1)], -1) for rmse in losses)  # (B, A, T)
    return torch.gather(scaled, 1, torch.argmin(loss, dim=1))


def fold_order(n: int, random_state) -> tuple[np.ndarray, int]:
    """Row order that puts ``Ridge2FoldCV``'s CV fold 1 before fold 2, and the size of fold 1."""
    f1, f2 = _kfold(n, random_state)
    return np.concatenate([f1, f2]), len(f1)


class _Folds:
    """Training targets, rows reordered as CV fold 1 then fold 2 (the same for every source).

    ``presorted=True`` says that ``Y`` (and every source given with these folds) already has
    its rows in :func:`fold_order`: the folds are then views, not copies, which is what keeps
    the full matrix of many models within memory.
    """

    def __init__(self, Y, widths, random_state, presorted: bool = False):
        import torch

        if presorted:  # only fold 1's size is needed
            self.order, n1 = None, len(Y) // 2   # KFold(2): the first split's training part, floor(n / 2)
        else:
            order, n1 = fold_order(len(Y), random_state)
            self.order = torch.as_tensor(order, device=Y.device)
            Y = Y[self.order]
        self.slices = [slice(0, n1), slice(n1, len(Y))]
        self.Y = [Y[sl] for sl in self.slices]
        self.yy = [(y * y).sum(0) for y in self.Y]
        self.widths = list(widths)


class _GlobalRidge:
    """Cutoff ``Ridge2FoldCV`` of all targets in ``folds`` from one source ``X`` (n, D).

    Each fold is factorised as ``X_a = Q_a R_a``, ``R_a = U_R S V^T``, so ``U_a = Q_a U_R`` and
    ``U_a^T Y_a`` is as accurate as with an SVD of the data; the SVD of all training rows
    comes from the QR of the stacked ``R_1, R_2``. Targets enter only through ``Q_a^T Y_a``.

    ``own=(lo, hi)`` says that the targets' columns ``lo:hi`` are ``X`` itself (a model among
    the targets it reconstructs): their ``Q_a^T Y_a`` is ``R_a``, not computed again.
    """

    def __init__(self, X, folds: _Folds, alphas, alpha_type, own=None):
        import torch

        n, dim = X.shape
        X = X if folds.order is None else X[folds.order]
        QR = [torch.linalg.qr(X[sl]) for sl in folds.slices]
        QtY = [_project(q, r, y, own) for (q, r), y in zip(QR, folds.Y)]
        svd = [torch.linalg.svd(r, full_matrices=False) for _, r in QR]
        rcond = max(n, dim) * np.finfo(np.float64).eps  # scipy.linalg.pinv's default, as skmatter
        scaled, cut = _alpha_cuts(svd[0].S[None], svd[1].S[None], alphas, alpha_type, rcond)
        losses = []
        for a, b in ((0, 1), (1, 0)):
            U, s, Vh = svd[a]
            T = QR[b].R @ (Vh.T * _safe_inv(s, rcond))               # X_b V_a / s_a = Q_b T
            losses.append(_cv_rmse(s[None], cut, (U.T @ QtY[a])[None], (T.T @ QtY[b])[None], (T.T @ T)[None],
                                   folds.yy[b][None], len(folds.Y[b])))
        thr = torch.repeat_interleave(_best_alphas(losses, scaled, folds.widths)[0],
                                      torch.as_tensor(folds.widths, device=X.device))
        Q, R = torch.linalg.qr(torch.cat([QR[0].R, QR[1].R]))
        U, self.s, self.Vh = torch.linalg.svd(R, full_matrices=False)
        self.Vs = self.Vh.T * _safe_inv(self.s, 0.0)                  # V / s
        self.W = ((Q @ U).T @ torch.cat(QtY)) * (self.s[:, None] > thr[None, :])   # masked U^T Y

    def train_cross(self, cols):
        """``X_train^T Y_pred_train`` of the targets' ``cols``, i.e. ``V S W``: (D, len(cols))."""
        return self.Vh.T @ (self.s[:, None] * self.W[:, cols])


def _project(q, r, y, own):
    """``q^T y``, where ``y[:, lo:hi]`` is ``q r`` when ``own=(lo, hi)`` (then that block is ``r``)."""
    import torch

    if own is None:
        return q.T @ y
    lo, hi = own
    return torch.cat([q.T @ y[:, :lo], r, q.T @ y[:, hi:]], 1)


def _offsets(widths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(widths)]).astype(int)


def _global_errors(X_train, X_test, folds: _Folds, Y_test, *, alphas, alpha_type, distortion=False,
                   own=None) -> list:
    """Pointwise GFRE (or GFRD) of every target in ``folds``: list of (n_test,) tensors.

    ``own``: as for :class:`_GlobalRidge`.
    """
    import torch

    fit = _GlobalRidge(X_train, folds, alphas, alpha_type, own)
    if distortion:
        Z = X_test @ fit.Vs
        off = _offsets(folds.widths)
        return [_distortion(fit.train_cross(slice(lo, hi)), X_test, Z @ fit.W[:, lo:hi])
                for lo, hi in zip(off[:-1], off[1:])]
    coef = fit.Vs @ fit.W   # (D, targets' columns), applied to the test rows as skmatter's coef_
    step = max(1, _BATCH_BYTES // (16 * Y_test.shape[1]))
    norms = []
    for lo in range(0, len(X_test), step):
        pred = X_test[lo:lo + step] @ coef
        residual = torch.sub(Y_test[lo:lo + step], pred, out=pred)   # in place: no copy of the targets first
        norms.append(torch.stack([torch.linalg.vector_norm(r, dim=1) for r in residual.split(folds.widths, 1)], 1))
    return list(torch.cat(norms).T)


def _distortion(XtP, X_test, P_test):
    """skmatter's GFRD step: OrthogonalRegression(use_orthogonal_projector=False) on the fit.

    ``XtP = X_train^T P_train`` (D_x, D_y), ``P`` the ridge reconstruction. Both sides are
    zero-padded to ``m = max(D_x, D_y)`` and the Procrustes rotation maps padded ``X`` onto
    padded ``P``. For ``D_x > D_y`` skmatter fails on a shape mismatch; here the test
    reconstruction is padded as well, which is the same padded problem.
    """
    import torch

    dx, dy = XtP.shape
    m = max(dx, dy)
    M = torch.zeros(m, m, dtype=XtP.dtype, device=XtP.device)
    M[:dx, :dy] = XtP
    u, _, vh = torch.linalg.svd(M)
    orth = X_test @ (u @ vh)[:dx]
    return torch.linalg.vector_norm(torch.nn.functional.pad(P_test, (0, m - dy)) - orth, dim=1)


class _LocalRidge:
    """Cutoff ``Ridge2FoldCV`` on a batch of small source matrices (LFRE), by batched SVDs.

    ``X`` (B, k, D): one centred neighbourhood per test row, rows of CV fold 1 (``n1``) first.
    """

    def __init__(self, X, n1: int, alphas, alpha_type):
        import torch

        n_batch, n, dim = X.shape
        self.X = X
        self.folds = [slice(0, n1), slice(n1, n)]
        self.svd_folds = [torch.linalg.svd(X[:, f], full_matrices=False) for f in self.folds]
        self.svd_all = torch.linalg.svd(X, full_matrices=False)
        self.rcond = max(n, dim) * np.finfo(np.float64).eps
        self.scaled, self.cut = _alpha_cuts(self.svd_folds[0].S, self.svd_folds[1].S, alphas, alpha_type, self.rcond)

    def fit_predict(self, Y, X_query, widths):
        """Fit ``Y`` (B, k, C) and predict ``X_query`` (B, q, D): (B, q, C)."""
        import torch

        losses = []
        for a, b in ((0, 1), (1, 0)):
            U, s, Vh = self.svd_folds[a]
            Y_b = Y[:, self.folds[b]]
            P = (self.X[:, self.folds[b]] @ Vh.mT) * _safe_inv(s, self.rcond)[:, None, :]
            losses.append(_cv_rmse(s, self.cut, U.mT @ Y[:, self.folds[a]], P.mT @ Y_b, P.mT @ P,
                                   torch.linalg.vector_norm(Y_b, dim=1) ** 2, Y_b.shape[1]))
        thr = _best_alphas(losses, self.scaled, widths)                 # (B, T)
        U, s, Vh = self.svd_all
        Z = (X_query @ Vh.mT) * _safe_inv(s, 0.0)[:, None, :]
        UtY = U.mT @ Y
        return torch.cat([(Z * (s > thr[:, t, None])[:, None, :]) @ part      # keep s > alpha_t
                          for t, part in enumerate(UtY.split(widths, -1))], -1)


def _neighbour_order(X_train, X_test, k: int):
    """Indices of the ``k`` nearest training rows of each test row, nearest first: (n_test, k).

    On CPU: skmatter's own squared-distance expression and ``np.argsort``, so ties fall the
    same way; on a GPU ``torch.topk``.
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


def _clamp_local_points(ks, n_train: int, stacklevel: int) -> list:
    """Neighbour counts ``ks`` capped at ``n_train``, with a :class:`LocalPointsWarning` if any was above."""
    if min(ks) < 2:
        raise ValueError("n_local_points must be at least 2")
    above = sorted({int(k) for k in ks if k > n_train})
    if above:
        asked = above[0] if len(above) == 1 else above
        warnings.warn(f"n_local_points={asked} exceeds the {n_train} training rows; using all {n_train} "
                      "of them (as scikit-matter does)", LocalPointsWarning, stacklevel=stacklevel + 1)
    return [min(int(k), n_train) for k in ks]


def _local_errors(X_train, X_test, Y_train, Y_test, widths, ks, *, alphas, alpha_type, random_state,
                  batch_size=None) -> list:
    """Pointwise LFRE of every target (target ``t`` with ``ks[t]`` neighbours): list of (n_test,).

    A ``ks[t]`` above the training rows uses all of them, with a :class:`LocalPointsWarning`
    (pointing at the caller of the function that called this one).
    """
    ks = _clamp_local_points(ks, len(X_train), stacklevel=3)
    with one_cpu_thread(X_train.device):
        return _local_errors_impl(X_train, X_test, Y_train, Y_test, widths, ks, alphas=alphas,
                                  alpha_type=alpha_type, random_state=random_state, batch_size=batch_size)


def _local_errors_impl(X_train, X_test, Y_train, Y_test, widths, ks, *, alphas, alpha_type, random_state,
                       batch_size=None) -> list:
    order = _neighbour_order(X_train, X_test, max(ks)).to(X_train.device)
    by_cols = {}

    def take(rows, cols):
        key = tuple(cols.tolist())
        if key not in by_cols:
            by_cols.clear()
            by_cols[key] = Y_train[:, cols]
        return X_train[rows], by_cols[key][rows]

    return local_fits(order, take, X_test, Y_test, widths, ks, alphas=alphas, alpha_type=alpha_type,
                      random_state=random_state, batch_size=batch_size)


def local_fits(order, take, X_test, Y_test, widths, ks, *, alphas, alpha_type, random_state,
               batch_size=None) -> list:
    """Pointwise LFRE of every target from neighbour lists: list of (n_test,) tensors.

    ``order`` (n_test, >= max(ks)): training rows of each test row, nearest first;
    ``take(rows, cols)``: the source's training rows ``rows`` (B, k) and the target columns
    ``cols`` of the same rows, as (B, k, D) and (B, k, len(cols)) tensors (scaled as the test
    rows). The in-memory engine indexes tensors; the streamed one reads the rows off disk.
    """
    import torch

    dev = X_test.device
    off = _offsets(widths)
    out = [None] * len(widths)
    for k in sorted(set(ks)):
        targets = [t for t in range(len(widths)) if ks[t] == k]
        cols = torch.as_tensor(np.concatenate([np.arange(off[t], off[t + 1]) for t in targets]), device=dev)
        w = [widths[t] for t in targets]
        Yg_test = Y_test[:, cols]
        f1, f2 = _kfold(k, random_state)                  # local CV folds: positions among the k
        by_fold = torch.as_tensor(np.concatenate([f1, f2]), device=dev)
        step = batch_size or max(1, _BATCH_BYTES // (8 * 8 * k * (X_test.shape[1] + len(cols))))
        errors = []
        for lo in range(0, len(X_test), step):
            Xl, Yl = take(order[lo:lo + step, :k][:, by_fold], cols)
            mx, my = Xl.mean(1, keepdim=True), Yl.mean(1, keepdim=True)
            pred = _LocalRidge(Xl.sub_(mx), len(f1), alphas, alpha_type).fit_predict(
                Yl.sub_(my), X_test[lo:lo + step, None, :] - mx, w)
            res = Yg_test[lo:lo + step] - (my + pred)[:, 0]
            errors.append(torch.stack([torch.linalg.vector_norm(r, dim=1) for r in res.split(w, 1)], 1))
        errors = torch.cat(errors)
        for j, t in enumerate(targets):
            out[t] = errors[:, j]
    return out


def _rms(pointwise) -> float:
    v = np.asarray(pointwise, dtype=np.float64)
    return float(np.linalg.norm(v) / np.sqrt(len(v)))
