"""The jupyter-book site: generated pages and a small Sphinx extension.

Everything the book shows that comes from data is generated here into ``book/_generated/``
(ignored by git), so no page is edited by hand to follow the registries or a run:

- ``models.md`` — the model registry (``models/*.yml``) with availability on the building machine;
- ``datasets.md`` — the dataset registry (``data/datasets.yml``);
- ``benchmarks.md`` — the benchmark reports (:mod:`umlip_latents.benchmark_report`);
- ``findings.md`` and ``findings-box.md`` — the findings chapter and the intro page's box, from
  the findings the executed notebooks glued (:mod:`umlip_latents.findings`);
- ``results/NN-slug.ipynb`` — one chapter per executed notebook: the papermill output with a
  note naming the notebook and its parameters, the narrative of ``book/results-NN-slug.md``
  and, where the notebook wrote a chemiscope file into ``book/_generated``, the interactive map;
- ``_static/`` — local copies of MathJax and pako, so the site loads no script from a CDN.

The ``*_markdown`` functions and :func:`chapter_notebook` are pure (they return strings or a
new notebook); :func:`write_generated` writes the files. As a Sphinx extension (listed in
``_config.yml``) this module makes chemiscope's widget load pako from ``_static`` and fails
the build (a warning, an error under ``-W``) when a page loads a script over http(s).

Run ``python -m umlip_latents.book --notebooks DIR`` to write the generated pages.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from . import benchmark_report, paths

#: Executed notebooks become chapters under this folder of ``book/_generated``.
RESULTS_DIR = "results"
#: Files of the ``mathjax`` npm package (``es5/``) the site needs: the TeX-to-CHTML bundle,
#: its fonts, autoloaded TeX extensions, the menu and accessibility parts it loads lazily.
MATHJAX_PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y", "sre")
#: The pako build chemiscope's Sphinx widget uses to read ``.json.gz`` datasets.
PAKO_FILE = "pako/dist/pako.min.js"
_PAKO_CDN = re.compile(r'src="https?://[^"]*/pako(?:\.min)?\.js"')
_REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="((?:https?:)?//[^"]+)"', re.IGNORECASE)
_CHEMISCOPE_FILE = re.compile(r"chemiscope-[\w.-]+?\.json(?:\.gz)?")


# ---------------------------------------------------------------------------------------------
# Markdown helpers
# ---------------------------------------------------------------------------------------------

def cell(value) -> str:
    """One value as the text of a Markdown table cell (pipes, dollars and newlines escaped)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("$", "\\$").replace("<", "&lt;")


def code(value) -> str:
    """``value`` as an inline code span (safe in a table cell)."""
    text = str(value).replace("|", "\\|")
    return f"``{text}``" if "`" in text else f"`{text}`"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table; cells must already be Markdown (see :func:`cell`)."""
    if not rows:
        raise ValueError("a table needs at least one row")
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per column")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------

def source_text(source: Mapping) -> str:
    """Where a model's weights come from, in one short line of Markdown."""
    kind = source["kind"]
    if kind == "wheel":
        return f"wheel: {cell(source['package'])} {code(source['name'])}"
    if kind == "loader":
        return f"loader: {cell(source['package'])} {code(source['name'])}, file {code(source['filename'])}"
    return f"local: {code(source['path'])}"


def models_markdown(specs: Mapping, availability: Mapping[str, tuple[bool, str]] | None = None) -> str:
    """The model table: one row per registered model.

    Parameters
    ----------
    specs : mapping of key to :class:`umlip_latents.registry.ModelSpec`
        As returned by :func:`umlip_latents.registry.load_registry`.
    availability : mapping of key to ``(available, reason)``, optional
        As in ``umlip_latents.extract.models_table`` (``available``, ``why``). Models missing
        from it (or all, when it is ``None``) are marked "not checked".
    """
    availability = availability or {}
    summary, details = [], []
    for key in sorted(specs):
        spec = specs[key]
        ok, why = availability.get(key, (None, "not checked"))
        avail = "not checked" if ok is None else ("yes" if ok else "no")
        summary.append([code(key), cell(spec.family), cell(spec.environment), cell(spec.functional), avail])
        details.append([code(key), source_text(spec.source), cell(spec.training_data),
                        cell(why) if ok is not None else "not checked"])
    # two narrow tables instead of one seven-column table that overflows the page
    return (md_table(["key", "family", "environment", "functional", "available"], summary)
            + "\n\nWhere the weights and the training data come from, and why a model is or is not "
              "available on the machine that built this page:\n\n"
            + md_table(["key", "source", "training data", "availability"], details))


def datasets_markdown(registry: Mapping) -> str:
    """Tables of the datasets and collections of ``data/datasets.yml`` (as parsed)."""
    archives = registry.get("archives", {})
    rows = []
    for name in sorted(registry["datasets"]):
        d = registry["datasets"][name]
        if "archive" in d:
            arch = archives.get(d["archive"], {})
            origin = f"{code(d['member'])} in {code(arch.get('filename', d['archive']))}"
            if arch.get("kind") == "pypi-sdist":
                origin += f" (PyPI {cell(arch['package'])}=={cell(arch['version'])})"
        elif "path" in d:
            origin = code(d["path"])
        else:
            origin = code(d.get("source", "?"))
        sha = code(d["sha256"][:12] + "…") if d.get("sha256") else "–"
        rows.append([code(name), cell(d.get("description", "")), origin, cell(d.get("functional")), sha])
    out = md_table(["name", "description", "file", "functional", "sha256"], rows)
    coll = registry.get("collections") or {}
    if coll:
        crow = [[code(n), ", ".join(code(m) for m in c["members"]), cell(bool(c.get("drop_single_atom", False)))]
                for n, c in sorted(coll.items())]
        out += "\nCollections (a collection's limit is split evenly between its members):\n\n"
        out += md_table(["collection", "members", "drops single atoms"], crow)
    return out


# ---------------------------------------------------------------------------------------------
# results chapters
# ---------------------------------------------------------------------------------------------

def params_file_for(parameters: Mapping, params_dir: str | Path) -> Path | None:
    """The ``params/*.yml`` file that holds exactly these values for these parameters, if one does.

    A notebook receives only the parameters it declares, so the file may hold more.
    """
    import yaml

    for path in sorted(Path(params_dir).glob("*.yml")):
        values = yaml.safe_load(path.read_text()) or {}
        if parameters and all(k in values and values[k] == v for k, v in parameters.items()):
            return path
    return None


def provenance_note(notebook: str, parameters: Mapping, params_file: str | None, end_time: str | None) -> str:
    """The note opening a results chapter: which notebook and which parameters made it."""
    values = ", ".join(f"`{k}={v!r}`" for k, v in parameters.items()) or "its defaults"
    made = (f"the parameters of `{params_file}` ({values})" if params_file
            else f"the parameters {values} (no file of `params/` holds exactly these)")
    when = f", run finished {end_time[:16].replace('T', ' ')} UTC" if end_time else ""
    return (":::{admonition} How this chapter was made\n:class: note\n"
            f"This page is `{notebook}` executed by papermill with {made}{when}. "
            "The book shows the executed notebook and does not run it again: "
            "`make book PARAMS=params/<set>.yml` reruns it.\n:::\n")


def chemiscope_markdown(relative_path: str) -> str:
    """A MyST block embedding a chemiscope dataset (path relative to the page's folder)."""
    return ("Interactive version of the map (chemiscope; hover a point to see its structure):\n\n"
            f"```{{chemiscope}} {relative_path}\n:mode: default\n```\n")


def chemiscope_files(nb) -> list[tuple[int, str]]:
    """``(cell index, file name)`` of each chemiscope file a notebook's code cells print or name.

    The index is that of the first cell whose outputs name the file (else whose source does).
    """
    found: dict[str, int] = {}
    for pass_outputs in (True, False):
        for i, c in enumerate(nb.cells):
            if c.cell_type != "code":
                continue
            if pass_outputs:
                text = " ".join(o.get("text", "") if isinstance(o.get("text", ""), str) else ""
                                for o in c.get("outputs", []))
            else:
                text = c.source
            for name in _CHEMISCOPE_FILE.findall(text):
                found.setdefault(name, i)
    return sorted(((i, n) for n, i in found.items()))


def chapter_notebook(nb, narrative: str, notebook: str, params_file: str | None = None,
                     chemiscope: Mapping[str, str] | None = None):
    """A results chapter: a copy of an executed notebook with the book's additions.

    Parameters
    ----------
    nb : nbformat.NotebookNode
        The notebook as papermill wrote it (parameters in ``metadata.papermill``).
    narrative : str
        Markdown shown after the notebook's first cell (its title and overview).
    notebook : str
        The source notebook's path, as the note names it.
    params_file : str, optional
        The ``params/*.yml`` file the parameters came from.
    chemiscope : mapping of file name to path relative to the chapter, optional
        Chemiscope datasets to embed after the cell that wrote each (see :func:`chemiscope_files`).

    Returns a new notebook: the parameters cell with the notebook's defaults is removed from
    the page (papermill's injected cell shows what ran), the note and the narrative follow the
    first cell, the chemiscope maps follow their cells. The page is tidied for reading (see
    :func:`tidy_outputs`): code is collapsed, long tables are collapsed, empty outputs are
    dropped and what libraries printed to stderr is moved into one collapsed block at the end;
    every ``##``/``###`` heading gets a label :func:`section_label` for the findings chapter.
    """
    import nbformat

    nb = copy.deepcopy(nb)
    meta = nb.metadata.get("papermill", {})
    for c in nb.cells:
        tags = c.get("metadata", {}).get("tags", [])
        if "parameters" in tags and "remove-cell" not in tags:
            c.metadata["tags"] = [*tags, "remove-cell"]
    log = tidy_outputs(nb)
    label_sections(nb, Path(notebook).stem)
    if log:
        end = nbformat.v4.new_markdown_cell(messages_markdown(log))
        if nb.nbformat_minor >= 5:
            end["id"] = "book-messages"
        else:
            end.pop("id", None)
        nb.cells.append(end)
    inserts = []
    for index, name in chemiscope_files(nb):
        if chemiscope and name in chemiscope:
            inserts.append((index + 1, chemiscope_markdown(chemiscope[name])))
    text = provenance_note(notebook, meta.get("parameters", {}), params_file, meta.get("end_time"))
    inserts.append((1, text + ("\n" + narrative.strip() + "\n" if narrative.strip() else "")))
    for n, (index, source) in enumerate(sorted(inserts, key=lambda t: t[0], reverse=True)):
        new = nbformat.v4.new_markdown_cell(source)
        if nb.nbformat_minor >= 5:
            new["id"] = f"book-{n}"      # stable ids: a rebuild writes the same chapter
        else:
            new.pop("id", None)
        nb.cells.insert(index, new)
    return nb


#: A table output with more rows than this is collapsed on the page.
LONG_TABLE_ROWS = 15
_HEADING = re.compile(r"^(#{2,3}) +(.+?) *$", re.MULTILINE)


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _first_code_line(source: str) -> str:
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[0].strip()[:70] if lines else ""


def tidy_outputs(nb) -> list[tuple[str, str]]:
    """Tidy a notebook for the page, in place; return what was printed to stderr.

    - every code cell's input is collapsed (tag ``hide-input``) unless a tag already decides;
    - a cell whose output is a table of more than :data:`LONG_TABLE_ROWS` rows, or a text dump of
      as many lines, is collapsed with its code (``hide-cell``), as is a cell tagged ``hide-output``;
    - empty stream outputs are dropped;
    - stderr streams (library warnings and progress messages) are removed from their cells and
      returned as ``(first code line of the cell, text)``, for :func:`messages_markdown`.
    """
    log = []
    decided = {"hide-input", "hide-cell", "remove-input", "remove-cell", "hide-output"}
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        tags = list(c.get("metadata", {}).get("tags", []))
        kept, long = [], False
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                text = _text(o.get("text"))
                if o.get("name") == "stderr":
                    if text.strip():
                        log.append((_first_code_line(c.source), text.rstrip()))
                    continue
                if not text.strip():
                    continue
                long |= text.count("\n") > LONG_TABLE_ROWS
            html = _text(o.get("data", {}).get("text/html", ""))
            long |= html.count("<tr") > LONG_TABLE_ROWS + 1
            kept.append(o)
        c.outputs = kept
        if long and not decided & set(tags):
            tags.append("hide-output")
        if "hide-output" in tags and not {"hide-input", "remove-input"} & set(tags):
            tags = [t for t in tags if t != "hide-output"] + ["hide-cell"]   # one toggle for code and output
        if not decided & set(tags):
            tags.append("hide-input")
        c.metadata["tags"] = tags
    return log


def messages_markdown(log: list[tuple[str, str]]) -> str:
    """One collapsed block holding what the notebook's code printed to stderr, by cell."""
    parts = [f":::{{admonition}} Messages printed to stderr while this page ran ({len(log)})\n:class: dropdown\n",
             "Warnings and progress messages of the libraries, moved here from their cells so the page "
             "reads without them; what they mean for the results is discussed in the text where it matters.\n"]
    for where, text in log:
        parts.append(f"From the cell starting `{where.replace('`', '')}`:\n\n````text\n{text}\n````\n")
    return "\n".join(parts) + ":::\n"


def slug(text: str) -> str:
    """A heading as an anchor-safe slug: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def section_label(chapter: str, heading: str) -> str:
    """The label of a chapter's section (what the findings chapter links to with ``{ref}``)."""
    return f"sec-{slug(chapter)}-{slug(heading)}"


def label_sections(nb, chapter: str) -> None:
    """Put a MyST target ``(label)=`` before every ``##``/``###`` heading of the notebook, in place."""
    for c in nb.cells:
        if c.cell_type == "markdown":
            c.source = _HEADING.sub(lambda m: f"({section_label(chapter, m.group(2))})=\n{m.group(0)}", c.source)


def narrative_path(book_dir: str | Path, notebook: str | Path) -> Path:
    """``book/results-<notebook stem>.md``: the hand-written narrative of a chapter."""
    return Path(book_dir) / f"results-{Path(notebook).stem}.md"


# ---------------------------------------------------------------------------------------------
# findings
# ---------------------------------------------------------------------------------------------

def _verdict_cell(f: Mapping) -> str:
    return cell(f["verdict"])


def _measure(f: Mapping) -> str:
    return f.get("measure_label") or f["measure"].upper()


def findings_markdown(found: list[Mapping]) -> str:
    """The findings chapter: one row per claim, from the findings the executed notebooks glued.

    ``found`` holds :meth:`umlip_latents.paper.Finding.to_dict` records (as read back by
    :func:`umlip_latents.findings.notebook_findings`); every number on the page is theirs.
    """
    from .paper import REPOSITORY as paper_repository

    out = ["# Findings\n",
           "Each of the paper's claims, set beside what the run that built this site measured. *Ours* is the "
           "estimate with its 95 % interval over re-drawn train/test splits and the data it rests on; *paper* is "
           "the matching experiment of arXiv:2512.05717, pooled over the pairs `data/paper-matches.yml` selects "
           "(mean, and the range of its pairs), read from the result files of the paper's repository "
           f"[{paper_repository}](https://github.com/{paper_repository}) (`results/reconstruction_errors/`, "
           "named with their commit below). The verdict is computed: it places our interval against the range "
           "of the paper's pairs, and no verdict is drawn from a number without an interval. Each claim links to "
           "the section of the chapter that shows it.\n"]
    if not found:
        return "\n".join(out + ["The executed notebooks glued no findings.\n"])
    rows = [[f"{{ref}}`{cell(f['title'])} <{section_label(f['chapter'], f['section'])}>`", cell(_measure(f)),
             cell(f["ours"]["text"]), cell(f["paper"]["text"] if f.get("paper") else "–"), _verdict_cell(f)]
            for f in found]
    out.append(md_table(["claim", "measure", "ours (95 % interval)", "paper", "verdict"], rows))
    out.append("\n## What each comparison rests on\n")
    seen = set()
    for f in found:
        if (f["claim"], f["measure"]) in seen:
            continue
        seen.add((f["claim"], f["measure"]))
        paper = f.get("paper") or {}
        sources = "; ".join(code(s) for s in paper.get("sources", [])) or "–"
        out.append(f"- **{cell(f['title'])}** ({cell(_measure(f))}). Ours: {cell(f['detail'])}; "
                   f"{cell(f['ours']['n'])}. Matched to the paper because of {cell(f.get('why') or '–')}. "
                   f"Paper files: {sources}.")
    return "\n".join(out) + "\n"


def findings_box_markdown(found: list[Mapping], limit: int = 6) -> str:
    """The box on the intro page: the first claims of each kind and their verdicts, linking on."""
    lines = [":::{admonition} What this run found\n:class: tip\n"]
    if not found:
        lines.append("The executed notebooks glued no findings; see {doc}`/book/_generated/findings`.\n")
        return "\n".join(lines) + ":::\n"
    seen, shown = set(), []
    for f in found:
        if f["claim"] in seen:
            continue
        seen.add(f["claim"])
        shown.append(f)
    for f in shown[:limit]:
        paper = f" (paper: {cell(f['paper']['text'])})" if f.get("paper") else ""
        lines.append(f"- **{cell(f['title'])}**, {cell(_measure(f))}: ours {cell(f['ours']['text'])}"
                     f"{paper}: {_verdict_cell(f)}.")
    more = len(shown) - min(limit, len(shown))
    lines.append(f"\nEvery claim{f' ({more} more)' if more else ''}, with the data and the paper's files behind it: "
                 "{doc}`/book/_generated/findings`.\n")
    return "\n".join(lines) + ":::\n"


# ---------------------------------------------------------------------------------------------
# static files and the writer
# ---------------------------------------------------------------------------------------------

def stage_static(node_modules: str | Path, dest: str | Path) -> list[Path]:
    """Copy MathJax (the parts in :data:`MATHJAX_PARTS`) and pako into ``dest``.

    ``node_modules`` is where ``npm install mathjax@3 pako@2`` put them. Returns the copied
    top-level paths; raises ``FileNotFoundError`` naming what is missing.
    """
    node_modules, dest = Path(node_modules), Path(dest)
    sources = [(node_modules / "mathjax" / "es5" / p, dest / "mathjax" / p) for p in MATHJAX_PARTS]
    sources.append((node_modules / PAKO_FILE, dest / "pako.min.js"))
    missing = [str(s) for s, _ in sources if not s.exists()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}: run `make book-js` (npm install mathjax pako)")
    if dest.exists():
        shutil.rmtree(dest)
    for src, out in sources:
        out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out)
    out = [o for _, o in sources]
    try:        # chemiscope copies its HTML template into _static too: ship one without the CDN
        from chemiscope.sphinx import _nodes
    except ImportError:
        return out
    template = Path(_nodes.__file__).parent / "static" / "chemiscope-sphinx.html"
    (dest / template.name).write_text(local_pako(template.read_text(), "{{static_path}}"))
    return [*out, dest / template.name]


def write_generated(notebooks_dir: str | Path, book_dir: str | Path | None = None,
                    node_modules: str | Path | None = None, check_availability: bool = True) -> list[Path]:
    """Write every generated part of the book into ``<book_dir>/_generated``; return the files.

    Parameters
    ----------
    notebooks_dir : path
        Folder of executed notebooks (``NN-*.ipynb``), e.g. what ``umlip-latents notebooks
        --out DIR`` wrote, or ``notebooks/`` for the committed smoke runs.
    book_dir : path, optional
        The ``book/`` folder (default: the project's).
    node_modules : path, optional
        Where npm installed mathjax and pako; without it ``_static`` is left as it is.
    check_availability : bool
        Load each model's adapter to report availability (takes seconds; else "not checked").
    """
    import nbformat

    from .datasets import registry as dataset_registry
    from .findings import notebook_findings
    from .registry import load_registry

    root = paths.project_root()
    book_dir = Path(book_dir) if book_dir else root / "book"
    gen = book_dir / "_generated"
    gen.mkdir(parents=True, exist_ok=True)
    written = []

    availability = None
    if check_availability:
        from .extract import models_table

        availability = {r["key"]: (r["available"], r["why"]) for r in models_table()}
    pages = {"models.md": models_markdown(load_registry(derived=False), availability),
             "datasets.md": datasets_markdown(dataset_registry()),
             "benchmarks.md": benchmark_report.benchmarks_markdown(
                 benchmark_report.read_benchmarks(root / "benchmarks" / "results"),
                 benchmark_report.read_benchmarks(root / "benchmarks" / "reference"))}
    for name, text in pages.items():
        (gen / name).write_text(text)
        written.append(gen / name)

    results = gen / RESULTS_DIR
    if results.exists():
        shutil.rmtree(results)
    results.mkdir()
    executed = sorted(Path(notebooks_dir).glob("[0-9][0-9]-*.ipynb"))
    if not executed:
        raise FileNotFoundError(f"no executed notebooks (NN-*.ipynb) in {notebooks_dir}")
    found = []
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        meta = nb.metadata.get("papermill")
        if not meta:
            raise ValueError(f"{path} was not executed by papermill (no metadata.papermill)")
        found += notebook_findings(nb)
        pfile = params_file_for(meta.get("parameters", {}), root / "params")
        narrative = narrative_path(book_dir, path)
        maps = {name: f"../{name}" for _, name in chemiscope_files(nb) if (gen / name).is_file()}
        chapter = chapter_notebook(nb, narrative.read_text() if narrative.is_file() else "",
                                   f"notebooks/{path.name}",
                                   str(pfile.relative_to(root)) if pfile else None, maps)
        nbformat.write(chapter, results / path.name)
        written.append(results / path.name)

    for name, text in (("findings.md", findings_markdown(found)), ("findings-box.md", findings_box_markdown(found))):
        (gen / name).write_text(text)
        written.append(gen / name)

    if node_modules:
        stage_static(node_modules, gen / "_static")
        written.append(gen / "_static")
    return written


# ---------------------------------------------------------------------------------------------
# Sphinx extension
# ---------------------------------------------------------------------------------------------

def remote_scripts(html: str) -> list[str]:
    """URLs of the ``<script src=...>`` tags of a page that load over the network."""
    return _REMOTE_SCRIPT.findall(html)


def local_pako(html: str, static_path: str) -> str:
    """``html`` with a ``<script>`` loading pako from a CDN pointed at ``<static_path>/pako.min.js``."""
    return _PAKO_CDN.sub(f'src="{static_path}/pako.min.js"', html)


def _visit_chemiscope_html(self, node):
    import os

    from chemiscope.sphinx._nodes import visit_chemiscope_html

    start = len(self.body)
    visit_chemiscope_html(self, node)
    here = os.path.dirname(self.builder.get_outfilename(self.builder.current_docname))
    static = os.path.relpath(os.path.join(self.builder.outdir, "_static"), here)
    for i in range(start, len(self.body)):
        self.body[i] = local_pako(self.body[i], static)


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    """Drop repeated ``<script>`` entries from a page.

    Sphinx 7.4 lists an inline script that an extension adds after ``builder-inited`` twice
    (once with filename ``None``, once with ``''``), so sphinx-thebe's ``const THEBE_JS_URL``
    is declared twice and the browser reports a ``SyntaxError`` on every page.
    """
    seen, unique = set(), []
    for script in context.get("script_files", []):
        key = (getattr(script, "filename", script) or "",
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def _check_remote_scripts(app, exception):
    from sphinx.util import logging

    if exception is not None or app.builder.format != "html":
        return
    log = logging.getLogger(__name__)
    for page in sorted(Path(app.outdir).rglob("*.html")):
        for url in remote_scripts(page.read_text(errors="replace")):
            log.warning(f"{page.relative_to(app.outdir)} loads a script from the network: {url}")


def setup(app):
    """Sphinx entry point: chemiscope's directive with a local pako; no remote scripts."""
    from chemiscope.sphinx._nodes import chemiscope, depart_chemiscope_html, depart_chemiscope_latex
    from chemiscope.sphinx._nodes import visit_chemiscope_latex

    app.setup_extension("chemiscope.sphinx")
    app.add_node(chemiscope, override=True, html=(_visit_chemiscope_html, depart_chemiscope_html),
                 latex=(visit_chemiscope_latex, depart_chemiscope_latex))
    app.connect("html-page-context", _dedupe_scripts)
    app.connect("build-finished", _check_remote_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="write the generated parts of the book (book/_generated)")
    parser.add_argument("--notebooks", required=True, help="folder of executed NN-*.ipynb notebooks")
    parser.add_argument("--node-modules", help="npm folder holding mathjax and pako (copied to _static)")
    parser.add_argument("--no-availability", action="store_true", help="do not load models to check availability")
    args = parser.parse_args(argv)
    for path in write_generated(args.notebooks, node_modules=args.node_modules,
                                check_availability=not args.no_availability):
        print(f"wrote {path.relative_to(paths.project_root())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
