"""Findings: statistics with intervals over re-drawn splits, computed sentences, glue round trip."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from umlip_latents import findings
from umlip_latents.metrics import reconstruction_matrix
from umlip_latents.paper import Estimate


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(400, 6))
    return {"a1": base @ rng.normal(size=(6, 5)), "a2": base[:, :4] @ rng.normal(size=(4, 5)),
            "b1": np.tanh(base @ rng.normal(size=(6, 6))) + 0.3 * rng.normal(size=(400, 6))}


@pytest.fixture(scope="module")
def matrix(features):
    return reconstruction_matrix(features, metric=["gfre", "lfre"], test_size=0.25, n_boot=4, device="cpu")


FAMILIES = {"a1": "A", "a2": "A", "b1": "B"}
VARIANTS = [{"pair": ["a1", "a2"], "axis": "size", "note": ""}]


def test_replicates_hold_every_split_and_cell(matrix):
    reps = pd.DataFrame(matrix.attrs["replicates"])
    assert sorted(reps.boot.unique()) == [0, 1, 2, 3, 4]      # the split of seed, then 4 re-drawn
    first = reps[reps.boot == 0].set_index(["metric", "source", "target"]).value
    assert np.allclose(first.sort_index().to_numpy(),
                       matrix.set_index(["metric", "source", "target"]).value.sort_index().to_numpy())
    spread = reps.groupby(["metric", "source", "target"]).value.agg(["min", "max"])
    m = matrix.set_index(["metric", "source", "target"]).join(spread)
    assert (m["min"] == m.ci_low).all() and (m.ci_high == m["max"]).all()      # 5 resamples: their range
    assert ((m.ci_low <= m.value) & (m.value <= m.ci_high)).all()


def test_mean_over_pairs_has_an_interval_that_holds_it(matrix):
    pairs = [("a1", "b1"), ("b1", "a2")]
    est = findings.mean_over(matrix, pairs, "gfre")
    g = matrix[matrix.metric == "gfre"].set_index(["source", "target"]).value
    assert est.value == pytest.approx(np.mean([g[p] for p in pairs]))
    assert est.has_interval and est.low <= est.value <= est.high      # the split of seed is one of the resamples


def test_percentile_interval_holds_every_resample_when_there_are_few():
    from umlip_latents.metrics import percentile_interval

    assert percentile_interval([0.3, 0.1, 0.2, 0.5]) == (0.1, 0.5)
    lo, hi = percentile_interval(np.arange(1001) / 1000)
    assert lo == pytest.approx(0.025, abs=1e-3) and hi == pytest.approx(0.975, abs=1e-3)


def test_no_resampling_gives_no_interval_and_no_verdict(features):
    m = reconstruction_matrix(features, metric="gfre", test_size=0.25, n_boot=0, device="cpu")
    est = findings.mean_over(m, [("a1", "b1")])
    assert not est.has_interval and "replicates" not in m.attrs
    f = findings.cross_model_findings(m, FAMILIES, VARIANTS)
    assert all("no interval" in x.verdict for x in f)


def test_asymmetry_is_antisymmetric(matrix):
    ab, ba = findings.asymmetry(matrix, "a1", "b1"), findings.asymmetry(matrix, "b1", "a1")
    assert ab.value == pytest.approx(-ba.value)
    assert ab.low == pytest.approx(-ba.high) and ab.high == pytest.approx(-ba.low)
    assert findings.significant(Estimate(0.1, 0.05, 0.2)) and not findings.significant(Estimate(0.1, -0.05, 0.2))
    assert findings.significant(Estimate(0.1)) is None


def test_cross_model_findings_and_sentences_hold_the_computed_numbers(matrix):
    found = findings.cross_model_findings(matrix, FAMILIES, VARIANTS)
    claims = {(f.claim, f.measure) for f in found}
    assert {("cross_architecture", "gfre"), ("cross_architecture", "lfre"), ("size", "gfre")} <= claims
    cross = next(f for f in found if f.claim == "cross_architecture" and f.measure == "gfre")
    pairs = findings.cross_family_pairs(sorted(FAMILIES), FAMILIES)
    assert len(pairs) == 4 and cross.ours.value == pytest.approx(findings.mean_over(matrix, pairs).value)
    lines = findings.cross_model_summary(matrix, FAMILIES, VARIANTS)
    assert f"{cross.ours.value:.2f}" in lines[0] and "4 ordered pairs" in lines[0]
    table = findings.variant_asymmetry(matrix, VARIANTS)
    assert list(table["direction matters"]) in (["yes"], ["no"])
    lfre_line = next(line for line in lines if line.startswith("*LFRE against GFRE*"))
    assert "the paper's k = min" in lfre_line and f"{matrix.attrs['n_train']:,} training atoms" in lfre_line
    d = cross.to_dict()
    assert d["ours"]["text"] == cross.ours.text() and d["paper"]["sources"] and d["why"]


def test_layer_matrix_names_each_models_layers(features):
    first = {"a1": features["a1"], "b1": features["b1"]}
    second = {"a1": features["a1"] @ np.eye(5), "b1": features["b1"][:, :3]}
    lm = findings.layer_matrix(first, second, ("last", "backbone"), metric="gfre", test_size=0.25, n_boot=2,
                               device="cpu")
    assert set(lm.source) == {"a1:last", "a1:backbone", "b1:last", "b1:backbone"}
    assert len({r["source"] for r in lm.attrs["replicates"]}) == 4
    g = lm.set_index(["source", "target"]).value
    assert g[("a1:backbone", "a1:last")] < 1e-6          # an identical copy is rebuilt exactly
    found = findings.cross_model_findings(reconstruction_matrix(features, test_size=0.25, n_boot=2, device="cpu"),
                                          FAMILIES, VARIANTS, lm)
    assert {"last_to_backbone", "backbone_to_last"} <= {f.claim for f in found}


def test_pooling_findings_and_summary():
    from umlip_latents.structure import combine_orders, order_information

    rng = np.random.default_rng(0)
    index = np.repeat(np.arange(60), 5)
    per = {m: order_information(rng.normal(size=(300, 3)), index, max_order=3, test_size=0.25, seed=0,
                                device="cpu", n_boot=3) for m in ("x", "y")}
    info = combine_orders(per)
    assert len(info.attrs["replicates"]) == 2 * 4 * 7 and {"ci_low", "ci_high"} <= set(info.columns)
    step, top = findings.pooling_findings(info)
    assert step.ours.value == pytest.approx(info[info.measure == "k->k+1"].gfre.mean())
    assert step.ours.has_interval and "order 8" in top.detail
    lines = findings.pooling_summary(info, pd.DataFrame({"k": [1, 2], "gain vs mean only": [0.0, 0.05]},
                                                         index=["x", "y"]))
    assert "1 of 2 models" in lines[-1] and "y (order 2, 5.0% lower error)" in lines[-1]


def test_finetune_summary_says_which_models_did_not_learn():
    e, f = "energy RMSE (meV/atom)", "force RMSE (meV/Å)"
    errors = pd.DataFrame({e: [300.0, 60.0, 250.0], f: [900.0, 500.0, 950.0]},
                          index=["zero-shot", "full fine-tune", "heads only"])
    lines = findings.finetune_summary(errors, [])
    assert "20% of zero-shot" in lines[0] and "83% of zero-shot" in lines[0]
    assert lines[1].startswith("*Not every model learned its domain.* heads only did not")
    assert findings.learned(errors) == ["full fine-tune"]
    errors.loc["heads only"] = [90.0, 800.0]
    assert findings.finetune_summary(errors, [])[1].startswith("*Every model learned its domain*")


def test_extraction_summary():
    s = pd.DataFrame({"D": [64, 64, 65], "atoms": [100] * 3, "invariance error": [1e-7, 2e-7, 5e-3],
                      "tolerance": [1e-5, 1e-5, 1e-5], "rotation": ["exact", "approximate", "exact"],
                      "rotation error": [1e-7, 3e-3, 1e-7], "energy re-read error (eV/atom)": [1e-6, 2e-6, 4e-6]},
                     index=["m1", "m2", "m3"])
    lines = findings.extraction_summary(s, 10, 16)
    assert "3 of 10 registered models" in lines[0] and "64-wide: m1 and m2" in lines[0]
    assert "hold* for 2 of 3 models" in lines[1] and "they fail for m3" in lines[1] and "learned by m2" in lines[1]
    assert "worst m3, 4.0e-06" in lines[2]
    lines = findings.extraction_summary(s, 10, 16, {"mp-1": 2}, 5.0)
    assert "1 of 16 structures" in lines[-1] and "mp-1 (2 atoms)" in lines[-1] and "2.00% of all atoms" in lines[-1]
    assert findings.extraction_summary(s, 10, 16, {}, 5.0)[-1].startswith("*No isolated atoms*")


def test_isolated_atoms_finds_atoms_without_neighbours():
    from ase import Atoms

    from umlip_latents.checks import isolated_atoms

    far = Atoms("H3", positions=[[0, 0, 0], [0.7, 0, 0], [9, 0, 0]], cell=[20, 20, 20], pbc=True)
    far.info["structure_id"] = "far"
    close = Atoms("H2", positions=[[0, 0, 0], [0.7, 0, 0]], cell=[3, 3, 3], pbc=True)
    assert isolated_atoms([far, close], 5.0) == {"far": 1}


NOTEBOOK = '''
import json, math
from umlip_latents.findings import glue_findings, glue_value, glue_text, finding
from umlip_latents.paper import Estimate
glue_findings([finding("size", Estimate(0.2, 0.1, 0.3, "n"), "02-cross-model", "Variants of one architecture"),
               finding("cross_architecture", Estimate(math.nan), "02-cross-model", "x", "lfre")])
glue_value("x", 0.123)
glue_text("y", "*a* sentence")
'''


def test_glued_findings_are_read_back_from_an_executed_notebook(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK)]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    glued = findings.read_glued(nb)
    assert glued["x"] == 0.123 and glued["y"] == "*a* sentence"
    assert glued["size_gfre_ours"] == "0.20 (95 % interval 0.10–0.30)"
    got = findings.notebook_findings(nb)
    assert [g["claim"] for g in got] == ["size", "cross_architecture"]
    assert got[1]["ours"]["value"] is None and got[1]["verdict"] == "not measured here"
    json.dumps(got)                                  # plain data, no NaN
    assert not math.isnan(got[0]["paper"]["mean"])


def test_lfre_rules_and_joined_matrices(features):
    from umlip_latents.metrics import local_points

    assert local_points(None, 64, 65) == 64 and local_points("determined", 64, 65) == 130 and local_points(7, 1, 1) == 7
    with pytest.raises(ValueError, match="'determined' or None"):
        reconstruction_matrix(features, metric="lfre", n_local_points="many", device="cpu")
    kw = dict(test_size=0.25, n_boot=2, device="cpu")
    det = reconstruction_matrix(features, metric=["gfre", "lfre"], n_local_points="determined", **kw)
    paper = reconstruction_matrix(features, metric="lfre", **kw)
    both = findings.join_matrices(det, paper, rename={1: {"lfre": "lfre_min_d"}})
    assert set(both.metric) == {"gfre", "lfre", "lfre_min_d"}
    assert {r["metric"] for r in both.attrs["replicates"]} == {"gfre", "lfre", "lfre_min_d"}
    line = findings.lfre_sentences(both)[0]
    assert "k = 2 (D_source + 1)" in line and "min(D_source, D_target)" in line and "of 6 cells exceed 1" in line
    with pytest.raises(ValueError, match="different splits"):
        findings.join_matrices(det, reconstruction_matrix(features, metric="lfre", test_size=0.3, device="cpu"))


def test_lfre_convergence_keeps_one_test_set(features):
    from umlip_latents.comparison import lfre_convergence
    from umlip_latents.features import Block, FeatureSet

    sets = {k: FeatureSet(values=v.astype(np.float32), structure_index=np.repeat([0, 1], 200),
                          species=np.ones(400, dtype=int), blocks=[Block("all", 0, v.shape[1])],
                          structure_ids=["a", "b"]) for k, v in features.items()}
    table = lfre_convergence(sets, [("a1", "b1")], [10, 50, 100, 10_000], test_size=100, stratify=False, device="cpu")
    assert sorted(table.n_train.unique()) == [10, 50, 100, 300]     # 10_000 clipped to the training split
    assert set(table.rule) == {"min(D)", "2(D+1)"}
    assert table[table.n_train == 10].rule.tolist() == ["min(D)"]   # 2(D+1) = 12 neighbours need 12 atoms
    assert table.groupby("n_train").gfre.nunique().eq(1).all()


def test_finetune_findings_do_not_compare_models_that_did_not_learn(features):
    m = reconstruction_matrix({"base": features["a1"], "FF": features["a2"], "bespoke": features["b1"]},
                              metric="gfre", test_size=0.25, n_boot=2, device="cpu")
    found = findings.finetune_findings(m, "base", ["FF"], "bespoke", not_learned=["bespoke"])
    verdicts = {f.claim: f.verdict for f in found}
    assert verdicts["finetuned_to_bespoke"].startswith("not a comparison: bespoke did not learn")
    assert not verdicts["finetuned_to_base"].startswith("not a comparison")


def test_gfrd_is_reported_beside_gfre(features):
    m = reconstruction_matrix(features, metric=["gfre", "gfrd"], test_size=0.25, n_boot=2, device="cpu")
    line = next(x for x in findings.cross_model_summary(m, FAMILIES, VARIANTS) if x.startswith("*Distortion"))
    pairs = findings.cross_family_pairs(sorted(FAMILIES), FAMILIES)
    assert f"{findings.mean_over(m, pairs, 'gfrd').value:.2f}" in line and "one family" in line
