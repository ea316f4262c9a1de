"""Structure descriptors from per-atom features: per-structure cumulants of each feature.

A structure is summarised, feature by feature, by the population cumulants
kappa_1 .. kappa_k of its atoms' values (kappa_1 the mean, kappa_2 the variance, kappa_3 the
third central moment, kappa_4 = mu_4 - 3 mu_2^2, ...). Population (ddof 0) cumulants are
intensive: a supercell, which repeats every atom the same number of times, has the same
descriptor as its primitive cell. They are invariant to the order of the atoms.

All structures are reduced at once, as one sparse (n_structures, n_atoms) averaging matrix
times the per-atom rows (a segment mean that needs no sorting); the only Python loop runs
over moment orders.
"""

from __future__ import annotations

from math import comb

import numpy as np

from .features import Block, FeatureSet

#: Highest cumulant order :func:`cumulant_features` computes.
MAX_ORDER = 8

_TRANSFORMS = ("signed_root", "none", None)


def cumulants_from_central_moments(mu: dict) -> dict:
    """Cumulants kappa_2 .. kappa_k from central moments mu_2 .. mu_k.

    Parameters
    ----------
    mu : dict of int -> ndarray
        ``mu[n]`` is the n-th central moment (any common shape), for ``n = 2 .. k``.

    Returns
    -------
    dict of int -> ndarray
        ``kappa[n]`` for ``n = 2 .. k``, same shape as the moments.

    Notes
    -----
    The moment-cumulant recursion ``kappa_n = mu_n - sum_{m=1}^{n-1} C(n-1, m-1) kappa_m
    mu_{n-m}`` applied to the centred variable, whose mu_1 and kappa_1 vanish, so only
    ``2 <= m <= n-2`` contributes (Kendall & Stuart, *The Advanced Theory of Statistics*,
    vol. 1, §3.14). For example kappa_4 = mu_4 - 3 mu_2^2 and
    kappa_5 = mu_5 - 10 mu_2 mu_3.
    """
    kappa = {}
    for n in sorted(mu):
        k = mu[n].copy()
        for m in range(2, n - 1):
            k -= comb(n - 1, m - 1) * kappa[m] * mu[n - m]
        kappa[n] = k
    return kappa


def signed_root(kappa: np.ndarray, n: int) -> np.ndarray:
    """``sign(kappa) |kappa|^(1/n)``: the n-th cumulant in the units of the feature.

    The inverse is ``sign(y) |y|^n``. For n = 2 this is the standard deviation.
    """
    kappa = np.asarray(kappa, dtype=np.float64)
    return np.sign(kappa) * np.abs(kappa) ** (1.0 / n)


def cumulant_blocks(dim: int, order: int) -> list[Block]:
    """Column ranges of the output of :func:`cumulant_features`.

    Parameters
    ----------
    dim : int
        Number of per-atom features D.
    order : int
        Highest cumulant order k.

    Returns
    -------
    list of Block, length k
        ``Block("kappa_n", (n-1)*D, n*D)`` for ``n = 1 .. k``.
    """
    order = _check_order(order)
    if int(dim) != dim or dim < 0:
        raise ValueError(f"dim must be a non-negative integer, got {dim!r}")
    dim = int(dim)
    return [Block(f"kappa_{n}", (n - 1) * dim, n * dim, source=f"cumulant of order {n}")
            for n in range(1, order + 1)]


def cumulant_features(values: np.ndarray, structure_index: np.ndarray, order: int = 4,
                      transform: str | None = "signed_root",
                      n_structures: int | None = None) -> np.ndarray:
    """Per-structure population cumulants of every per-atom feature.

    Parameters
    ----------
    values : ndarray of shape (n_atoms, D)
        Per-atom features (any float dtype; computed in float64).
    structure_index : ndarray of shape (n_atoms,), integer
        Structure of each atom, in ``0 .. n_structures - 1``. Atoms need not be grouped
        by structure, but every structure must have at least one atom.
    order : int, default 4
        Highest cumulant order k, ``1 <= k <= 8``.
    transform : {"signed_root", "none", None}, default "signed_root"
        ``"signed_root"`` maps kappa_n to ``sign(kappa_n) |kappa_n|^(1/n)`` (so every block
        has the units of the features; kappa_2 becomes the standard deviation). ``"none"``
        or ``None`` keeps the raw cumulants.
    n_structures : int, optional
        Number of structures; default ``structure_index.max() + 1``.

    Returns
    -------
    ndarray of shape (n_structures, k * D), float64
        Columns ``[(n-1)*D, n*D)`` hold kappa_n (see :func:`cumulant_blocks`). The output
        for order k starts with the output for order k - 1.

    Raises
    ------
    ValueError
        If ``order`` or ``transform`` is not supported, the shapes do not match, or a
        structure index is negative, not an integer, ``>= n_structures``, or a structure in
        ``0 .. n_structures - 1`` has no atoms.

    Notes
    -----
    Cumulants are population (ddof = 0) cumulants of the atoms of each structure, computed
    from central moments with :func:`cumulants_from_central_moments`. The values are first
    shifted by the first atom of their structure and then centred (the shifted two-pass
    algorithm, Chan, Golub & LeVeque, *Am. Stat.* 37, 242 (1983)), so

    - a structure with a single atom has kappa_1 equal to its features and every higher
      cumulant exactly 0;
    - a structure whose atoms share one feature vector has kappa_1 equal to that vector and
      every higher cumulant exactly 0.

    Memory is O(n_atoms * D): two float64 copies of ``values`` plus one gathered row block.
    """
    order = _check_order(order)
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be 'signed_root', 'none' or None, got {transform!r}")
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (n_atoms, D), got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"values must be numeric, got dtype {values.dtype}")
    index, counts = check_index(structure_index, len(values), n_structures)
    n_struct, dim = len(counts), values.shape[1]
    out = np.empty((n_struct, order * dim), dtype=np.float64)
    if n_struct == 0 or dim == 0:
        return out

    x = np.array(values, dtype=np.float64)  # working copy, modified in place
    segment_mean = _segment_mean_operator(index, counts)

    first = np.argsort(index, kind="stable")[np.concatenate(([0], np.cumsum(counts)[:-1]))]
    shift = x[first]
    x -= shift[index]
    mean_shifted = segment_mean @ x
    x -= mean_shifted[index]  # x now holds centred values
    out[:, :dim] = shift + mean_shifted

    mu, power = {}, None
    for n in range(2, order + 1):
        power = x * x if power is None else np.multiply(power, x, out=power)
        mu[n] = segment_mean @ power
    del x, power
    for n, kappa in cumulants_from_central_moments(mu).items():
        out[:, (n - 1) * dim:n * dim] = kappa
    if transform == "signed_root":
        for n in range(3, order + 1):
            block = out[:, (n - 1) * dim:n * dim]
            block[:] = signed_root(block, n)
        if order >= 2:
            np.sqrt(out[:, dim:2 * dim], out=out[:, dim:2 * dim])  # variance >= 0
    return out


def pool_featureset(fs: FeatureSet, order: int = 4,
                    transform: str | None = "signed_root") -> tuple[np.ndarray, list]:
    """Cumulant descriptors of every structure of a :class:`FeatureSet`.

    Returns
    -------
    matrix : ndarray of shape (n_structures, order * D), float64
        :func:`cumulant_features` of ``fs.values`` grouped by ``fs.structure_index``.
    structure_ids : list of str, length n_structures
        Row labels (``fs.structure_ids``).
    """
    n = fs.n_structures or None
    matrix = cumulant_features(fs.values, fs.structure_index, order=order, transform=transform,
                               n_structures=n)
    ids = list(fs.structure_ids) if fs.structure_ids else [str(i) for i in range(len(matrix))]
    return matrix, ids


def _segment_mean_operator(index: np.ndarray, counts: np.ndarray):
    """Sparse (n_structures, n_atoms) matrix whose product with per-atom rows gives structure means."""
    from scipy import sparse

    n_atoms = len(index)
    weights = 1.0 / counts[index]
    return sparse.csr_array((weights, (index, np.arange(n_atoms))), shape=(len(counts), n_atoms))


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) \
            or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an integer in 1..{MAX_ORDER}, got {order!r}")
    return int(order)


def check_index(structure_index, n_atoms: int, n_structures) -> tuple[np.ndarray, np.ndarray]:
    """Validated int64 index and per-structure atom counts (all >= 1)."""
    index = np.asarray(structure_index)
    if index.ndim != 1 or len(index) != n_atoms:
        raise ValueError(f"structure_index must have shape ({n_atoms},) to match values, "
                         f"got {index.shape}")
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"structure_index must hold integers, got dtype {index.dtype}")
    index = index.astype(np.int64, copy=False)
    if index.size and index.min() < 0:
        raise ValueError(f"structure_index must be non-negative, found {index.min()}")
    top = int(index.max()) + 1 if index.size else 0
    if n_structures is None:
        n_structures = top
    elif int(n_structures) != n_structures or n_structures < top:
        raise ValueError(f"n_structures={n_structures!r} but structure_index reaches {top - 1}")
    counts = np.bincount(index, minlength=int(n_structures))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"structure indices must be contiguous (every structure 0.."
                         f"{n_structures - 1} needs an atom); {empty.size} have none, "
                         f"first {empty[:5].tolist()}")
    return index, counts
