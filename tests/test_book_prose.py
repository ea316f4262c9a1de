"""The book's prose holds no hand-typed measured number; chapters are tidied for reading."""

import re

import nbformat
import pytest

from umlip_latents import book, paths

ROOT = paths.project_root()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
# a measured number: a decimal (0.63, 1.7e-5), a percentage (84 %), a range of decimals (0.6-0.9)
MEASURED = re.compile(r"(?<![\w.])(\d+\.\d+(?:e-?\d+)?|\d+(?:\.\d+)? ?%)")
# what may hold digits: code spans, glue roles and directives, MyST targets, the interval's level,
# version numbers and arXiv identifiers
ALLOWED = [re.compile(p) for p in (r"`[^`]*`", r"\{glue:[a-z]+\}`[^`]*`", r"```\{glue:md\}[^\n]*",
                                   r"\b95 %", r"\bv?\d+\.\d+\.\d+\b", r"arXiv:\d+\.\d+", r"\(mixing 0\.5\)")]


def measured_numbers(text: str) -> list[str]:
    for pattern in ALLOWED:
        text = pattern.sub(" ", text)
    return MEASURED.findall(text)


def prose_of_results_pages():
    for path in sorted((ROOT / "book").glob("results-*.md")):
        yield path.name, path.read_text()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for i, c in enumerate(nb.cells):
            if c.cell_type == "markdown":
                yield f"{path.name} cell {i}", c.source


def test_the_detector_finds_typed_numbers_and_spares_the_rest():
    assert measured_numbers("the mean GFRE is 0.63, 84 % of the pairs, 1.7e-5 eV/atom") == ["0.63", "84 %", "1.7e-5"]
    assert measured_numbers("{glue:text}`gfre_mean:.2f` with a 95 % interval, CHGNet v0.3.0, `n_boot = 5`, "
                            "arXiv:2512.05717") == []


@pytest.mark.parametrize("name,text", list(prose_of_results_pages()), ids=lambda v: v if isinstance(v, str) and
                         len(v) < 60 else "")
def test_results_prose_holds_no_hand_typed_measured_number(name, text):
    found = measured_numbers(text)
    assert not found, f"{name} holds hand-typed numbers {found}: compute and glue them in the notebook"


def test_every_finding_section_is_a_heading_of_its_notebook():
    """The findings chapter links to `section_label(chapter, section)`: the heading must exist."""
    import inspect

    from umlip_latents import findings

    sections = {}
    for fn in (findings.cross_model_findings, findings.finetune_findings, findings.pooling_findings):
        src = inspect.getsource(fn)
        chapter = inspect.signature(fn).parameters["chapter"].default
        named = re.findall(r'chapter, "([^"]+)"', src)
        if "section" in inspect.signature(fn).parameters:
            named.append(inspect.signature(fn).parameters["section"].default)
        sections.setdefault(chapter, set()).update(named)
    for chapter, names in sections.items():
        nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
        headings = {m.group(2) for c in nb.cells if c.cell_type == "markdown"
                    for m in book._HEADING.finditer(c.source)}
        assert names and names <= headings, f"{chapter}: sections {names - headings} are not headings"


def _cell(source, outputs, tags=()):
    c = nbformat.v4.new_code_cell(source)
    c.outputs = [nbformat.NotebookNode(o) for o in outputs]
    c.metadata["tags"] = list(tags)
    return c


def test_tidy_outputs_collapses_code_and_long_tables_and_moves_stderr():
    nb = nbformat.v4.new_notebook()
    long_table = "<table>" + "<tr><td>1</td></tr>" * 40 + "</table>"
    nb.cells = [
        _cell("import x", []),
        _cell("run()", [{"output_type": "stream", "name": "stderr", "text": "UserWarning: careful\n"},
                        {"output_type": "stream", "name": "stdout", "text": "   \n"},
                        {"output_type": "stream", "name": "stdout", "text": "7 models\n"}]),
        _cell("table", [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                         "data": {"text/html": long_table, "text/plain": "t"}}]),
        _cell("# NBVAL_CHECK_OUTPUT\nprint(1)", [], tags=["hide-cell"]),
        _cell("models", [], tags=["hide-output"]),
    ]
    log = book.tidy_outputs(nb)
    assert log == [("run()", "UserWarning: careful")]
    assert [o["text"] for o in nb.cells[1].outputs] == ["7 models\n"]
    assert nb.cells[0].metadata.tags == ["hide-input"]
    assert nb.cells[2].metadata.tags == ["hide-cell"]
    assert nb.cells[3].metadata.tags == ["hide-cell"] and nb.cells[4].metadata.tags == ["hide-cell"]
    text = book.messages_markdown(log)
    assert ":class: dropdown" in text and "UserWarning: careful" in text and "`run()`" in text


def test_sections_get_labels_the_findings_chapter_can_reference():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title\n\n## GFRE and LFRE between every pair\ntext\n### A, b!")]
    book.label_sections(nb, "02-cross-model")
    src = nb.cells[0].source
    assert "(sec-02-cross-model-gfre-and-lfre-between-every-pair)=\n## GFRE" in src
    assert "(sec-02-cross-model-a-b)=\n### A, b!" in src and src.startswith("# Title")


def test_findings_pages_list_every_claim_with_its_verdict():
    found = [{"claim": "size", "title": "Size variants", "measure": "gfre", "chapter": "02-cross-model",
              "section": "Variants of one architecture", "detail": "mean over a/b", "why": "a size change",
              "ours": {"text": "0.20 [0.10, 0.30]", "n": "10 train / 5 test"},
              "paper": {"text": "0.15 (pairs 0.01–0.28, n = 18)", "sources": ["repo: f.json @ abc"]},
              "verdict": "inside the paper's range"}]
    page = book.findings_markdown(found)
    assert "{ref}`Size variants <sec-02-cross-model-variants-of-one-architecture>`" in page
    assert "inside the paper's range" in page and "a size change" in page and "`repo: f.json @ abc`" in page
    box = book.findings_box_markdown(found)
    assert "What this run found" in box and "0.20 [0.10, 0.30]" in box and "{doc}`/book/_generated/findings`" in box
