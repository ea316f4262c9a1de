"""What a run found: our numbers with intervals, set beside the paper's, glued into the book.

Each results notebook builds :class:`~umlip_latents.paper.Finding` objects from its tables and
calls :func:`glue_findings`; its narrative (``book/results-*.md``) shows glued values only
(``{glue:text}`` / ``{glue:md}``), so no number in prose is typed by hand. The book reads the
glued findings of every executed notebook back (:func:`read_glued`) to write the findings
chapter and the box on the intro page.

Intervals: a matrix of :func:`umlip_latents.metrics.reconstruction_matrix` computed with
``n_boot > 0`` carries its re-drawn splits in ``attrs["replicates"]``; a statistic over several
pairs (a mean, a difference of directions) is recomputed on every replicate and its 2.5 and
97.5 percentiles are the interval. Without replicates an estimate has no interval and no
verdict against the paper is made.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .metrics import percentile_interval
from .paper import Estimate, Finding, paper_stat

#: The glue key holding a notebook's findings (a JSON list of :meth:`Finding.to_dict`).
FINDINGS_KEY = "findings"
_GLUE_PREFIX = "application/papermill.record/"


# ---------------------------------------------------------------------------------------------
# estimates with intervals
# ---------------------------------------------------------------------------------------------

def _lookup(table, metric: str):
    sub = table[table.metric == metric]
    return dict(zip(zip(sub.source, sub.target), sub.value.astype(float)))


def statistic(matrix, metric: str, fn, n: str = "") -> Estimate:
    """``fn(values)`` on the matrix and on each of its bootstrap replicates.

    ``fn`` takes a mapping ``(source, target) -> value`` and returns a float.
    """
    value = float(fn(_lookup(matrix, metric)))
    reps = matrix.attrs.get("replicates")
    if not reps:
        return Estimate(value, None, None, n)
    import pandas as pd

    boot = [float(fn(_lookup(part, metric))) for _, part in pd.DataFrame(reps).groupby("boot")]
    boot = [b for b in boot if math.isfinite(b)]
    if not boot:
        return Estimate(value, None, None, n)
    low, high = percentile_interval(boot)
    return Estimate(value, float(low), float(high), n)


def mean_over(matrix, pairs: Sequence[tuple[str, str]], metric: str = "gfre", n: str = "") -> Estimate:
    """Mean of ``metric`` over ``pairs`` (source, target), with its bootstrap interval."""
    pairs = list(pairs)
    if not pairs:
        return Estimate(math.nan, None, None, n)
    return statistic(matrix, metric, lambda v: np.mean([v[p] for p in pairs]), n)


def asymmetry(matrix, a: str, b: str, metric: str = "gfre") -> Estimate:
    """``metric(a -> b) - metric(b -> a)`` with its interval: direction matters when it excludes 0."""
    return statistic(matrix, metric, lambda v: v[(a, b)] - v[(b, a)])


def mean_difference(matrix, a: str, b: str, pairs: Sequence[tuple[str, str]], n: str = "") -> Estimate:
    """Mean over ``pairs`` of metric ``a`` minus metric ``b`` (same splits), with its interval."""
    import pandas as pd

    pairs = list(pairs)

    def diff(table):
        va, vb = _lookup(table, a), _lookup(table, b)
        return float(np.mean([va[p] - vb[p] for p in pairs]))

    value = diff(matrix)
    reps = matrix.attrs.get("replicates")
    if not reps or not pairs:
        return Estimate(value if pairs else math.nan, None, None, n)
    boot = [diff(part) for _, part in pd.DataFrame(reps).groupby("boot")]
    low, high = percentile_interval(boot)
    return Estimate(value, float(low), float(high), n)


def join_matrices(*matrices, rename: Mapping[int, Mapping[str, str]] | None = None):
    """Tables of :func:`reconstruction_matrix` on the same splits as one, replicates included.

    ``rename`` maps a matrix's position to ``{old metric: new metric}`` (e.g. LFRE computed with
    another neighbour rule as ``"lfre_min_d"``). The splits must agree (seed, test size, resamples).
    """
    import pandas as pd

    rename = rename or {}
    keys = ("seed", "test_size", "n_boot", "n_train", "n_test")
    first = {k: matrices[0].attrs.get(k) for k in keys}
    for m in matrices[1:]:
        other = {k: m.attrs.get(k) for k in keys}
        if other != first:
            raise ValueError(f"matrices on different splits cannot be joined: {first} vs {other}")
    parts, reps = [], []
    for i, m in enumerate(matrices):
        names = dict(rename.get(i, {}))
        parts.append(m.assign(metric=m.metric.map(lambda x: names.get(x, x))))
        reps += [{**r, "metric": names.get(r["metric"], r["metric"])} for r in m.attrs.get("replicates") or []]
    out = pd.concat(parts, ignore_index=True)
    out.attrs = {k: v for k, v in matrices[0].attrs.items() if k != "replicates"}
    if reps:
        out.attrs["replicates"] = reps
    return out


def significant(est: Estimate) -> bool | None:
    """Whether an interval excludes zero (``None`` without an interval)."""
    if not est.has_interval:
        return None
    return est.low > 0 or est.high < 0


def data_size(matrix) -> str:
    """The data behind a matrix in words: split sizes and resamples."""
    a = matrix.attrs
    boot = f", {a['n_boot']} re-drawn splits" if a.get("n_boot") else ", no resampling"
    return f"{a.get('n_train', '?'):,} train / {a.get('n_test', '?'):,} test{boot}"


def cross_family_pairs(models: Iterable[str], families: Mapping[str, str]) -> list[tuple[str, str]]:
    """Ordered pairs of models of different families."""
    models = list(models)
    return [(s, t) for s in models for t in models if s != t and families[s] != families[t]]


def variant_pairs(variants: Sequence[Mapping], axes: Sequence[str], present: Iterable[str]) -> list[tuple[str, str]]:
    """Both directions of every registered variant pair on one of ``axes`` whose models are present."""
    present = set(present)
    out = []
    for v in variants:
        a, b = v["pair"]
        if v["axis"] in axes and a in present and b in present:
            out += [(a, b), (b, a)]
    return out


def fmt(est: Estimate, digits: int = 2) -> str:
    """An estimate in prose: ``0.63 (95 % interval 0.61–0.65)`` or the bare value."""
    if not math.isfinite(est.value):
        return "not measured"
    if est.has_interval:
        return f"{est.value:.{digits}f} (95 % interval {est.low:.{digits}f}–{est.high:.{digits}f})"
    return f"{est.value:.{digits}f} (no interval: n_boot = 0)"


# ---------------------------------------------------------------------------------------------
# the findings of each analysis
# ---------------------------------------------------------------------------------------------

#: Our variant axes (data/variants.yml) grouped by the paper experiment they match.
AXES = {"training_set": ("training set", "multi-fidelity"), "functional": ("functional",), "size": ("size",)}
_TITLES = {"cross_architecture": "Different architectures are far apart",
           "training_set": "Training-set variants of one architecture",
           "functional": "Functional variants of one architecture",
           "size": "Size variants of one architecture",
           "last_to_backbone": "Last layer → backbone of the same model",
           "backbone_to_last": "Backbone → last layer of the same model",
           "finetuned_to_base": "Fine-tuned → pretrained base",
           "base_to_finetuned": "Pretrained base → fine-tuned",
           "finetuned_to_bespoke": "Fine-tuned → trained from scratch",
           "bespoke_to_finetuned": "Trained from scratch → fine-tuned",
           "cumulant_step": "What cumulant order k+1 adds to order k",
           "cumulant_mean_to_top": "What the mean misses of the highest order"}


#: How a measure reads on the page; ``lfre_determined`` is LFRE with k = 2 (D_source + 1) neighbours
#: (compared with the paper's LFRE, whose k = min(D)).
MEASURE_LABELS = {"gfre": "GFRE", "lfre": "LFRE", "lfre_determined": "LFRE, k = 2(D+1)"}


def finding(claim: str, ours: Estimate, chapter: str, section: str, measure: str = "gfre",
            detail: str = "", paper_claim: str | None = None) -> Finding:
    """A :class:`Finding` with the paper's matched experiment looked up (its GFRE or LFRE)."""
    paper_measure = "lfre" if measure.startswith("lfre") else measure
    return Finding(claim, _TITLES.get(claim, claim), ours, paper_stat(paper_claim or claim, paper_measure),
                   chapter, section, measure, detail)


def cross_model_findings(matrix, families: Mapping[str, str], variants: Sequence[Mapping],
                         layers=None, chapter: str = "02-cross-model") -> list[Finding]:
    """Cross-architecture, variant-axis and last-layer/backbone findings of notebook 02.

    ``layers`` is the table of :func:`layer_matrix` (optional).
    """
    models = sorted(set(matrix.source))
    n = data_size(matrix)
    out = []
    pairs = cross_family_pairs(models, families)
    present = set(matrix.metric)
    # the paper's LFRE used k = min(D): that is the LFRE set beside it; a determined LFRE is reported too
    as_measure = {"gfre": "gfre", "lfre_min_d": "lfre"} if "lfre_min_d" in present else {"gfre": "gfre", "lfre": "lfre"}
    if "lfre_min_d" in present and "lfre" in present:
        as_measure["lfre"] = "lfre_determined"
    for metric, measure in as_measure.items():
        if metric not in present:
            continue
        est = mean_over(matrix, pairs, metric, n)
        out.append(finding("cross_architecture", est, chapter, "GFRE and LFRE between every pair", measure,
                           f"mean over {len(pairs)} ordered pairs of models of different families"))
    for claim, axes in AXES.items():
        vp = variant_pairs(variants, axes, models)
        if vp:
            names = ", ".join(f"{a}/{b}" for a, b in vp[::2])
            out.append(finding(claim, mean_over(matrix, vp, "gfre", n), chapter, "Variants of one architecture",
                               "gfre", f"mean over both directions of {names}"))
    if layers is not None and len(layers):
        lm = sorted({s.rsplit(":", 1)[0] for s in layers.source})
        nl = data_size(layers)
        for claim, (a, b) in (("last_to_backbone", ("last", "backbone")), ("backbone_to_last", ("backbone", "last"))):
            pairs = [(f"{m}:{a}", f"{m}:{b}") for m in lm]
            out.append(finding(claim, mean_over(layers, pairs, "gfre", nl), chapter,
                               "Last-layer against backbone features", "gfre", f"mean over {len(lm)} models"))
    return out


def layer_matrix(first: Mapping, second: Mapping, names: tuple[str, str], **kwargs):
    """Each model's two layers reconstructing each other, as one tidy table with replicates.

    ``first`` and ``second`` map model key -> FeatureSet of the two layers (``names``);
    the sources and targets are ``"<key>:<layer>"``. Keyword arguments go to
    :func:`umlip_latents.metrics.reconstruction_matrix`.
    """
    import pandas as pd

    from .metrics import reconstruction_matrix

    parts, reps = [], []
    for key in first:
        m = reconstruction_matrix({f"{key}:{names[0]}": first[key], f"{key}:{names[1]}": second[key]}, **kwargs)
        parts.append(m)
        reps += m.attrs.get("replicates") or []
    out = pd.concat(parts, ignore_index=True)
    out.attrs = {k: v for k, v in parts[0].attrs.items() if k != "replicates"}
    if reps:
        out.attrs["replicates"] = reps
    return out


def finetune_findings(matrix, base: str, finetuned: Sequence[str], bespoke: str | None,
                      chapter: str = "03-finetuning-bias", section: str = "The paper's numbers beside ours",
                      not_learned: Sequence[str] = ()) -> list[Finding]:
    """Fine-tuned vs base and vs bespoke, both directions, mean over the fine-tuned models.

    ``not_learned`` names the models (as in ``matrix``) that did not learn their domain (see
    :func:`learned`): a comparison involving one of them is reported, but its verdict says it is
    not a comparison with the paper, whose fine-tuned models did learn theirs.
    """
    n = data_size(matrix)
    finetuned = list(finetuned)
    groups = {"finetuned_to_base": [(f, base) for f in finetuned],
              "base_to_finetuned": [(base, f) for f in finetuned]}
    if bespoke:
        groups["finetuned_to_bespoke"] = [(f, bespoke) for f in finetuned]
        groups["bespoke_to_finetuned"] = [(bespoke, f) for f in finetuned]
    out = []
    for metric in sorted(set(matrix.metric) & {"gfre", "lfre"}):
        for claim, pairs in groups.items():
            f = finding(claim, mean_over(matrix, pairs, metric, n), chapter, section, metric,
                        f"mean over {', '.join(finetuned)}")
            failed = sorted({m for p in pairs for m in p if m in set(not_learned)})
            if failed:
                f.verdict = (f"not a comparison: {_names(failed)} did not learn the fine-tuning domain (test energy "
                             f"RMSE above a third of zero-shot or force RMSE not below it)")
            out.append(f)
    return out


def pooling_findings(info, chapter: str = "04-cumulant-pooling",
                     section: str = "Information added per order") -> list[Finding]:
    """GFRE(k -> k+1) averaged over orders and models, and GFRE(1 -> top), from :func:`order_information`."""
    top = int(info.k[info.measure == "1->k"].max())
    a = info.attrs
    n = (f"{a.get('n_train', '?')} train / {a.get('n_test', '?')} test structures"
         + (f", {a['n_boot']} re-drawn splits" if a.get("n_boot") else ", no resampling"))

    def est(sel):
        value = float(sel(info).gfre.mean())
        reps = a.get("replicates")
        if not reps:
            return Estimate(value, None, None, n)
        import pandas as pd

        boot = [float(sel(part).gfre.mean()) for _, part in pd.DataFrame(reps).groupby("boot")]
        low, high = percentile_interval(boot)
        return Estimate(value, float(low), float(high), n)

    models = info.model.nunique() if "model" in info else 1
    step = est(lambda t: t[t.measure == "k->k+1"])
    last = est(lambda t: t[(t.measure == "1->k") & (t.k == top)])
    caveat = "" if top == 8 else f"; the paper's value is for order 8, ours for order {top}"
    return [finding("cumulant_step", step, chapter, section, "gfre",
                    f"mean over orders 1..{top - 1} and {models} models"),
            finding("cumulant_mean_to_top", last, chapter, section, "gfre",
                    f"GFRE(1 → {top}), mean over {models} models{caveat}")]


def findings_table(findings: Sequence[Finding]):
    """Findings as a table for a notebook: human column names, rounded numbers."""
    import pandas as pd

    rows = [{"comparison": f.title, "measure": MEASURE_LABELS.get(f.measure, f.measure), "ours (95 % interval)": f.ours.text(),
             "data": f.ours.n, "paper": f.paper.text() if f.paper else "–", "verdict": f.verdict}
            for f in findings]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# glue: numbers and sentences into the page, and back out for the findings chapter
# ---------------------------------------------------------------------------------------------

def glue_text(name: str, markdown: str) -> None:
    """Glue a sentence (Markdown) for ``{glue:md}`name``` in the chapter's prose."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(markdown), display=False)


def glue_value(name: str, value: float) -> None:
    """Glue a number for ``{glue:text}`name:.2f``` in the chapter's prose."""
    from myst_nb import glue

    glue(name, float(value), display=False)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def glue_findings(findings: Sequence[Finding]) -> None:
    """Glue a notebook's findings: the JSON list for the book, and per claim ``<claim>_<measure>_*``.

    For each finding: ``..._ours`` (our estimate in words), ``..._paper`` (the paper's number)
    and ``..._verdict`` are Markdown, for the chapter's prose.
    """
    from myst_nb import glue

    glue(FINDINGS_KEY, json.dumps([_plain(f.to_dict()) for f in findings]), display=False)
    for f in findings:
        key = f"{f.claim}_{f.measure}"
        glue_text(f"{key}_ours", fmt(f.ours))
        glue_text(f"{key}_paper", f.paper.text() if f.paper else "no matching experiment")
        glue_text(f"{key}_verdict", f.verdict)


def read_glued(nb) -> dict:
    """Every value glued in an executed notebook: name -> text/markdown or parsed text/plain."""
    out = {}
    for c in nb.cells:
        for o in c.get("outputs", []):
            meta = o.get("metadata", {}).get("scrapbook")
            if not meta:
                continue
            data = o.get("data", {})
            md = data.get(_GLUE_PREFIX + "text/markdown")
            if md is not None:
                out[meta["name"]] = md
                continue
            plain = data.get(_GLUE_PREFIX + "text/plain")
            try:
                out[meta["name"]] = ast.literal_eval(plain)
            except (ValueError, SyntaxError):
                out[meta["name"]] = plain
    return out


def notebook_findings(nb) -> list[dict]:
    """The findings a notebook glued (empty when it glued none)."""
    raw = read_glued(nb).get(FINDINGS_KEY)
    return json.loads(raw) if raw else []


# ---------------------------------------------------------------------------------------------
# tables and sentences of notebook 02, computed from its matrices
# ---------------------------------------------------------------------------------------------

def variant_asymmetry(matrix, variants: Sequence[Mapping], metric: str = "gfre"):
    """Registered variant pairs present in ``matrix``: both directions and their difference.

    Columns: model A, model B, axis, ``<M> A→B``, ``<M> B→A``, ``A→B − B→A`` (with its 95 %
    interval, as text) and ``direction matters`` (the interval excludes 0; "no interval" without
    resampling).
    """
    import pandas as pd

    present = set(matrix.source)
    v = _lookup(matrix, metric)
    rows = []
    for var in variants:
        a, b = var["pair"]
        if a not in present or b not in present:
            continue
        d = asymmetry(matrix, a, b, metric)
        sig = significant(d)
        rows.append({"model A": a, "model B": b, "axis": var["axis"], f"{metric.upper()} A→B": v[(a, b)],
                     f"{metric.upper()} B→A": v[(b, a)], "A→B − B→A": d.text(3),
                     "direction matters": "no interval" if sig is None else ("yes" if sig else "no")})
    return pd.DataFrame(rows)


def _names(pairs) -> str:
    return ", ".join(pairs[:-1]) + (" and " if len(pairs) > 1 else "") + pairs[-1] if pairs else "none"


def cross_model_summary(matrix, families: Mapping[str, str], variants: Sequence[Mapping], layers=None,
                        beyond=None) -> list[str]:
    """The bullet points of "What the numbers show" for notebook 02, every number computed.

    ``layers`` is :func:`layer_matrix`'s table; ``beyond`` a matrix with ``gfre`` and
    ``nonlinear_gfre``. Each returned string is one Markdown bullet (without the dash).
    """
    models = sorted(set(matrix.source))
    n = data_size(matrix)
    g = _lookup(matrix, "gfre")
    out = []
    pairs = cross_family_pairs(models, families)
    if pairs:
        est = mean_over(matrix, pairs, "gfre", n)
        stat = paper_stat("cross_architecture", "gfre")
        to = {m: np.mean([g[(s, m)] for s, t in pairs if t == m]) for m in models}
        frm = {m: np.mean([g[(m, t)] for s, t in pairs if s == m]) for m in models}
        hard, poor = max(to, key=to.get), max(frm, key=frm.get)
        who = (f"{hard} is the hardest to rebuild and rebuilds the others worst (mean GFRE {to[hard]:.2f} to it, "
               f"{frm[hard]:.2f} from it)" if hard == poor else
               f"{hard} is the hardest to rebuild (mean GFRE {to[hard]:.2f} to it) and {poor} rebuilds the others "
               f"worst ({frm[poor]:.2f} from it)")
        out.append(f"*Across architectures the features are far apart.* The mean GFRE over {len(pairs)} ordered "
                   f"pairs of models of different families is {fmt(est)}; the paper's four uMLIPs (MAD and "
                   f"sAlexandria) give {stat.text()}. {who}.")
    if "gfrd" in set(matrix.metric) and pairs:
        same = [(s, t) for s in models for t in models if s != t and families[s] == families[t]]
        across = fmt(mean_over(matrix, pairs, "gfrd", n))
        within = f", between models of one family {fmt(mean_over(matrix, same, 'gfrd', n))}" if same else ""
        out.append(f"*Distortion beside error.* The mean GFRD across families is {across}{within}: how far the "
                   f"best linear map between two feature spaces is from a rotation.")
    present = set(models)
    for claim, axes in AXES.items():
        vp = variant_pairs(variants, axes, present)
        if not vp:
            continue
        vals = [g[p] for p in vp]
        stat = paper_stat(claim, "gfre")
        npairs = len(vp) // 2
        out.append(f"*{_TITLES[claim]}* ({', '.join(axes)}; {npairs} pair{'s' if npairs > 1 else ''}, both directions): GFRE "
                   f"{min(vals):.2f}–{max(vals):.2f}, mean {fmt(mean_over(matrix, vp, 'gfre', n))}; "
                   f"the paper's matching experiment gives {stat.text()}.")
    table = variant_asymmetry(matrix, variants)
    if len(table):
        known = table[table["direction matters"] != "no interval"]
        if len(known):
            yes = known[known["direction matters"] == "yes"]
            names = [f"{r['model A']}/{r['model B']}" for _, r in yes.iterrows()]
            out.append(f"*Direction.* For {len(yes)} of {len(known)} variant pairs the difference between "
                       f"A→B and B→A has a 95 % interval that excludes zero ({_names(names)}); for the "
                       f"others the asymmetry is within the resampling noise.")
        else:
            out.append("*Direction.* Without resampling (n_boot = 0) no asymmetry between A→B and B→A can be "
                       "called a difference.")
    if layers is not None and len(layers):
        lg = _lookup(layers, "gfre")
        lm = sorted({s.rsplit(":", 1)[0] for s in layers.source})
        b2l = {m: lg[(f"{m}:backbone", f"{m}:last")] for m in lm}
        l2b = {m: lg[(f"{m}:last", f"{m}:backbone")] for m in lm}
        linear = [m for m in lm if b2l[m] < 0.01]
        rest = [m for m in lm if m not in linear]
        text = (f"*Last layer against backbone.* The backbone keeps {min(l2b.values()):.2f}–{max(l2b.values()):.2f} "
                f"of its variance out of the last layer (GFRE last → backbone). ")
        if linear:
            text += (f"For {_names(linear)} the last layer is a linear function of the backbone (GFRE backbone → "
                     f"last below 0.01: the first readout layer is linear). ")
        if rest:
            text += (f"For {_names(rest)} the backbone leaves {min(b2l[m] for m in rest):.2f}–"
                     f"{max(b2l[m] for m in rest):.2f} of the last layer unexplained linearly.")
        out.append(text.strip())
    if beyond is not None and len(beyond):
        w = beyond[beyond.source != beyond.target].pivot_table(index=["source", "target"], columns="metric",
                                                              values="value")
        lower = float((w.nonlinear_gfre < w.gfre).mean())
        verb = "explains part, not most, of the gap" if w.nonlinear_gfre.mean() > 0.5 * w.gfre.mean() \
            else "explains most of the gap"
        out.append(f"*Non-linearity {verb}.* Kernel ridge lowers the error for {lower:.0%} of the pairs, from a "
                   f"mean GFRE of {w.gfre.mean():.2f} to {w.nonlinear_gfre.mean():.2f}.")
    out += lfre_sentences(matrix)
    return out


def _rule_text(rule) -> str:
    if rule == "determined":
        return "k = 2 (D_source + 1) neighbours (each local fold determined)"
    if rule is None:
        return "the paper's k = min(D_source, D_target) neighbours"
    return f"k = {rule} neighbours"


def _relation(d: Estimate) -> str:
    if not d.has_interval:
        return "lower" if d.value < 0 else "higher"
    if d.high < 0:
        return "lower"
    if d.low > 0:
        return "higher"
    return "not distinguishable from"


def lfre_sentences(matrix) -> list[str]:
    """LFRE against GFRE under each neighbour rule in ``matrix`` (metrics ``lfre``, ``lfre_min_d``)."""
    models = sorted(set(matrix.source))
    off = [(s, t) for s in models for t in models if s != t]
    metrics = [m for m in ("lfre", "lfre_min_d") if m in set(matrix.metric)]
    if not metrics or "gfre" not in set(matrix.metric) or not off:
        return []
    n = data_size(matrix)
    parts = []
    rules = {"lfre": matrix.attrs.get("n_local_points"), "lfre_min_d": None}
    for m in metrics:
        v = _lookup(matrix, m)
        mean = mean_over(matrix, off, m, n)
        d = mean_difference(matrix, m, "gfre", off, n)
        above = sum(v[p] > 1 for p in off)
        parts.append(f"with {_rule_text(rules[m])}, the mean off-diagonal LFRE is {fmt(mean)}, {_relation(d)} the "
                     f"GFRE (LFRE − GFRE {fmt(d)}); {above} of {len(off)} cells {'exceeds' if above == 1 else 'exceed'} 1")
    return [f"*LFRE against GFRE* ({matrix.attrs.get('n_train', 0):,} training atoms): " + "; ".join(parts)
            + ". A cell above 1 is a local fit that does worse on its test atoms than predicting the target's mean "
              "(error 1 by the scaling): the local regressions generalise worse than none, which happens when the "
              "neighbourhoods are too small or too sparse for the source's columns; with k = min(D) the local refit has "
              "about as many rows as columns, the interpolation threshold, where the penalty chosen on half-size "
              "folds can be far too small (see the convergence study and LFRE against k)."]


# ---------------------------------------------------------------------------------------------
# sentences of notebook 04
# ---------------------------------------------------------------------------------------------

def pooling_summary(info, best=None, n_train: int | None = None) -> list[str]:
    """The bullet points of "What the numbers show" for notebook 04, every number computed.

    ``info`` is :func:`umlip_latents.structure.combine_orders`' table; ``best`` the per-model
    table of the downstream test (index model; columns ``k``, ``gain vs mean only``).
    """
    step = info[info.measure == "k->k+1"]
    top = int(info.k[info.measure == "1->k"].max())
    last = info[(info.measure == "1->k") & (info.k == top)].set_index("model").gfre
    per_model = step.groupby("model").gfre.mean()
    stat = paper_stat("cumulant_step", "gfre")
    ref = paper_stat("cumulant_mean_to_top", "gfre")
    out = [f"*{'Every order adds something' if step.gfre.min() > 0.05 else 'Not every order adds something'}.* "
           f"GFRE(k → k+1) lies between {step.gfre.min():.2f} and {step.gfre.max():.2f}; averaged over orders it is "
           f"{per_model.min():.2f} ({per_model.idxmin()}) to {per_model.max():.2f} ({per_model.idxmax()}), against "
           f"the paper's PET-MAD {stat.low:.2f}–{stat.high:.2f} at every order.",
           f"*The mean alone misses most of the order-{top} descriptor.* GFRE(1 → {top}) is "
           f"{last.min():.2f}–{last.max():.2f} (PET-MAD, order 8 in the paper: {ref.mean:.2f})."
           if last.min() > 0.5 else
           f"*What the mean misses of the order-{top} descriptor.* GFRE(1 → {top}) is {last.min():.2f}–"
           f"{last.max():.2f} (PET-MAD, order 8 in the paper: {ref.mean:.2f})."]
    dim = info.attrs.get("dim")
    n_train = n_train or info.attrs.get("n_train")
    if dim and n_train:
        cols = top * dim
        if cols >= n_train // 2:
            out.append(f"*Caveat on the magnitudes.* At order {top} a descriptor has {top} × {dim} = {cols} columns, and "
                       f"each fold of the 2-fold ridge fit has {n_train // 2} of the {n_train} training structures: the "
                       f"high-order regressions are under-determined, so part of the error at large k (and every value "
                       f"above 1) is that, not new information; fewer PCA components (`pooling_components`) or more "
                       f"structures reduce it.")
        else:
            above = int((info[info.measure != "k+1->k"].gfre > 1).sum())
            tail = (f" Still, {above} of the GFRE values exceed 1 (a fit that does worse than predicting the mean): "
                    f"with so few rows per column the regressions overfit, and those values say so rather than "
                    f"measure new information." if above else "")
            out.append(f"*Determined fits.* At order {top} a descriptor has {top} × {dim} = {cols} columns, fewer than "
                       f"the {n_train // 2} structures of each fold of the 2-fold ridge fit.{tail}")
    if best is not None and len(best):
        mean_best = best[best.k == 1]
        gains = best[best.k > 1]
        text = (f"*Higher orders and the energy.* A cross-validated ridge model of the residual DFT energy per atom "
                f"is best with the mean alone for {len(mean_best)} of {len(best)} models")
        if len(gains):
            parts = [f"{m} (order {int(r.k)}, {r['gain vs mean only']:.1%} lower error)" for m, r in gains.iterrows()]
            text += f"; higher orders help {_names(parts)}"
        out.append(text + ".")
    return out


# ---------------------------------------------------------------------------------------------
# sentences of notebook 03
# ---------------------------------------------------------------------------------------------

#: A fine-tuned model "learned its domain" when its test energy RMSE is at most this fraction of zero-shot.
LEARNED_FRACTION = 1 / 3


def learned(errors) -> list[str]:
    """Rows of an error table (after the zero-shot first row) whose model learned its domain.

    Learned: test energy RMSE at most :data:`LEARNED_FRACTION` of zero-shot and force RMSE below it.
    """
    e, f = "energy RMSE (meV/atom)", "force RMSE (meV/Å)"
    zero = errors.iloc[0]
    return [p for p in errors.index[1:] if errors.loc[p, e] <= LEARNED_FRACTION * zero[e] and errors.loc[p, f] < zero[f]]


def finetune_summary(errors, found: Sequence[Finding]) -> list[str]:
    """The bullet points of "What the numbers show" for notebook 03, every number computed.

    ``errors`` is :func:`umlip_latents.finetune.analysis.error_table`'s table (index: protocol
    label, zero-shot first); ``found`` the fine-tuning findings of :func:`finetune_findings`.
    """
    e, f = "energy RMSE (meV/atom)", "force RMSE (meV/Å)"
    zero = errors.iloc[0]
    tuned = errors.iloc[1:]
    ratio = tuned[e] / zero[e]
    ok = learned(errors)
    not_learned = [p for p in tuned.index if p not in ok]
    out = [f"*Accuracy on the new domain.* Zero-shot, the base has a test energy RMSE of {zero[e]:.0f} meV/atom "
           f"and a force RMSE of {zero[f]:.0f} meV/Å; after training, "
           + ", ".join(f"{p} {tuned.loc[p, e]:.0f} meV/atom ({ratio[p]:.0%} of zero-shot) and {tuned.loc[p, f]:.0f} meV/Å"
                       for p in tuned.index) + "."]
    if not_learned:
        out.append(f"*Not every model learned its domain.* {_names(not_learned)} did not reach a test energy RMSE "
                   f"of at most a third of zero-shot with a lower force RMSE. The feature comparisons that involve "
                   f"{'it' if len(not_learned) == 1 else 'them'} are between models that did not learn the domain, so "
                   f"they do not measure what fine-tuning does to a model that did, and they are not set against the "
                   f"paper's numbers (whose fine-tuned models did learn theirs).")
    else:
        out.append("*Every model learned its domain*: each reached a test energy RMSE of at most a third of "
                   "zero-shot and a lower force RMSE, so the feature comparisons below are between trained models.")
    for fi in found:
        if fi.measure != "gfre":
            continue
        out.append(f"*{fi.title}* (GFRE, {fi.detail}): {fmt(fi.ours)}; the paper's PET-MAD on LPS: "
                   f"{fi.paper.text() if fi.paper else '–'} – {fi.verdict}.")
    return out


# ---------------------------------------------------------------------------------------------
# sentences of notebook 01
# ---------------------------------------------------------------------------------------------

def extraction_summary(summary, n_registered: int, n_structures: int, isolated: Mapping[str, int] | None = None,
                       cutoff: float | None = None) -> list[str]:
    """The bullet points of "What the numbers show" for notebook 01, every number computed.

    ``summary`` is the notebook's per-model table (index: model; columns ``D``, ``atoms``,
    ``invariance error``, ``tolerance``, ``rotation``, ``rotation error``,
    ``energy re-read error (eV/atom)`` and the PCA columns); ``isolated`` the structures with
    atoms that have no neighbour within ``cutoff`` (:func:`umlip_latents.checks.isolated_atoms`).
    """
    s = summary
    dims = s.D.astype(int)
    dim_text = (f"all {dims.iloc[0]}-wide" if dims.nunique() == 1 else
                "; ".join(f"{d}-wide: {_names(list(s.index[dims == d]))}" for d in sorted(dims.unique())))
    ok = s["invariance error"] <= s["tolerance"]
    out = [f"*Every available model featurises every structure.* {len(s)} of {n_registered} registered models load "
           f"here and featurise all {n_structures:,} structures ({int(s.atoms.iloc[0]):,} atoms); their features are "
           f"{dim_text}.",
           f"*The declared invariances hold* for {int(ok.sum())} of {len(s)} models (largest relative error "
           f"{s['invariance error'].max():.1e}, against family tolerances of {s.tolerance.min():.0e}–"
           f"{s.tolerance.max():.0e})"
           + ("." if ok.all() else f"; they fail for {_names(list(s.index[~ok]))}.")]
    approx = s[s.rotation != "exact"]
    if len(approx):
        out[-1] += (f" Rotation invariance is only learned by {_names(list(approx.index))}: its measured error is "
                    f"{approx['rotation error'].max():.1e}.")
    reread = s["energy re-read error (eV/atom)"].dropna()
    if len(reread):
        worst = reread.idxmax()
        out.append(f"*Each model's energy is re-read from its stored features* with its own readout weights to "
                   f"{reread.median():.1e} eV/atom (median over models; worst {worst}, {reread.max():.1e} eV/atom).")
    if "effective dimension" in s:
        raw, std = s["effective dimension"], s["effective dimension (standardised)"]
        pcs = s["PCs for 99% variance"].astype(int)
        out.append(f"*Few directions carry the variance.* {pcs.min()}–{pcs.max()} principal components hold 99 % of it; "
                   f"the effective dimension of the raw features is {raw.min():.1f} ({raw.idxmin()}) to "
                   f"{raw.max():.1f} ({raw.idxmax()}), and of standardised columns {std.min():.1f} ({std.idxmin()}) to "
                   f"{std.max():.1f} ({std.idxmax()}).")
    if isolated is not None and cutoff is not None:
        if isolated:
            ids = _names([f"{k} ({v} atoms)" for k, v in sorted(isolated.items())][:5])
            out.append(f"*Isolated atoms.* {len(isolated)} of {n_structures:,} structures "
                       f"{'holds' if len(isolated) == 1 else 'hold'} atoms with no "
                       f"neighbour within {cutoff:g} Å ({ids}): CHGNet, whose graph cutoff this is, warns that its "
                       f"prediction there will likely go wrong, and the features of such an atom carry its "
                       f"species only. The structures stay in the set; their atoms are "
                       f"{sum(isolated.values()) / max(1, int(s.atoms.iloc[0])):.2%} of all atoms.")
        else:
            out.append(f"*No isolated atoms*: every atom has a neighbour within {cutoff:g} Å (CHGNet's graph cutoff).")
    return out
