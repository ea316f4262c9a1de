"""Tables and curves of notebook 03: errors per protocol, features per protocol, per-epoch GFRE."""

from __future__ import annotations

import numpy as np

from . import LABELS, FinetuneResult, evaluate


def error_table(base: str, results: dict[str, FinetuneResult], test: list, device: str = "cpu"):
    """Test energy and force RMSE of the zero-shot base and of each protocol's final model.

    Returns
    -------
    pandas.DataFrame
        Index: protocol label; columns ``model``, ``energy RMSE (meV/atom)``,
        ``force RMSE (meV/Å)``, ``epochs``, ``train seconds``.
    """
    import pandas as pd

    rows = []
    models = [("zero-shot", base, None)] + [(p, r.final.key, r) for p, r in results.items()]
    for protocol, key, run in models:
        err = evaluate(key, test, device=device)
        rows.append({"protocol": LABELS[protocol], "model": key, "energy RMSE (meV/atom)": err["energy_rmse"],
                     "force RMSE (meV/Å)": err["force_rmse"], "epochs": 0 if run is None else len(run.epochs),
                     "train seconds": 0.0 if run is None else run.seconds})
    return pd.DataFrame(rows).set_index("protocol")


def protocol_features(models: dict[str, str], structures: list, label: str, layer: str = "last",
                      device: str = "auto") -> dict:
    """Aligned features of ``models`` (name -> registry key) on ``structures``, via the store.

    Structures a model cannot featurise (an element a bespoke model never saw) are dropped for
    every model, so the FeatureSets hold the same atoms in the same order.
    """
    from ..features import align
    from ..store import get_features

    out = {name: get_features(label, key, layer, structures=structures, device=device, on_unsupported="skip")
           for name, key in models.items()}
    return align(out)


def epoch_curves(base: str, results: dict[str, FinetuneResult], structures: list, label: str,
                 layer: str = "last", test_size=0.5, seed: int = 0, device: str = "auto"):
    """GFRE(epoch -> final) and GFRE(base -> epoch) for every epoch of every protocol.

    ``GFRE(epoch -> final)`` falls to 0 at the last epoch by construction; how fast it gets
    there shows when the features settle. ``GFRE(base -> epoch)`` shows how far training
    moves the features away from what the base spans.

    Returns
    -------
    pandas.DataFrame
        Columns ``protocol``, ``epoch``, ``gfre epoch→final``, ``gfre base→epoch``.
    """
    import pandas as pd

    from ..metrics import gfre, split_indices

    rows = []
    for protocol, run in results.items():
        names = {"base": base} | {f"e{s.derived['epoch']}": s.key for s in run.epochs}
        feats = protocol_features(names, structures, label, layer, device)
        base_x = feats["base"].values
        final = feats[f"e{run.epochs[-1].derived['epoch']}"].values
        train, test = split_indices(len(base_x), test_size=test_size, seed=seed)
        for spec in run.epochs:
            x = feats[f"e{spec.derived['epoch']}"].values
            rows.append({"protocol": LABELS[protocol], "epoch": spec.derived["epoch"],
                         "gfre epoch→final": gfre(x, final, train, test, device=device),
                         "gfre base→epoch": gfre(base_x, x, train, test, device=device)})
    return pd.DataFrame(rows)


def allowed_elements(keys: list[str], device: str = "cpu") -> set[int]:
    """Elements every model of ``keys`` can featurise (intersection of their embeddings)."""
    from ..extract import load_adapter

    allowed = None
    for key in keys:
        z = set(load_adapter(key, device=device).supported_elements)
        allowed = z if allowed is None else allowed & z
    return allowed or set()


def within(structures: list, elements: set[int]) -> list:
    """The structures made only of ``elements``."""
    return [a for a in structures if set(int(z) for z in np.unique(a.numbers)) <= elements]
