"""Cross-model comparison tables built on :mod:`umlip_latents.metrics`.

Everything here takes aligned FeatureSets (same structures, same atom order; see
:func:`umlip_latents.features.align`) or the tidy tables of
:func:`umlip_latents.metrics.reconstruction_matrix`, and returns pandas tables.
"""

from __future__ import annotations

import numpy as np
import yaml

from . import paths


def load_variants() -> list[dict]:
    """The variant pairs of ``data/variants.yml`` (pair, axis, note)."""
    return yaml.safe_load((paths.project_root() / "data" / "variants.yml").read_text())


def load_paper_numbers() -> dict:
    """The paper's reported numbers (``data/paper.yml``)."""
    return yaml.safe_load((paths.project_root() / "data" / "paper.yml").read_text())


def pair_value(matrix, source: str, target: str, metric: str) -> float:
    """One entry of a tidy reconstruction table (``source`` reconstructs ``target``)."""
    row = matrix[(matrix.source == source) & (matrix.target == target) & (matrix.metric == metric)]
    return float(row.value.iloc[0]) if len(row) else np.nan


def variant_table(matrix, variants: list[dict] | None = None):
    """GFRE/LFRE both ways for every registered variant pair present in ``matrix``."""
    import pandas as pd

    variants = load_variants() if variants is None else variants
    present = set(matrix.source)
    rows = []
    for v in variants:
        a, b = v["pair"]
        if a not in present or b not in present:
            continue
        row = {"model A": a, "model B": b, "axis": v["axis"], "note": v.get("note", "")}
        for metric in sorted(set(matrix.metric)):
            row[f"{metric.upper()} A→B"] = pair_value(matrix, a, b, metric)
            row[f"{metric.upper()} B→A"] = pair_value(matrix, b, a, metric)
        rows.append(row)
    return pd.DataFrame(rows)


def cross_family_mean(matrix, families: dict, metric: str) -> float:
    """Mean of ``metric`` over ordered pairs of models of different families."""
    m = matrix[(matrix.metric == metric) & (matrix.source != matrix.target)]
    diff = m[[families[s] != families[t] for s, t in zip(m.source, m.target)]]
    return float(diff.value.mean()) if len(diff) else np.nan


def _paper_row(name: str, ours: float, ref: dict, note: str) -> dict:
    """One row of a paper comparison with its verdict (within value +-0.1 or range +-0.05)."""
    lo, hi = (ref["value"] - 0.1, ref["value"] + 0.1) if "value" in ref else \
        (ref.get("min", 0.0) - 0.05, ref.get("max", 1.0) + 0.05)
    shown = ref.get("value", f"{ref.get('min', 0)}–{ref.get('max', '')}" if "min" in ref else f"≤{ref.get('max')}")
    if np.isnan(ours):
        verdict = "not measurable here: no such pair among the available models"
    elif lo <= ours <= hi:
        verdict = f"agrees: ours {ours:.2f} vs paper {shown}"
    else:
        verdict = f"differs: ours {ours:.2f} is {'higher' if ours > hi else 'lower'} than the paper's {shown}"
    return {"quantity": name, "paper": shown, "paper data": ref.get("data", ""), "ours": ours,
            "what we compared": note, "verdict": verdict}


def finetune_comparison(matrix, base: str, finetuned: list[str], bespoke: str | None):
    """The paper's fine-tuning numbers beside ours (PET-MAD on lithium thiophosphate there).

    ``matrix`` is a :func:`~umlip_latents.metrics.reconstruction_matrix` table over names;
    ``base``, ``finetuned`` and ``bespoke`` are names in it. Ours is the mean of both
    directions over the fine-tuned models (the paper does not state a direction).
    """
    import pandas as pd

    paper = load_paper_numbers()["finetuning"]
    g = matrix[matrix.metric == "gfre"].set_index(["source", "target"]).value

    def mean_both(other):
        if other is None or not finetuned:
            return np.nan
        return float(np.mean([g[(f, other)] for f in finetuned] + [g[(other, f)] for f in finetuned]))

    names = ", ".join(finetuned)
    rows = [_paper_row("GFRE fine-tuned ↔ base", mean_both(base), paper["finetuned_vs_base_gfre"],
                       f"mean over both directions of {names} with {base}"),
            _paper_row("GFRE fine-tuned ↔ bespoke", mean_both(bespoke), paper["finetuned_vs_bespoke_gfre"],
                       f"mean over both directions of {names} with {bespoke}")]
    return pd.DataFrame(rows)


def paper_comparison(matrix, families: dict, variants: list[dict] | None = None):
    """Our numbers beside the paper's, one row per reported quantity, with a verdict sentence.

    The verdict is computed from the numbers: "agrees" when ours falls within the paper's
    value +-0.1 (or its range widened by 0.05), otherwise it says in which direction ours differs.
    """
    import pandas as pd

    paper = load_paper_numbers()["cross_model"]
    vt = variant_table(matrix, variants)
    rows = []

    def add(name, ours, ref, note):
        rows.append(_paper_row(name, ours, ref, note))

    add("cross-architecture mean GFRE", cross_family_mean(matrix, families, "gfre"),
        paper["cross_architecture_mean_gfre"], "mean over ordered pairs of different families")
    if "lfre" in set(matrix.metric):
        add("cross-architecture mean LFRE", cross_family_mean(matrix, families, "lfre"),
            paper["cross_architecture_mean_lfre"], "mean over ordered pairs of different families")
    for axis, key in (("size", "size_variants_gfre"), ("training set", "training_set_variants_gfre")):
        sub = vt[vt.axis == axis] if len(vt) else vt
        vals = sub[["GFRE A→B", "GFRE B→A"]].to_numpy().ravel() if len(sub) else np.array([])
        pairs = ", ".join(f"{a}/{b}" for a, b in zip(sub["model A"], sub["model B"])) if len(sub) else "none"
        add(f"{axis} variants GFRE (largest direction)", float(np.max(vals)) if len(vals) else np.nan,
            paper[key], pairs)
    return pd.DataFrame(rows)


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
