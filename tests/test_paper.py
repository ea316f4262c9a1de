"""The paper's results as data (umlip_latents.paper): generated from the reference file, summarised
as the reference's own derived numbers say, matched to our claims, and the verdict logic."""

import math

import pytest

from umlip_latents import paper
from umlip_latents.paper import Estimate, PaperStat, paper_stat, select_pairs, verdict

REFERENCE = paper.default_reference()


def reference_data():
    return paper._parsed(REFERENCE)


needs_reference = pytest.mark.skipif(not REFERENCE.is_file(), reason=f"no paper reference file at {REFERENCE}")


@needs_reference
def test_data_paper_yml_is_generated_from_the_reference(tmp_path):
    out = paper.write(REFERENCE, tmp_path / "paper.yml")
    assert out.read_text() == paper.paper_file().read_text(), \
        "data/paper.yml is stale: run `python -m umlip_latents.paper`"


@needs_reference
def test_every_result_names_its_source_file():
    results = paper.load()["results"]
    assert len(results) >= 40
    for name, entry in results.items():
        src = entry["source"]
        assert src["repo"] and src["path"].startswith("results/") and len(src["commit"]) == 40, name
        assert name.endswith("_" + entry["measure"])


def _check(stat_pairs, summary):
    values = [v for *_, v in stat_pairs]
    assert len(values) == summary["n_pairs"]
    assert math.isclose(sum(values) / len(values), summary["mean"], abs_tol=2e-4)
    assert math.isclose(min(values), summary["min"]["value"], abs_tol=1e-9)
    assert math.isclose(max(values), summary["max"]["value"], abs_tol=1e-9)


@needs_reference
@pytest.mark.parametrize("key,result", [
    ("mace_sizes_mp0a_mad", "variants_mace_sizes_mp0a_mad_last"),
    ("mace_sizes_off23_organic", "variants_mace_sizes_off23_organic_last"),
    ("mace_training_sets_mad", "variants_mace_datasets_mad_last"),
    ("pet_sizes_omat_mad", "variants_pet_sizes_omat_mad_last"),
    ("pet_training_sets_mad", "variants_pet_datasets_mad_last"),
    ("dpa_heads_mad", "variants_dpa_heads_mad_last"),
    ("uma_tasks_mad", "variants_uma_tasks_mad_last"),
])
@pytest.mark.parametrize("measure", ["gfre", "lfre"])
def test_our_pair_statistics_equal_the_references_summary(key, result, measure):
    """The reference file's `summary` block was derived independently from the same matrices."""
    summary = reference_data()["summary"]["variant_families"][key][measure]
    _check(select_pairs(f"{result}_{measure}"), summary)


@needs_reference
@pytest.mark.parametrize("measure", ["gfre", "lfre"])
def test_cross_architecture_and_layer_statistics_equal_the_references_summary(measure):
    ref = reference_data()["summary"]
    _check(select_pairs(f"cross_model_mad_last_{measure}"), ref["cross_architecture"]["mad_last"][measure])
    _check(select_pairs(f"cross_model_salexandria_last_{measure}"),
           ref["cross_architecture"]["salexandria_last"][measure])
    for family in ("pet", "uma"):
        block = ref["last_layer_vs_backbone"][family][measure]
        _check(select_pairs(f"ll_vs_bb_{family}_mad_{measure}", ["*_LL"], ["*_BB"], True), block["ll_to_bb"])
        _check(select_pairs(f"ll_vs_bb_{family}_mad_{measure}", ["*_BB"], ["*_LL"], True), block["bb_to_ll"])
    ft = ref["fine_tuning"][measure]
    for claim in ("base_to_finetuned", "finetuned_to_base", "finetuned_to_bespoke", "bespoke_to_finetuned"):
        stat = paper_stat(claim, measure)
        _check([p[1:] for p in stat.pairs], ft[claim])
    steps = ref["cumulants_petmad"][measure]["k_to_k_plus_1"]
    stat = paper_stat("cumulant_step", measure)
    assert [round(v, 4) for v in stat.values] == [round(v, 4) for v in steps.values()]
    assert paper_stat("cumulant_mean_to_top", measure).mean == ref["cumulants_petmad"][measure]["1_to_8"]


def test_every_claim_selects_pairs_of_both_measures_and_says_why():
    matches = paper.load_matches()
    assert {"cross_architecture", "size", "training_set", "last_to_backbone", "finetuned_to_base",
            "cumulant_step"} <= set(matches)
    for claim, entry in matches.items():
        assert entry["why"] and entry["ours"] and entry["paper"], claim
        for measure in ("gfre", "lfre"):
            stat = paper_stat(claim, measure)
            assert stat.n_pairs >= 1 and stat.sources
            assert all(s != t for _, s, t, _ in stat.pairs)


def test_size_variants_pool_both_families():
    """The paper's size variants are MACE-MP-0a (3 sizes) and PET-OMat (4 sizes), not one of them."""
    stat = paper_stat("size", "gfre")
    assert {r for r, *_ in stat.pairs} == {"variants_pet_sizes_omat_mad_last", "variants_mace_sizes_mp0a_mad_last"}
    assert stat.n_pairs == 4 * 3 + 3 * 2


def test_unknown_names_fail_clearly():
    with pytest.raises(KeyError, match="no paper result"):
        paper.result("nope_gfre")
    with pytest.raises(KeyError, match="no paper match"):
        paper_stat("nope")
    with pytest.raises(KeyError, match="has no pairs"):
        select_pairs("cumulants_petmad_orders_mad_gfre", pairs=[["1_cumulant", "9_cumulant"]])


STAT = PaperStat("gfre", (("r", "a", "b", 0.2), ("r", "b", "a", 0.4)), ("src",))


@pytest.mark.parametrize("ours,expected", [
    (Estimate(0.5, 0.45, 0.55), "above the paper's range; our interval above the paper's mean"),
    (Estimate(0.1, 0.05, 0.15), "below the paper's range; our interval below the paper's mean"),
    (Estimate(0.3, 0.25, 0.35), "inside the paper's range; our interval holds the paper's mean"),
    (Estimate(0.38, 0.35, 0.45), "overlaps the edge of the paper's range; our interval above the paper's mean"),
    (Estimate(0.3), "no interval (run with n_boot > 0): not a comparison"),
    (Estimate(math.nan), "not measured here"),
])
def test_verdict_places_our_interval_against_the_papers_pairs(ours, expected):
    assert verdict(ours, STAT) == expected
    assert STAT.mean == pytest.approx(0.3) and STAT.text() == "0.30 (pairs 0.20–0.40, n = 2)"


def test_regenerating_needs_the_reference_blocks(tmp_path):
    bad = tmp_path / "results.yml"
    bad.write_text("results: {}\n")
    with pytest.raises(ValueError, match="lacks the blocks"):
        paper.write(bad, tmp_path / "out.yml")
    assert not (tmp_path / "out.yml").exists()


def test_tidy_matrix_feeds_the_heatmaps():
    from umlip_latents.plotting import matrix_heatmap

    table = paper.tidy("cross_model_mad_last")
    assert set(table.metric) == {"gfre", "lfre"} and len(table) == 2 * 16
    g = table[table.metric == "gfre"].set_index(["source", "target"]).value
    assert g[("PETMAD", "MACE")] == paper.result("cross_model_mad_last_gfre")["matrix"]["PETMAD"]["MACE"]
    ax = matrix_heatmap(table, "gfre")
    assert len(ax.texts) >= 16
    with pytest.raises(KeyError):
        paper.tidy("nope")
