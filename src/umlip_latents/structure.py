"""Structure-level analysis of cumulant-pooled features: information per order, energy, maps.

A structure is described by the per-structure cumulants of its atoms' features
(:func:`umlip_latents.pooling.cumulant_features`); the descriptor of order k holds kappa_1 ..
kappa_k, so the order-k descriptor starts with the order-(k-1) one. This module asks what
each order adds:

- :func:`order_information`: GFRE (Goscinski et al., *Mach. Learn.: Sci. Technol.* 2, 025028
  (2021)) of order k reconstructing order k+1, and of the mean (order 1) reconstructing order k,
  on a seeded structure-level split;
- :func:`downstream_ridge_error`: cross-validated ridge error of the DFT energy per atom left
  over by a linear composition baseline (:func:`residual_energy`);
- :func:`pcovr_map`: a principal covariates regression map (de Jong and Kiers, *Chemom. Intell.
  Lab. Syst.* 14, 155 (1992); Helfrecht *et al.*, *Mach. Learn.: Sci. Technol.* 1, 045021
  (2020); ``skmatter.decomposition.PCovR``) of the descriptors, and
  :func:`write_chemiscope`, an interactive map of it for the book.

Functions take arrays and return arrays or tidy tables; seeds are arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .metrics import gfre, percentile_interval, split_indices
from .pooling import MAX_ORDER, check_index, cumulant_features

#: Ridge penalties :func:`downstream_ridge_error` chooses from in each fold (standardised X).
DOWNSTREAM_ALPHAS = np.logspace(-3, 5, 17)


# ---------------------------------------------------------------------------------------------
# composition and the energy left over by it
# ---------------------------------------------------------------------------------------------

def composition_fractions(species, structure_index, n_structures: int | None = None,
                          elements=None) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of each element in each structure.

    Parameters
    ----------
    species : int array of shape (n_atoms,)
        Atomic numbers.
    structure_index : int array of shape (n_atoms,)
        Structure of each atom, ``0 .. n_structures - 1``; every structure needs an atom.
    n_structures : int, optional
        Default ``structure_index.max() + 1``.
    elements : int array of shape (n_elements,), optional
        Columns of the output; default the sorted elements present. Every element of
        ``species`` must be among them.

    Returns
    -------
    fractions : ndarray of shape (n_structures, n_elements), float64
        Rows sum to 1.
    elements : ndarray of shape (n_elements,), int64
    """
    species = np.asarray(species)
    if species.ndim != 1 or (species.size and not np.issubdtype(species.dtype, np.integer)):
        raise ValueError(f"species must be a 1-D integer array, got shape {species.shape} "
                         f"dtype {species.dtype}")
    index, counts = check_index(structure_index, len(species), n_structures)
    elements = np.unique(species) if elements is None else np.asarray(elements, dtype=np.int64)
    column = np.searchsorted(elements, species)
    missing = (column >= len(elements)) | (elements[np.minimum(column, len(elements) - 1)] != species)
    if len(elements) == 0 or missing.any():
        raise ValueError(f"species {sorted(set(species[missing].tolist()))} not in elements")
    flat = np.bincount(index * len(elements) + column, minlength=len(counts) * len(elements))
    return flat.reshape(len(counts), len(elements)) / counts[:, None], elements.astype(np.int64)


def composition_baseline(fractions, energy_per_atom, train_idx, alpha: float = 1e-8) -> tuple[np.ndarray, float]:
    """Ridge fit of the energy per atom as a linear function of the composition.

    ``e = b + sum_el x_el mu_el``: ``mu_el`` plays the part of a per-element reference energy.
    Fitted on the rows ``train_idx`` only; an element absent from them gets ``mu = 0``.

    Parameters
    ----------
    fractions : ndarray of shape (n_structures, n_elements)
        From :func:`composition_fractions`.
    energy_per_atom : ndarray of shape (n_structures,)
        eV/atom.
    train_idx : int array
        Rows the baseline is fitted on.
    alpha : float
        Ridge penalty (on fractions, which are O(1)).

    Returns
    -------
    coef : ndarray of shape (n_elements,)
    intercept : float
    """
    from sklearn.linear_model import Ridge

    X, y = _check_xy(fractions, energy_per_atom, "fractions", "energy_per_atom")
    model = Ridge(alpha=alpha).fit(X[train_idx], y[train_idx])
    return model.coef_, float(model.intercept_)


def residual_energy(fractions, energy_per_atom, test_size=0.25, seed: int = 0,
                    alpha: float = 1e-8) -> np.ndarray:
    """DFT energy per atom minus the composition baseline fitted on a seeded training split.

    The split is :func:`umlip_latents.metrics.split_indices` ``(n_structures, test_size,
    seed=seed)``, the one :func:`order_information` uses.

    Returns
    -------
    ndarray of shape (n_structures,)
        Residual energy per atom (eV/atom) of every structure, train and test.
    """
    X, y = _check_xy(fractions, energy_per_atom, "fractions", "energy_per_atom")
    train, _ = split_indices(len(y), test_size, seed=seed)
    coef, intercept = composition_baseline(X, y, train, alpha=alpha)
    return y - (X @ coef + intercept)


# ---------------------------------------------------------------------------------------------
# information added per cumulant order
# ---------------------------------------------------------------------------------------------

def atom_components(values, n_components: int | None = None, seed: int = 0) -> np.ndarray:
    """The first principal components of per-atom features (all of them when ``None``).

    Pooling fewer columns keeps the structure-level descriptors narrower than the number of
    training structures on small (smoke) sets. The PCA is unsupervised and fitted on all atoms.

    Parameters
    ----------
    values : ndarray of shape (n_atoms, D)
    n_components : int, optional
        At most ``min(n_atoms, D)``; ``None`` returns ``values`` as float64.
    seed : int
        Seed of a randomized SVD, if scikit-learn chooses it.

    Returns
    -------
    ndarray of shape (n_atoms, n_components or D), float64
    """
    from sklearn.decomposition import PCA

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (n_atoms, D), got shape {values.shape}")
    if n_components is None:
        return values
    if int(n_components) != n_components or not 1 <= n_components <= min(values.shape):
        raise ValueError(f"n_components must be an integer in 1..{min(values.shape)}, got {n_components!r}")
    return PCA(int(n_components), random_state=seed).fit_transform(values)


def order_information(values, structure_index, max_order: int = MAX_ORDER, test_size=0.25, seed: int = 0,
                      device: str = "auto", transform: str | None = "signed_root", n_boot: int = 0):
    """GFRE between cumulant descriptors of successive orders, on one structure-level split.

    Parameters
    ----------
    values : ndarray of shape (n_atoms, D)
        Per-atom features.
    structure_index : int array of shape (n_atoms,)
        Structure of each atom (contiguous ``0 .. n_structures - 1``).
    max_order : int
        Highest cumulant order, ``2 .. 8``.
    test_size : int or float
        Test structures as a count, or a fraction when a float below 1.
    seed : int
        Seed of the train/test split (:func:`umlip_latents.metrics.split_indices`).
    device : str
        Where :func:`umlip_latents.metrics.gfre` computes.
    transform : {"signed_root", "none", None}
        Passed to :func:`umlip_latents.pooling.cumulant_features`.
    n_boot : int
        If > 0, every GFRE is recomputed on ``n_boot`` re-drawn splits (seeds ``seed + 1``, ...):
        ``ci_low`` and ``ci_high`` are the 2.5 and 97.5 percentiles over these and the split of
        ``seed`` (:func:`umlip_latents.metrics.percentile_interval`), and ``attrs["replicates"]`` holds all of them (records ``boot, measure, k, gfre``;
        ``boot`` 0 is the split of ``seed``).

    Returns
    -------
    pandas.DataFrame
        One row per measure and order ``k`` with columns ``measure, k, source_order,
        target_order, gfre``:

        - ``"k->k+1"`` (k = 1 .. max_order - 1): what order k+1 adds to order k;
        - ``"k+1->k"`` (k = 1 .. max_order - 1): a sanity check, ~0 because order k+1 holds
          order k;
        - ``"1->k"`` (k = 1 .. max_order): what orders 2..k add to the mean (0 at k = 1).

        ``attrs`` holds ``n_train``, ``n_test``, ``dim``, ``seed`` and ``n_boot``.
    """
    import pandas as pd

    if isinstance(max_order, bool) or not isinstance(max_order, (int, np.integer)) \
            or not 2 <= max_order <= MAX_ORDER:
        raise ValueError(f"max_order must be an integer in 2..{MAX_ORDER}, got {max_order!r}")
    features = cumulant_features(values, structure_index, order=int(max_order), transform=transform)
    dim = np.asarray(values).shape[1]
    pairs = [p for k in range(1, max_order) for p in (("k->k+1", k, k, k + 1), ("k+1->k", k, k + 1, k))]
    pairs += [("1->k", k, 1, k) for k in range(1, max_order + 1)]

    def on_split(split_seed):
        train, test = split_indices(len(features), test_size, seed=split_seed)
        values = [gfre(features[:, :src * dim], features[:, :tgt * dim], train, test, device=device)
                  for _, _, src, tgt in pairs]
        return values, len(train), len(test)

    values, n_train, n_test = on_split(seed)
    out = pd.DataFrame([{"measure": m, "k": k, "source_order": src, "target_order": tgt, "gfre": v}
                        for (m, k, src, tgt), v in zip(pairs, values)])
    replicates = None
    if n_boot:
        boots = [values] + [on_split(seed + 1 + b)[0] for b in range(n_boot)]
        bounds = [percentile_interval(col) for col in np.array(boots).T]
        out["ci_low"], out["ci_high"] = [b[0] for b in bounds], [b[1] for b in bounds]
        replicates = [{"boot": b, "measure": m, "k": k, "gfre": float(v)}
                      for b, row in enumerate(boots) for (m, k, _, _), v in zip(pairs, row)]
    out.attrs.update(n_train=n_train, n_test=n_test, dim=dim, seed=seed, n_boot=n_boot)
    if replicates is not None:
        out.attrs["replicates"] = replicates
    return out


def combine_orders(per_model: Mapping):
    """:func:`order_information` tables of several models in one, with a ``model`` column.

    The replicates of every model are kept (``attrs["replicates"]`` gains ``model``); the split
    sizes are those of the first model (all use the same structures and seed).
    """
    import pandas as pd

    parts = list(per_model.items())
    out = pd.concat([part.assign(model=key) for key, part in parts], ignore_index=True)
    first = parts[0][1].attrs
    out.attrs = {k: v for k, v in first.items() if k != "replicates"}
    if all("replicates" in part.attrs for _, part in parts):
        out.attrs["replicates"] = [{**r, "model": key} for key, part in parts for r in part.attrs["replicates"]]
    return out


# ---------------------------------------------------------------------------------------------
# downstream regression and maps
# ---------------------------------------------------------------------------------------------

def downstream_ridge_error(X, y, seed: int = 0, cv: int = 5, alphas=None) -> float:
    """Cross-validated RMSE of a ridge regression of ``y`` on ``X``.

    In each of ``cv`` shuffled folds (seeded), the training rows standardise ``X`` column by
    column and choose the ridge penalty among ``alphas`` by leave-one-out (``RidgeCV``); the
    error is the RMSE over all out-of-fold predictions.

    Parameters
    ----------
    X : ndarray of shape (n_structures, n_features)
    y : ndarray of shape (n_structures,)
    seed : int
        Seed of the fold split.
    cv : int
        Number of folds, at least 2.
    alphas : array, default :data:`DOWNSTREAM_ALPHAS`

    Returns
    -------
    float
        RMSE in the units of ``y``.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _check_xy(X, y, "X", "y")
    if int(cv) != cv or not 2 <= cv <= len(y):
        raise ValueError(f"cv must be an integer in 2..{len(y)} (the number of rows), got {cv!r}")
    alphas = DOWNSTREAM_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    pred = cross_val_predict(model, X, y, cv=KFold(int(cv), shuffle=True, random_state=seed))
    return float(np.sqrt(np.mean((pred - y) ** 2)))


def pcovr_map(X, y, mixing: float = 0.5, n_components: int = 2, random_state: int = 0) -> np.ndarray:
    """PCovR projection of standardised features, supervised by a standardised property.

    Parameters
    ----------
    X : ndarray of shape (n_structures, n_features)
    y : ndarray of shape (n_structures,) or (n_structures, n_properties)
    mixing : float
        ``skmatter.decomposition.PCovR`` mixing: 1 is PCA, 0 is a projection of the
        linear regression.
    n_components : int
    random_state : int
        Seed of randomized SVD, if skmatter chooses it.

    Returns
    -------
    ndarray of shape (n_structures, n_components)
    """
    from skmatter.decomposition import PCovR
    from sklearn.preprocessing import StandardScaler

    X, y = _check_xy(X, y, "X", "y", multi_output=True)
    if not 0 <= mixing <= 1:
        raise ValueError(f"mixing must lie in [0, 1], got {mixing!r}")
    if int(n_components) != n_components or not 1 <= n_components <= min(X.shape):
        raise ValueError(f"n_components must be an integer in 1..{min(X.shape)}, got {n_components!r}")
    Xs = StandardScaler().fit_transform(X)
    ys = StandardScaler().fit_transform(y.reshape(len(y), -1))
    model = PCovR(mixing=mixing, n_components=int(n_components), random_state=random_state)
    return model.fit(Xs, ys).transform(Xs)


def write_chemiscope(path, structures, properties: Mapping, map_xy, meta: Mapping,
                     map_names=("PCovR 1", "PCovR 2"), color: str | None = None) -> Path:
    """Write an interactive chemiscope map (``.json`` or ``.json.gz``) with ``chemiscope.write_input``.

    Parameters
    ----------
    path : str or path
        Output file, ending in ``.json.gz`` (compressed) or ``.json``; its folder is created.
    structures : list of ase.Atoms, length n_structures
    properties : mapping name -> array of shape (n_structures,)
        Per-structure properties (numbers or strings); a value may also be a chemiscope
        property dict (``{"values": ..., "units": ..., "description": ...}``).
    map_xy : ndarray of shape (n_structures, 2)
        Map coordinates, stored as the properties ``map_names``.
    meta : mapping
        chemiscope metadata; needs ``"name"``, may hold ``"description"``, ``"authors"``,
        ``"references"``.
    color : str, optional
        Property colouring the map.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import chemiscope

    path = Path(os.fspath(path))
    if not (path.name.endswith(".json.gz") or path.name.endswith(".json")):
        raise ValueError(f"chemiscope files end in .json.gz or .json, got {path.name!r}")
    structures = list(structures)
    n = len(structures)
    if n == 0:
        raise ValueError("structures is empty")
    xy = np.asarray(map_xy, dtype=np.float64)
    if xy.shape != (n, 2) or not np.isfinite(xy).all():
        raise ValueError(f"map_xy must be a finite ({n}, 2) array for {n} structures, got shape {xy.shape}")
    if not isinstance(meta, Mapping) or not str(meta.get("name", "")):
        raise ValueError("meta must be a mapping with a non-empty 'name'")
    props = {name: {"target": "structure", "values": xy[:, i]} for i, name in enumerate(map_names)}
    for name, prop in properties.items():
        prop = dict(prop) if isinstance(prop, Mapping) else {"values": prop}
        values = np.asarray(prop["values"])
        if values.shape != (n,):
            raise ValueError(f"property {name!r} must have shape ({n},), got {values.shape}")
        if name in props:
            raise ValueError(f"property name {name!r} is used twice")
        props[name] = dict(prop, target="structure", values=values.tolist())
    if color is not None and color not in props:
        raise ValueError(f"color {color!r} is not a property; choose from {sorted(props)}")
    settings = chemiscope.quick_settings(x=map_names[0], y=map_names[1], map_color=color, periodic=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    chemiscope.write_input(str(path), structures=structures, properties=props, metadata=dict(meta),
                           settings=settings)
    return path


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

def paper_pooling_numbers() -> dict:
    """The paper's structure-level GFRE of cumulant-pooled PET-MAD features (``data/paper.yml``).

    Returns
    -------
    dict
        ``{"k->k+1": (low, high), "1->8": value, "sources": [...]}``: GFRE(k -> k+1) of the paper
        lies in ``[low, high]`` for k = 1..7, GFRE(1 -> 8) is ``value``; ``sources`` cite the files.
    """
    from .paper import paper_stat

    step, top = paper_stat("cumulant_step"), paper_stat("cumulant_mean_to_top")
    return {"k->k+1": (step.low, step.high), "1->8": top.mean, "sources": list(step.sources)}


def paper_agreement(info, reference: Mapping | None = None) -> list[str]:
    """Two sentences comparing GFRE per order with the paper's PET-MAD values.

    Parameters
    ----------
    info : pandas.DataFrame
        :func:`order_information` tables of several models concatenated, with a ``model``
        column (see :func:`combine_orders`).
    reference : mapping, default :func:`paper_pooling_numbers`
        ``{"k->k+1": (low, high), "1->8": value}``.

    Returns
    -------
    list of str
        One sentence on GFRE(k -> k+1), one on GFRE(1 -> k) at the highest order computed.
    """
    reference = paper_pooling_numbers() if reference is None else reference
    lo, hi = reference["k->k+1"]
    ref = reference["1->8"]
    step = info[info.measure == "k->k+1"].assign(inside=lambda t: (t.gfre >= lo) & (t.gfre <= hi))
    inside = step.groupby("model").inside.all()
    first = (f"GFRE(k→k+1) ranges from {step.gfre.min():.2f} to {step.gfre.max():.2f} over the models "
             f"and orders here; all orders of {int(inside.sum())} of {len(inside)} models lie inside the "
             f"paper's PET-MAD range {lo:.2f}–{hi:.2f}, and {float(step.inside.mean()):.0%} of all values do.")
    top = int(info.k[info.measure == "1->k"].max())
    last = info[(info.measure == "1->k") & (info.k == top)]
    near = (last.gfre - ref).abs() <= 0.1
    caveat = "" if top == 8 else f" (the paper's value is for order 8, these for order {top})"
    second = (f"GFRE(1→{top}) ranges from {last.gfre.min():.2f} to {last.gfre.max():.2f}, against "
              f"{ref:.2f} for PET-MAD{caveat}; {int(near.sum())} of {len(last)} models lie within 0.1 of it.")
    return [first, second]


def plot_order_information(info, title: str | None = None, reference: Mapping | None = None):
    """Line plots of GFRE(k -> k+1) and GFRE(1 -> k) against k, one line per model.

    The paper's PET-MAD values (``reference``, default :func:`paper_pooling_numbers`) are drawn
    beside them: a band for GFRE(k -> k+1), a star for GFRE(1 -> 8). With ``ci_low`` and
    ``ci_high`` columns (``order_information(n_boot=...)``) every point carries its interval.
    Sized for a page (8 in wide, fonts of at least 8 pt); provenance belongs in the caption.

    Parameters
    ----------
    info : pandas.DataFrame
        Concatenated :func:`order_information` tables with a ``model`` column.
    title : str, optional
        Figure title.
    """
    import matplotlib.pyplot as plt

    reference = paper_pooling_numbers() if reference is None else reference
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    lo, hi = reference["k->k+1"]
    axes[0].axhspan(lo, hi, color="0.85", label="PET-MAD (paper)")
    axes[1].plot([8], [reference["1->8"]], "k*", ms=12, label="PET-MAD (paper)")
    for ax, measure, label in ((axes[0], "k->k+1", "GFRE(order k → order k+1)"),
                               (axes[1], "1->k", "GFRE(order 1 → order k)")):
        for model, part in info[info.measure == measure].groupby("model"):
            if "ci_low" in part:
                err = np.vstack([part.gfre - part.ci_low, part.ci_high - part.gfre]).clip(min=0)
                ax.errorbar(part.k, part.gfre, yerr=err, fmt="o-", ms=3, capsize=2, label=model)
            else:
                ax.plot(part.k, part.gfre, "o-", ms=3, label=model)
        ax.set_xlabel("cumulant order k", fontsize=10)
        ax.set_ylabel(label, fontsize=10)
        ax.tick_params(labelsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08 + 0.05 * ((len(labels) - 1) // 4), 1, 1))
    return fig


def plot_pcovr_maps(maps: Mapping, colours: Mapping, title: str | None = None):
    """Grid of 2-D maps: one row per map, one column per colouring.

    Sized for a page (8 in wide, fonts of at least 8 pt); provenance belongs in the caption.

    Parameters
    ----------
    maps : mapping label -> ndarray of shape (n, 2)
    colours : mapping label -> array of shape (n,)
        Strings are drawn as categories with a legend, numbers with a colour bar.
    title : str, optional
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(maps), len(colours), figsize=(8, 3.4 * len(maps)), squeeze=False)
    for row, (map_label, xy) in zip(axes, maps.items()):
        for ax, (colour_label, c) in zip(row, colours.items()):
            c = np.asarray(c)
            if c.dtype.kind in "OUS":
                for j, cat in enumerate(sorted(set(c.tolist()))):
                    sel = c == cat
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=f"C{j}", label=str(cat))
                ax.legend(fontsize=8, markerscale=2)
            else:
                lim = np.percentile(np.abs(c), 98)
                sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=c, cmap="coolwarm", vmin=-lim, vmax=lim)
                bar = fig.colorbar(sc, ax=ax)
                bar.set_label(colour_label, fontsize=9)
                bar.ax.tick_params(labelsize=8)
            ax.set_xlabel("PCovR 1", fontsize=9)
            ax.set_ylabel("PCovR 2", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.set_title(f"{map_label}, by {colour_label}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _check_xy(X, y, xname: str, yname: str, multi_output: bool = False) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{xname} must be 2-D (n_structures, n_features), got shape {X.shape}")
    if not (y.ndim == 1 or (multi_output and y.ndim == 2)) or len(y) != len(X):
        raise ValueError(f"{yname} must have shape ({len(X)},){' or (n, p)' if multi_output else ''} "
                         f"to match {xname}, got {y.shape}")
    if len(y) < 2:
        raise ValueError(f"need at least 2 structures, got {len(y)}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError(f"{xname} or {yname} holds NaN or infinite values")
    return X, y
