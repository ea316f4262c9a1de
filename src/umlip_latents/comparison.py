"""Cross-model comparison tables built on :mod:`umlip_latents.metrics`.

Everything here takes aligned FeatureSets (same structures, same atom order; see
:func:`umlip_latents.features.align`) or the tidy tables of
:func:`umlip_latents.metrics.reconstruction_matrix`, and returns pandas tables. Our numbers set
beside the paper's, with intervals and verdicts, are in :mod:`umlip_latents.findings`.
"""

from __future__ import annotations

import numpy as np
import yaml

from . import paths


def load_variants() -> list[dict]:
    """The variant pairs of ``data/variants.yml`` (pair, axis, note)."""
    return yaml.safe_load((paths.project_root() / "data" / "variants.yml").read_text())


def pointwise_groups(features: dict, pairs: list[tuple[str, str]], metric: str = "lfre", test_size=1000,
                     seed: int = 0, device: str = "auto", stratify: bool = True):
    """Pointwise errors of each pair on one shared test split, with each test atom's subset and element.

    Returns a long table: source, target, atom (index into the aligned atoms), subset, element, error.
    """
    import pandas as pd
    from ase.data import chemical_symbols

    from .metrics import pointwise_gfre, pointwise_lfre, split_indices

    first = next(iter(features.values()))
    labels = first.atom_subsets() if (stratify and first.subsets is not None) else None
    train_idx, test_idx = split_indices(first.n_atoms, test_size, labels, seed)
    fn = {"lfre": pointwise_lfre, "gfre": pointwise_gfre}[metric]
    frames = []
    for source, target in pairs:
        err = fn(features[source].values, features[target].values, train_idx, test_idx, device=device)
        frames.append(pd.DataFrame({
            "source": source, "target": target, "atom": test_idx,
            "subset": first.atom_subsets()[test_idx] if first.subsets is not None else "",
            "element": [chemical_symbols[z] for z in first.species[test_idx]], "error": err,
        }))
    return pd.concat(frames, ignore_index=True)


def lfre_convergence(features: dict, pairs: list[tuple[str, str]], train_sizes, rules=(None, "determined"),
                     test_size=1000, stratify: bool = True, seed: int = 0, device: str = "auto"):
    """LFRE of some pairs against the number of training atoms and the neighbour rule.

    One test split (that of :func:`umlip_latents.metrics.reconstruction_matrix` with the same
    ``test_size``, ``seed`` and subset stratification) is kept; the training atoms are the first
    ``n`` of one seeded permutation of the training split, so each size holds the smaller ones.
    GFRE on the same atoms is given beside it.

    Parameters
    ----------
    features : mapping name -> FeatureSet
    pairs : list of (source, target)
    train_sizes : iterable of int
        Training atoms; sizes above the training split are clipped to it.
    rules : iterable
        Neighbour rules of :func:`umlip_latents.metrics.local_points` (``None``: the paper's
        ``min(D)``; ``"determined"``: ``2 (D_source + 1)``).

    Returns
    -------
    pandas.DataFrame
        Columns ``source, target, rule, k, n_train, lfre, gfre``; ``rule`` is ``"min(D)"`` or
        ``"2(D+1)"`` or the integer.
    """
    import pandas as pd

    from .metrics import gfre, lfre, local_points, split_indices

    first = next(iter(features.values()))
    labels = first.atom_subsets() if (stratify and first.subsets is not None) else None
    train_idx, test_idx = split_indices(first.n_atoms, test_size, labels, seed)
    order = np.random.default_rng(seed).permutation(train_idx)
    sizes = sorted({min(int(n), len(order)) for n in train_sizes})
    names = {None: "min(D)", "determined": "2(D+1)"}
    rows = []
    for source, target in pairs:
        X, Y = features[source].values, features[target].values
        for n in sizes:
            train = np.sort(order[:n])
            g = gfre(X, Y, train, test_idx, device=device)
            for rule in rules:
                k = local_points(rule, X.shape[1], Y.shape[1])
                if k > n:
                    continue
                rows.append({"source": source, "target": target, "rule": names.get(rule, str(rule)), "k": k,
                             "n_train": n, "lfre": lfre(X, Y, train, test_idx, n_local_points=k, device=device),
                             "gfre": g})
    return pd.DataFrame(rows)
