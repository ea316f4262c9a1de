"""The book's generated pages (umlip_latents.book): tables, chapters and a tiny Sphinx build."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nbformat
import pytest
from markdown_it import MarkdownIt

from umlip_latents import benchmark_report, book, paths
from umlip_latents.datasets import registry as dataset_registry
from umlip_latents.registry import load_registry


def table_rows(markdown: str) -> list[list[str]]:
    """Rows (header included) of every table CommonMark + GFM tables parse in ``markdown``."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    rows, row = [], None
    for tok in tokens:
        if tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            rows.append(row)
            row = None
    return rows


def papermill_notebook(parameters: dict, chemiscope: str | None = None):
    """A small notebook shaped like papermill's output (title cell, parameters, a figure)."""
    v4 = nbformat.v4
    cells = [v4.new_markdown_cell("# A title\n\n## Overview\nWhat it shows."),
             v4.new_code_cell("limit = None", metadata={"tags": ["parameters"]}),
             v4.new_code_cell("limit = 16", metadata={"tags": ["injected-parameters"]}),
             v4.new_markdown_cell("## A section\nText."),
             v4.new_code_cell("plot()", outputs=[v4.new_output(
                 "display_data", data={"image/png": _PNG, "text/plain": "<Figure>"})])]
    if chemiscope:
        cells.append(v4.new_code_cell("write()", outputs=[v4.new_output(
            "stream", name="stdout", text=f"written: book/_generated/{chemiscope}\n")]))
    cells.append(v4.new_markdown_cell("## Summary\nDone."))
    nb = v4.new_notebook(cells=cells)
    nb.metadata["papermill"] = {"parameters": parameters, "end_time": "2025-01-02T03:04:05+00:00"}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


# a 1x1 PNG
_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
        "rkJggg==")


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def test_model_table_lists_every_registered_model_with_availability():
    specs = load_registry(derived=False)
    keys = sorted(specs)
    availability = {k: (i % 2 == 0, f"reason {i}") for i, k in enumerate(keys)}
    rows = table_rows(book.models_markdown(specs, availability))
    n = len(keys) + 1
    summary, details = rows[:n], rows[n:]
    assert summary[0] == ["key", "family", "environment", "functional", "available"]
    assert details[0] == ["key", "source", "training data", "availability"]
    assert [r[0].strip("`") for r in summary[1:]] == keys == [r[0].strip("`") for r in details[1:]]
    for i, (r, d) in enumerate(zip(summary[1:], details[1:])):
        spec = specs[keys[i]]
        assert r[1] == spec.family and r[2] == spec.environment
        assert r[4] == ("yes" if i % 2 == 0 else "no")
        assert d[1].startswith(spec.source["kind"] + ":")
        assert d[3] == f"reason {i}"


def test_model_table_without_availability_says_not_checked():
    rows = table_rows(book.models_markdown(load_registry(derived=False)))
    n = len(load_registry(derived=False)) + 1
    assert {r[4] for r in rows[1:n]} == {"not checked"}
    assert {r[3] for r in rows[n + 1:]} == {"not checked"}


def test_cells_with_pipes_dollars_and_newlines_keep_the_table_shape():
    text = book.md_table(["a", "b"], [[book.cell("x | y\nz"), book.cell("$5 <b>")]])
    rows = table_rows(text)
    assert rows == [["a", "b"], ["x | y z", "\\$5 &lt;b>"]]       # one row of two cells; $ stays escaped
    assert book.cell(None) == "–" and book.cell(True) == "yes" and book.cell(0.123456) == "0.1235"
    with pytest.raises(ValueError):
        book.md_table(["a", "b"], [["only one"]])


def test_dataset_table_lists_every_dataset_and_collection():
    reg = dataset_registry()
    md = book.datasets_markdown(reg)
    names = [r[0].strip("`") for r in table_rows(md) if r[0].startswith("`")]
    assert set(reg["datasets"]) | set(reg["collections"]) == set(names)
    assert all(len(r) == len(table_rows(md)[0]) for r in table_rows(md) if len(r) == 5)


def test_benchmark_reports_of_every_shape_render_as_tables():
    reports = {
        "records": {"benchmark": "x", "results": [{"model": "a", "speedup": 2.0}, {"model": "b", "speedup": 3.5}]},
        "by_key": {"dim": 8, "orders": {"2": {"fast_s": 0.1, "slow_s": 1.0}, "4": {"fast_s": 0.2, "slow_s": 3.0}}},
        "nested": {"input": {"kind": "synthetic", "seed": 0},
                   "gfre": {"ours_s": 1.0, "skmatter_s": 9.0, "speedup": 9.0, "dims": [64, 128], "pairs": 4},
                   "deep": {"a": {"b": {"c": 1}}}},
    }
    md = benchmark_report.benchmarks_markdown(reports)
    for title in ("Records", "By key", "Nested"):  # names without a title: underscores as spaces
        assert f"### {title}\n" in md
    rows = table_rows(md)
    assert ["`a`", "2"] == rows[rows.index(["Model", "Speed-up (×)"]) + 1]
    assert ["Cumulant order", "Fast (s)", "Slow (s)"] in rows and ["4", "0.2", "3"] in rows
    assert ["Features per model", "64, 128"] in rows and ["Input features", "kind synthetic, seed 0"] in rows
    assert '"c": 1' in md                     # too deep for a table: a JSON block
    assert "Speed-up over the baseline: 2–3.5 (2 measurements)." in md
    assert "make benchmark" in benchmark_report.benchmarks_markdown({})


def test_reference_benchmarks_shown_apart_from_this_machines():
    ours = {"pooling": {"run": {"cpu": "cpu-of-this-machine"}, "speedup": 5.0}}
    ref = {"pooling": {"run": {"cpu": "cpu-of-the-reference"}, "speedup": 7.0}}
    md = benchmark_report.benchmarks_markdown(ours, ref)
    there, here = md.split("## Measured on the machine that built this site")
    assert "### Cumulant pooling" in here and "cpu-of-this-machine" in here and "cpu-of-the-reference" not in here
    assert "### Cumulant pooling" in there and "cpu-of-the-reference" in there
    only_ref = benchmark_report.benchmarks_markdown({}, ref)
    assert "`make benchmark`" in only_ref and "`make book`" in only_ref and "cpu-of-the-reference" in only_ref
    same = benchmark_report.benchmarks_markdown(ref, ref)  # copied with make benchmark-reference: not repeated
    assert same.count("### Cumulant pooling") == 1 and "The same as the reference measurements: Cumulant pooling" in same


def test_numbers_have_three_significant_digits():
    n = benchmark_report.number
    assert [n(3.789), n(0.0949), n(23641.17), n(139.2), n(2.0), n(1e-6), n(1.6097e-13), n(2_500_000.0)] == \
        ["3.79", "0.0949", "23,600", "139", "2", "10⁻⁶", "1.61 × 10⁻¹³", "2.5 × 10⁶"]
    assert [n(200000), n(True), n(float("nan")), n(999.7)] == ["200,000", "yes", "not a number", "1,000"]


def _synthetic_reports():
    models = {"fam-a": (2.0, 1.0, 3.0, 1e-7), "fam-b": (4.0, 1.2, 5.0, 2e-6), "other": (0.5, 0.9, 0.8, 3e-6)}
    extraction = {"benchmark": "extraction", "baseline": "calculator loop", "run": {"cpu": "cpu-x", "gpu": None},
                  "results": [{"model": m, "structures": 10, "batched_s": 1.0, "workers_s": 1.0 / g,
                               "speedup": s, "speedup_of_batching": b, "workers": 2,
                               "speedup_with_workers": w, "max_energy_diff_eV_per_atom": d}
                              for m, (s, b, w, d), g in zip(models, models.values(), (1.5, 1.25, 1.6))]}
    reconstruction = {"gfre": {"models": 3, "pairs": 9, "atoms": 30, "speedup": 12.34, "max_abs_diff": 1e-9,
                               "max_rel_diff_where_value_gt_1e-6": 2e-7},
                      "lfre": {"models": 3, "pairs": 9, "atoms": 20, "speedup": 56.78, "max_abs_diff": 3e-9,
                               "max_rel_diff_where_value_gt_1e-6": 4e-6}}
    pooling = {"n_structures": 50, "orders": {"2": {"speedup": 7.0, "max_abs_diff": 1e-12, "max_abs_value": 2.0},
                                              "4": {"speedup": 9.5, "max_abs_diff": 3e-10, "max_abs_value": 100.0}}}
    memory = {"atoms": 1000, "models": 2, "dim": 4, "inputs_gb": 2.0, "peak_rss_gb": 5.0, "budget_gb": 4.0,
              "seconds": 3.0, "pairs": 4, "finite": True}
    scaling = {"settings": {"budget_gb": 4.0}, "equality": {"atoms": 200, "max_rel_diff": 1e-15},
               "results": [{"atoms": a, "models": 2, "dims": 4, "seconds": a / 100, "peak_rss_gb": 0.5}
                           for a in (100, 200)]}
    cluster = {"results": {"fam-a": {"structures": 12, "one_process_s": 4.0, "dask_local_2_s": 2.5, "dask_speedup": 1.6,
                                     "forked_speedup": 1.8, "dask_speedup_cold": 0.9, "identical": True},
                           "fam-b": {"structures": 12, "one_process_s": 4.0, "dask_local_2_s": 5.0, "dask_speedup": 0.8,
                                     "identical": False}}}
    small = {"target_speedup": 20.0, "gfre": {"models": 4, "pairs": 16, "atoms": 300, "speedup": 16.04,
                                              "max_abs_diff": 1e-16, "max_rel_diff_where_value_gt_1e-6": 0.0}}
    return {"extraction": extraction, "reconstruction": reconstruction, "pooling": pooling, "memory": memory,
            "scaling": scaling, "cluster_extraction": cluster, "small_panel": small}


def test_summary_numbers_are_recomputed_from_the_report():
    reports = _synthetic_reports()
    ext = benchmark_report.summary("extraction", reports["extraction"])
    # speed-ups by model family (the key's first word), largest first; batching and workers ranges
    assert "by a factor of 2–4 for the 2 fam models and 0.5 for other (a factor below 1" in ext[0]
    assert "a factor of 0.9–1.2 " in ext[1]
    assert "in 2 worker processes adds a factor of 1.25–1.6 " in ext[2] and "3–5 for the 2 fam models" in ext[2]
    assert "3 × 10⁻⁶ eV/atom at worst (other), within the tolerance of 10⁻⁵ eV/atom" in ext[3]
    assert "The best speed-up, 5 (fam-b, with workers), falls short of the design's target of 10." == ext[4]
    rec = benchmark_report.summary("reconstruction", reports["reconstruction"])
    assert "GFRE matrix (3 models, 9 pairs, 30 atoms) is 12.3 times" in rec[0] and "LFRE matrix (3 models, 9 pairs, " \
        "20 atoms) 56.8 times" in rec[0]
    assert "4 × 10⁻⁶ relative (LFRE, 3 × 10⁻⁹ absolute), beyond the tolerance of 10⁻⁶" in rec[1]
    pool = benchmark_report.summary("pooling", reports["pooling"])
    assert "of 50 structures are 7–9.5 times as fast" in pool[0] and "orders 2 and 4" in pool[0]
    assert "3 × 10⁻¹² of the largest value (order 4), within the tolerance" in pool[1]  # 3e-10 / 100
    mem = benchmark_report.summary("memory", reports["memory"])
    assert mem[0].endswith("1,000 atoms × 2 models × 4 features peaks at 5 GB of resident memory, over the 4 GB "
                           "budget (125 % of it).")
    assert "2.5 times the size of the inputs (2 GB)" in mem[1] and "4 pairs took 3 s; every value is finite" in mem[2]
    dask = benchmark_report.summary("cluster_extraction", reports["cluster_extraction"])
    assert dask[0] == ("fam-a: a local Dask cluster of 2 workers extracted 12 structures in 2.5 s against 4 s in one "
                       "process (a factor of 1.6; two forked workers: 1.8); 0.9 with the cluster's start-up and each "
                       "worker loading the model; the entries are byte-identical to the one-process run's.")
    assert dask[1].endswith("(a factor of 0.8); the entries are NOT byte-identical to the one-process run's.")
    small = benchmark_report.summary("small_panel", reports["small_panel"])
    assert "GFRE matrix (4 models, 16 pairs, 300 atoms) is 16 times as fast" in small[0]
    assert small[-1] == "The speed-up, 16, falls short of the design's target of 20 for a small panel."
    md = benchmark_report.benchmarks_markdown({}, reports)
    assert all(line in md for line in ext + rec + pool + mem + dask + small)


def test_reference_summary_quotes_the_committed_reports():
    """The page's sentences about the reference runs follow the committed numbers."""
    root = Path(__file__).resolve().parents[1]
    ref = benchmark_report.read_benchmarks(root / "benchmarks" / "reference")
    span, number = benchmark_report.span, benchmark_report.number
    md = benchmark_report.benchmarks_markdown({}, ref)
    rows = ref["extraction"]["results"]
    for family in {r["model"].split("-")[0] for r in rows}:
        members = [r["speedup"] for r in rows if r["model"].split("-")[0] == family]
        assert f"{span(members)} for " in md, family
    assert f"to {number(max(r['max_energy_diff_eV_per_atom'] for r in rows))} eV/atom at worst" in md
    assert f"{span([o['speedup'] for o in ref['pooling']['orders'].values()])} times as fast" in md
    assert f"is {number(ref['reconstruction']['gfre']['speedup'])} times as fast" in md
    assert f"peaks at {number(ref['memory']['peak_rss_gb'])} GB" in md


@pytest.mark.parametrize("break_it", [
    lambda r: r["extraction"]["results"][0].pop("speedup"),
    lambda r: r["extraction"]["results"][1].update(speedup="n/a", max_energy_diff_eV_per_atom=None),
    lambda r: r["extraction"].update(results="not measured"),
    lambda r: r["reconstruction"]["gfre"].update(speedup=float("nan"), models={"odd": [1, {"x": 2}]}),
    lambda r: r["pooling"].update(orders=[1, 2]),
    lambda r: r["memory"].update(budget_gb=0, inputs_gb="?", run="somewhere"),
    lambda r: r.update(memory=["not", "a", "mapping"]),
])
def test_report_with_a_missing_or_odd_field_still_renders(break_it):
    reports = _synthetic_reports()
    break_it(reports)
    md = benchmark_report.benchmarks_markdown(reports, reports)
    assert all(f"### {t}" in md for t in benchmark_report.TITLES.values())
    assert table_rows(md)


def test_known_report_keys_never_appear_as_raw_headers():
    """Tables name quantities in words with units; no snake_case report key reaches the page."""
    import re

    root = Path(__file__).resolve().parents[1]
    reports = {**_synthetic_reports(), **benchmark_report.read_benchmarks(root / "benchmarks" / "reference")}
    md = benchmark_report.benchmarks_markdown({}, reports)
    rows = table_rows(md)
    assert rows and all(len(row) <= benchmark_report.MAX_COLUMNS for row in rows)
    snake = [k for k in benchmark_report.LABELS if "_" in k]
    assert [k for k in snake if k in md] == []
    assert [c for row in rows for c in row if re.fullmatch(r"[a-z]+(?:_[a-z0-9]+)+", c)] == []
    assert benchmark_report.label("unknown_thing_s") == "Unknown thing (s)"


def test_committed_reference_benchmarks_say_where_they_ran():
    """Every benchmark script has a committed reference report naming its commit and machine."""
    root = Path(__file__).resolve().parents[1]
    reference = benchmark_report.read_benchmarks(root / "benchmarks" / "reference")
    scripts = {p.stem for p in (root / "benchmarks").glob("*.py")}
    assert set(reference) == scripts
    for name, report in reference.items():
        run = report["run"]
        assert run["git_commit"] != "unknown" and run["cpu"] and run["logical_cores"] >= 1, name
        assert benchmark_report.summary(name, report), name  # every committed report gets a summary


def test_performance_page_types_no_measured_number():
    """Measured numbers come from the reports (book/_generated/benchmarks.md), never typed in the page."""
    import re

    page = (Path(__file__).resolve().parents[1] / "book" / "performance.md").read_text()
    measured = re.compile(r"\d\s*(?:x\b|×|%|[kMGT]i?B\b|times\b|s\b)|~\s*\d|\d(?:\.\d+)?e-?\d", re.IGNORECASE)
    assert measured.findall(page) == []
    assert "{include} _generated/benchmarks.md" in page


# ---------------------------------------------------------------------------------------------
# chapters
# ---------------------------------------------------------------------------------------------

def test_params_file_is_found_by_its_values():
    import yaml

    smoke = paths.project_root() / "params" / "smoke.yml"
    values = yaml.safe_load(smoke.read_text())
    assert book.params_file_for(values, smoke.parent) == smoke
    assert book.params_file_for({**values, "limit": -1}, smoke.parent) is None
    # a notebook receives only the parameters it declares: a subset still names its file
    assert book.params_file_for({"limit": values["limit"], "ft_limit": values["ft_limit"]}, smoke.parent) == smoke
    assert book.params_file_for({"limit": values["limit"], "not_a_parameter": 1}, smoke.parent) is None


def test_each_notebook_receives_only_its_declared_parameters(tmp_path):
    import json

    from umlip_latents.notebooks import run_notebook

    nb = {"cells": [{"cell_type": "code", "id": "params", "metadata": {"tags": ["parameters"]}, "execution_count": None,
                     "outputs": [], "source": "limit = 1\nseed = 0"},
                    {"cell_type": "code", "id": "print", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": "print(limit, seed, 'lr' in dir())"}],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    src, params = tmp_path / "nb.ipynb", tmp_path / "p.yml"
    src.write_text(json.dumps(nb))
    params.write_text("limit: 5\nlr: 0.1\n")
    out = json.loads(run_notebook(src, tmp_path / "out.ipynb", params).read_text())
    injected = next(c for c in out["cells"] if "injected-parameters" in c["metadata"].get("tags", []))
    assert "limit = 5" in "".join(injected["source"]) and "lr" not in "".join(injected["source"])
    assert "5 0 False" in "".join(out["cells"][-1]["outputs"][0]["text"])


def test_chapter_names_notebook_and_parameters_and_embeds_chemiscope():
    nb = papermill_notebook({"limit": 16, "dataset": "default"}, chemiscope="chemiscope-x.json.gz")
    before = nbformat.writes(nb)
    out = book.chapter_notebook(nb, "Narrative here.", "notebooks/09-x.ipynb", "params/smoke.yml",
                                {"chemiscope-x.json.gz": "../chemiscope-x.json.gz"})
    assert nbformat.writes(nb) == before                 # the input is not changed
    nbformat.validate(out)
    assert out.cells[0].source.startswith("# A title")
    note = out.cells[1].source
    assert "`notebooks/09-x.ipynb`" in note and "`params/smoke.yml`" in note and "`limit=16`" in note
    assert "Narrative here." in note and "2025-01-02 03:04" in note
    params_cell = next(c for c in out.cells if "parameters" in c.metadata.get("tags", []))
    assert "remove-cell" in params_cell.metadata["tags"]
    i = next(i for i, c in enumerate(out.cells) if c.source == "write()")
    assert out.cells[i + 1].source.startswith("Interactive") and "{chemiscope} ../chemiscope-x.json.gz" in \
        out.cells[i + 1].source
    assert len({c.id for c in out.cells}) == len(out.cells)
    # the same input gives the same chapter (stable ids)
    assert nbformat.writes(book.chapter_notebook(nb, "Narrative here.", "notebooks/09-x.ipynb", "params/smoke.yml",
                                                 {"chemiscope-x.json.gz": "../chemiscope-x.json.gz"})) == \
        nbformat.writes(out)


def test_chapter_without_params_file_or_map_says_so():
    nb = papermill_notebook({"limit": 3}, chemiscope="chemiscope-x.json.gz")
    out = book.chapter_notebook(nb, "", "notebooks/09-x.ipynb")
    assert "no file of `params/`" in out.cells[1].source
    assert not any("{chemiscope}" in c.source for c in out.cells)


def test_remote_scripts_and_local_pako():
    page = ('<script src="https://cdnjs.cloudflare.com/ajax/libs/pako/2.0.4/pako.min.js"></script>'
            '<script src="_static/x.js"></script><script src="//cdn.example/y.js"></script>')
    assert book.remote_scripts(page) == ["https://cdnjs.cloudflare.com/ajax/libs/pako/2.0.4/pako.min.js",
                                         "//cdn.example/y.js"]
    local = book.local_pako(page, "../_static")
    assert '<script src="../_static/pako.min.js">' in local and book.remote_scripts(local) == ["//cdn.example/y.js"]


def fake_node_modules(folder):
    """The files of the mathjax and pako npm packages that :func:`book.stage_static` copies."""
    for part in book.MATHJAX_PARTS:
        p = folder / "mathjax" / "es5" / part
        if part.endswith(".js"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("// mathjax")
        else:
            p.mkdir(parents=True)
            (p / "f.woff").write_text("x")
    (folder / book.PAKO_FILE).parent.mkdir(parents=True)
    (folder / book.PAKO_FILE).write_text("// pako")
    return folder


def test_stage_static_copies_mathjax_and_pako(tmp_path):
    nm = tmp_path / "node_modules"
    with pytest.raises(FileNotFoundError, match="make book-js"):
        book.stage_static(nm, tmp_path / "static")
    fake_node_modules(nm)
    book.stage_static(nm, tmp_path / "static")
    assert (tmp_path / "static" / "mathjax" / "tex-chtml.js").is_file()
    assert (tmp_path / "static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2" / "f.woff").is_file()
    assert (tmp_path / "static" / "pako.min.js").is_file()
    template = tmp_path / "static" / "chemiscope-sphinx.html"
    assert template.is_file() and not book.remote_scripts(template.read_text())


# ---------------------------------------------------------------------------------------------
# a tiny Sphinx build of generated pages (a few seconds)
# ---------------------------------------------------------------------------------------------

def test_tiny_build_renders_tables_math_figure_and_chemiscope_without_remote_scripts(tmp_path):
    pytest.importorskip("myst_nb")
    pytest.importorskip("chemiscope")
    from ase.build import bulk
    from sphinx.application import Sphinx

    import chemiscope

    src = tmp_path / "src"
    (src / "_generated").mkdir(parents=True)
    static = tmp_path / "static"
    book.stage_static(fake_node_modules(tmp_path / "node_modules"), static)
    frames = [bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6)]
    data = chemiscope.create_input(structures=frames, properties={"x": [0.0, 1.0], "y": [1.0, 0.0]})
    with gzip.open(src / "_generated" / "chemiscope-t.json.gz", "wt") as fh:
        json.dump(data, fh)
    (src / "_generated" / "models.md").write_text(book.models_markdown(load_registry(derived=False)))
    (src / "index.md").write_text("# Index\n\n$$\\kappa_4 = \\mu_4 - 3\\mu_2^2$$\n\n"
                                  "```{include} _generated/models.md\n```\n\n```{toctree}\nchapter\n```\n")
    nb = book.chapter_notebook(papermill_notebook({"limit": 16}, chemiscope="chemiscope-t.json.gz"),
                               "Narrative.", "notebooks/09-t.ipynb", None,
                               {"chemiscope-t.json.gz": "_generated/chemiscope-t.json.gz"})
    nbformat.write(nb, src / "chapter.ipynb")
    (src / "conf.py").write_text(
        'extensions = ["myst_nb", "sphinx.ext.mathjax", "umlip_latents.book"]\n'
        'myst_enable_extensions = ["colon_fence", "dollarmath"]\n'
        'nb_execution_mode = "off"\n'
        f'html_static_path = [{str(static)!r}]\n'
        'mathjax_path = "mathjax/tex-chtml.js"\n'
        'exclude_patterns = ["_generated"]\n')
    out = tmp_path / "html"
    app = Sphinx(str(src), str(src), str(out), str(tmp_path / "doctrees"), "html", warningiserror=True,
                 freshenv=True, status=None)
    app.build()
    assert app.statuscode == 0
    index, chapter = (out / "index.html").read_text(), (out / "chapter.html").read_text()
    assert all(f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{k}</span></code>" in index
               for k in load_registry(derived=False))
    assert 'src="_static/mathjax/tex-chtml.js' in index
    assert list((out / "_images").glob("*.png"))
    assert "loadChemiscopeSphinx" in chapter and 'src="_static/pako.min.js"' in chapter
    for page in out.rglob("*.html"):
        assert book.remote_scripts(page.read_text()) == [], page


def test_half_written_benchmark_report_is_named(tmp_path):
    (tmp_path / "good.json").write_text('{"ratio": 2.0}')
    assert benchmark_report.read_benchmarks(tmp_path) == {"good": {"ratio": 2.0}}
    (tmp_path / "partial.json").write_text('{"ratio": 2.')
    with pytest.raises(ValueError, match="partial.json"):
        benchmark_report.read_benchmarks(tmp_path)


def test_scaling_report_summary_and_curves_come_from_its_rows():
    rows = [{"atoms": a, "models": 8, "dims": 256, "seconds": s, "peak_rss_gb": m, "inputs_gb": a * 8 * 256 * 4 / 1e9}
            for a, s, m in ((10_000, 4.0, 0.6), (100_000, 30.0, 0.9), (1_000_000, 280.0, 1.2))]
    report = {"settings": {"budget_gb": 1.0}, "results": rows,
              "equality": {"atoms": 100_000, "max_rel_diff": 3e-15, "memory_seconds": 20.0, "memory_peak_rss_gb": 3.0}}
    lines = benchmark_report.summary("scaling", report)
    assert "took 4 s at 10,000 atoms and 280 s at 1,000,000 (280 µs per atom" in lines[0]
    assert "from 0.6 to 1.2 GB" in lines[1] and "over the 1 GB budget" in lines[1]
    assert "3 × 10⁻¹⁵ relative, within the tolerance of 10⁻⁸" in lines[2]
    svg = benchmark_report.scaling_svg(report)
    assert svg.startswith("<svg") and svg.count("<circle") == 6 and "\n\n" not in svg  # one HTML block
    assert "1,000,000 atoms: 280" in svg and "1,000,000 atoms: 1.2" in svg
    md = benchmark_report.benchmark_markdown("scaling", report)
    assert "**GFRE per size**" in md and "<svg" in md
    report["lfre_results"] = [{"atoms": a, "test_atoms": 200, "seconds": s, "peak_rss_gb": m}
                              for a, s, m in ((10_000, 5.0, 0.5), (1_000_000, 90.0, 1.5))]
    report["lfre_equality"] = {"atoms": 100_000, "max_rel_diff": 2e-7}
    lines = benchmark_report.summary("scaling", report)
    assert lines[3] == ("The streamed LFRE matrix for 200 test atoms took 5 s at 10,000 atoms and 90 s at 1,000,000, "
                        "peaking at 1.5 GB of resident memory (the neighbour search reads every training atom once "
                        "per split).")
    assert lines[4] == "At 100,000 atoms its values equal the in-memory engine's to 2 × 10⁻⁷ relative, beyond the " \
        "tolerance of 10⁻⁸."
    assert "**LFRE per size**" in benchmark_report.benchmark_markdown("scaling", report)
    assert benchmark_report.scaling_svg({"results": rows[:1]}) == ""
