"""Every model against every model: the tidy reconstruction matrix."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._engine import (
    _device,
    _tensor,
    _check_alphas,
    _scale_split,
    _Folds,
    fold_order,
    _offsets,
    _global_errors,
    _local_errors,
    _rms,
    non_finite_message,
    RANDOM_STATE,
    METRICS,
)
from .pair import rbf_features, linear_cka


# ---------------------------------------------------------------------------------------------
# all pairs of models
# ---------------------------------------------------------------------------------------------

def _check_features(features) -> tuple[list, list, list]:
    from ..features import FeatureSet

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
        raise ValueError(f"features are not aligned, n_atoms differ: {sizes}; extract every model on the "
                         "same structures")
    ref = next(((k, f) for k, f in zip(names, fsets) if f is not None), None)
    for key, f in zip(names, fsets):
        if f is None:
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
            fs = next((f for f in fsets if f is not None and f.subsets is not None), None)
            if fs is None:
                raise ValueError("stratify='subset' needs subsets=: labels per atom (n_atoms,) or per structure")
            subsets = fs.atom_subsets()
        stratify = subsets
    labels = np.asarray(stratify)
    fs = next((f for f in fsets if f is not None), None)
    if len(labels) != n and fs is not None and len(labels) == fs.n_structures:
        labels = labels[fs.structure_index]
    if len(labels) != n:
        raise ValueError(f"stratify labels have length {len(labels)}, expected n_atoms={n}")
    return labels


def split_indices(n: int, test_size=1000, stratify=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of ``n`` atoms, the one :func:`reconstruction_matrix` uses.

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

    n_test = int(round(test_size * n)) if isinstance(test_size, float) and test_size < 1 else int(test_size)
    if not 1 <= n_test <= n - 2:
        raise ValueError(f"test_size={test_size} leaves no room for a split of {n} atoms (need >= 2 training atoms)")
    return train_test_split(np.arange(n), test_size=n_test, random_state=seed, shuffle=True, stratify=stratify)


#: metrics fitted by one global ridge per source, on training rows kept in CV-fold order
_GLOBAL = ("gfre", "gfrd", "nonlinear_gfre")


def _scaled_blocks(arrays, train_idx, test_idx, row_order=None, names=None) -> tuple[np.ndarray, np.ndarray]:
    """Every model's scaled train and test rows side by side (float64), train rows in ``row_order``.

    One model is upcast at a time, so besides the float32 inputs the peak is this pair of
    buffers plus one model's float64 copy. Without ``row_order`` the values are bit-identical
    to skmatter's scaler (:func:`_scale_split`: LFRE's neighbour ties depend on it); with it,
    each model is gathered straight into its block in that order and scaled there, which
    changes them only by rounding (the mean sums the rows in another order). ``names``: the
    models' keys, which errors name (default: their positions).
    """
    off = _offsets([a.shape[1] for a in arrays])
    labels = [f"features[{k!r}]" for k in (names or range(len(arrays)))]
    train, test = np.empty((len(train_idx), off[-1])), np.empty((len(test_idx), off[-1]))
    rows = train_idx if row_order is None else np.asarray(train_idx)[row_order]
    for i, a in enumerate(arrays):
        if row_order is None:
            train[:, off[i]:off[i + 1]], test[:, off[i]:off[i + 1]] = _scale_split(a, train_idx, test_idx,
                                                                                   labels[i])
        else:
            _scale_into(a, rows, test_idx, train[:, off[i]:off[i + 1]], test[:, off[i]:off[i + 1]], labels[i])
    return train, test


def _scale_into(A, train_rows, test_rows, train, test, name: str) -> None:
    """``A``'s rows ``train_rows`` and ``test_rows`` into ``train`` and ``test``, scaled as :func:`_scale_split`.

    The same centring and scaling by the training rows, in fewer passes over the data.
    """
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(A.shape)}")
    rows = np.asarray(A[train_rows], dtype=np.float64)   # integer indexing copies: safe to scale in place
    with np.errstate(invalid="ignore", over="ignore"):   # a NaN or inf among the training rows reaches var
        mean = rows.mean(axis=0)
        rows -= mean
        var = np.vdot(rows, rows) / len(rows)
    held = np.asarray(A[test_rows], dtype=np.float64)
    if not (np.isfinite(var) and np.isfinite(held).all()):
        raise ValueError(non_finite_message(A, np.concatenate([train_rows, test_rows]), name))
    if var < 1e-12:
        raise ValueError(f"{name} has zero variance on the training rows; it cannot be scaled")
    scale = np.sqrt(var)
    np.divide(rows, scale, out=train)
    held -= mean
    np.divide(held, scale, out=test)


def _matrix_values(arrays, metrics, train_idx, test_idx, opts, dev, names=None) -> dict:
    """``{(metric, source, target): value}`` on one split; models by position (``names``: their keys, for errors).

    The global fits see the training rows in CV-fold order (so the folds are views of one
    buffer); LFRE and CKA see them in the split's order, which keeps LFRE's neighbour ties as
    skmatter has them. The two buffers never live at the same time.
    """
    widths = [a.shape[1] for a in arrays]
    off = _offsets(widths)
    blocks = list(zip(off[:-1], off[1:]))
    ridge = {k: opts[k] for k in ("alphas", "alpha_type")}
    out = {}
    glob = [m for m in metrics if m in _GLOBAL]
    if glob:
        order, _ = fold_order(len(train_idx), opts["random_state"])
        train_np, test_np = _scaled_blocks(arrays, train_idx, test_idx, order, names)
        train, test = _tensor(train_np, dev), _tensor(test_np, dev)
        folds = _Folds(train, widths, opts["random_state"], presorted=True)
        inverse = np.argsort(order)
        for metric in glob:
            for s, (lo, hi) in enumerate(blocks):
                if metric == "nonlinear_gfre":  # landmarks drawn from the rows in the split's order
                    F = rbf_features(train_np[inverse, lo:hi], test_np[:, lo:hi], None, opts["n_components"],
                                      opts["seed"])
                    Xtr, Xte = _tensor(F[0][order], dev), _tensor(F[1], dev)
                    own = None
                else:
                    Xtr, Xte, own = train[:, lo:hi], test[:, lo:hi], (lo, hi)
                errs = _global_errors(Xtr, Xte, folds, test, distortion=metric == "gfrd", own=own, **ridge)
                for t, e in enumerate(errs):
                    out[metric, s, t] = _rms(e.cpu().numpy())
        del train_np, test_np, train, test, folds
    local = [m for m in metrics if m not in _GLOBAL]
    if local:
        train_np, test_np = _scaled_blocks(arrays, train_idx, test_idx, names=names)
        train, test = _tensor(train_np, dev), _tensor(test_np, dev)
        for metric in local:
            for s, (lo, hi) in enumerate(blocks):
                if metric == "cka":  # on the test atoms
                    for t, (lo2, hi2) in enumerate(blocks):
                        out[metric, s, t] = linear_cka(test_np[:, lo:hi], test_np[:, lo2:hi2])
                    continue
                ks = [local_points(opts["n_local_points"], widths[s], w) for w in widths]
                errs = _local_errors(train[:, lo:hi], test[:, lo:hi], train, test, widths, ks,
                                     batch_size=opts["batch_size"], random_state=opts["random_state"], **ridge)
                for t, e in enumerate(errs):
                    out[metric, s, t] = _rms(e.cpu().numpy())
    return {key: out[key] for key in sorted(out, key=lambda k: (metrics.index(k[0]), k[1], k[2]))}


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of resampled values: their empirical quantiles.

    Quantiles are taken as values of the sample (numpy's ``inverted_cdf``), so with a few
    resamples the interval is their range and always holds every one of them (the split of
    ``seed`` included); with many it is the usual percentile interval.
    """
    values = np.asarray(values, dtype=float)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail], method="inverted_cdf")
    return float(lo), float(hi)


def local_points(rule, d_source: int, d_target: int) -> int:
    """LFRE neighbours of one pair under ``rule`` (see :func:`reconstruction_matrix`).

    ``None``: ``min(D_source, D_target)`` (the paper's protocol: with 2-fold CV each local fit
    then has fewer rows than the source's columns, so it is determined only by its ridge
    penalty); ``"determined"``: ``2 (D_source + 1)``, the fewest neighbours whose folds have
    more rows than columns; an integer: that number.
    """
    if rule is None:
        return min(d_source, d_target)
    if rule == "determined":
        return 2 * (d_source + 1)
    return int(rule)


def reconstruction_matrix(features, metric="gfre", test_size=1000, stratify=None, seed=0, n_boot=0,
                          device="auto", subsets=None, *, n_local_points=None, alphas=None,
                          alpha_type="relative", random_state=RANDOM_STATE, n_components=1000,
                          batch_size=None):
    """Every model reconstructing every model (diagonal included), as a tidy table.

    Parameters
    ----------
    features : mapping model key -> FeatureSet or array of shape (n_atoms, D_model)
        Per-atom features of the same atoms in the same order: ``n_atoms`` (and, between
        FeatureSets, ``species`` and ``structure_ids``) must agree.
    metric : str or list of str
        Any of ``"gfre"``, ``"gfrd"``, ``"lfre"``, ``"cka"`` (linear CKA on the test atoms)
        and ``"nonlinear_gfre"``.
    test_size : int or float
        Test atoms as a count, or as a fraction when a float below 1; the rest train.
    stratify : None, "subset" or array of shape (n_atoms,)
        Labels that stratify the split (``"subset"``: the ``subsets`` labels).
    seed : int
        Seed of the train/test split.
    n_boot : int
        If > 0, the matrix is recomputed on ``n_boot`` re-drawn splits (seeds ``seed + 1``,
        ``seed + 2``, ...) and ``ci_low``, ``ci_high`` are the 2.5 and 97.5 percentiles over
        these and the split of ``seed`` (:func:`percentile_interval`).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    subsets : array of shape (n_atoms,) or (n_structures,), optional
        Labels per atom (or, with FeatureSets, per structure) for ``stratify="subset"``.
    n_local_points : int, "determined" or None
        LFRE neighbours; default (``None``) ``min(D_source, D_target)`` for each pair, the paper's
        protocol; ``"determined"``: ``2 (D_source + 1)``, so that each fold of the local 2-fold
        ridge fit has more rows than columns (see :func:`local_points`). Above the training
        atoms, all of them are used with a :class:`~umlip_latents.metrics.LocalPointsWarning`;
        above ``n_atoms``, a ``ValueError`` (as :func:`~umlip_latents.metrics.pointwise_lfre`).
    alphas, alpha_type, random_state
        Ridge2FoldCV settings, as in :func:`pointwise_gfre`.
    n_components : int
        Nystroem landmarks of ``"nonlinear_gfre"``.
    batch_size : int, optional
        LFRE test atoms fitted together.

    Returns
    -------
    pandas.DataFrame
        Columns ``source, target, metric, value, ci_low, ci_high``: ``source`` reconstructs
        ``target``. ``attrs`` holds the split sizes and settings and, with ``n_boot > 0``,
        ``replicates``: one record ``boot, source, target, metric, value`` per split (``boot`` 0
        is the split of ``seed``) and cell, from which a statistic over several cells gets its interval
        (:func:`umlip_latents.findings.statistic`).
    """
    import pandas as pd

    names, arrays, fsets = _check_features(features)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    if isinstance(n_local_points, str) and n_local_points != "determined":
        raise ValueError(f"n_local_points must be an integer, 'determined' or None, got {n_local_points!r}")
    if isinstance(n_local_points, int) and n_local_points < 2:
        raise ValueError("n_local_points must be at least 2")
    opts = dict(alphas=_check_alphas(alphas, alpha_type), alpha_type=alpha_type, random_state=random_state,
                n_local_points=n_local_points, n_components=n_components, seed=seed, batch_size=batch_size)
    n = len(arrays[0])
    if isinstance(n_local_points, int) and n_local_points > n:
        raise ValueError(f"features have {n} atoms but n_local_points={n_local_points}; "
                         "must have at least n_local_points atoms")
    labels = _labels(stratify, subsets, fsets, n)
    dev = _device(device)
    train_idx, test_idx = split_indices(n, test_size, labels, seed)
    values = _matrix_values(arrays, metrics, train_idx, test_idx, opts, dev, names)
    boots = [_matrix_values(arrays, metrics, *split_indices(n, test_size, labels, seed + 1 + b), opts, dev, names)
             for b in range(n_boot)]
    rows = []
    for (m, s, t), v in values.items():
        lo, hi = percentile_interval([v] + [b[m, s, t] for b in boots]) if boots else (np.nan, np.nan)
        rows.append({"source": names[s], "target": names[t], "metric": m, "value": v, "ci_low": lo, "ci_high": hi})
    df = pd.DataFrame(rows, columns=["source", "target", "metric", "value", "ci_low", "ci_high"])
    df.attrs.update(n_train=len(train_idx), n_test=len(test_idx), seed=seed, n_boot=n_boot, device=str(dev),
                    test_size=test_size, n_local_points=n_local_points, alpha_type=alpha_type,
                    alphas=opts["alphas"].tolist())
    if boots:   # records (not a DataFrame: pandas compares attrs when it concatenates tables)
        df.attrs["replicates"] = [{"boot": b, "source": names[s], "target": names[t], "metric": m,
                                   "value": float(v)} for b, vals in enumerate([values, *boots])
                                  for (m, s, t), v in vals.items()]
    return df
