"""`umlip-latents notebooks` reports each notebook and each executed code cell as it runs."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from umlip_latents.cli import main

LONG = "label = 'a first line far longer than the sixty characters a progress line shows'"
CELL = r"^  cell +(\d+)/(\d+) +(ok|FAILED) +\d+\.\d s  \(notebook \d+\.\d s\)  (.*)$"


def _notebook(path, *sources):
    cells = [{"cell_type": "markdown", "id": "title", "metadata": {}, "source": "# A throw-away notebook"},
             {"cell_type": "code", "id": "params", "metadata": {"tags": ["parameters"]}, "execution_count": None,
              "outputs": [], "source": "n = 1"}]
    cells += [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
               "source": src} for i, src in enumerate(sources)]
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same notebook run with and without ``--quiet``: (stderr, executed notebook) of each."""
    root = tmp_path_factory.mktemp("progress")
    nb = _notebook(root / "nb.ipynb", "x = n + 1\nprint(x)", LONG)
    params = root / "p.yml"
    params.write_text("n: 5\nnot_declared: 0\n")
    result = {}
    for mode, extra in (("report", []), ("quiet", ["--quiet"])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["notebooks", str(nb), "--params", str(params), "--out", str(root / mode), *extra]) == 0
        result[mode] = err.getvalue(), json.loads((root / mode / "nb.ipynb").read_text())
    return nb, result


def test_reports_notebook_start_each_code_cell_and_end(runs):
    nb, result = runs
    lines = result["report"][0].splitlines()
    assert f"[1/1] {nb} ..." in lines
    cells = [re.match(CELL, ln).groups() for ln in lines if re.match(CELL, ln)]
    # parameters cell, papermill's injected cell, the two others; the markdown cell is not reported
    assert [(int(i), int(n), status) for i, n, status, _ in cells] == [(2, 5, "ok"), (3, 5, "ok"), (4, 5, "ok"),
                                                                      (5, 5, "ok")]
    assert [src for *_, src in cells] == ["n = 1", "# Parameters", "x = n + 1", LONG[:57] + "..."]
    assert any(re.fullmatch(rf"\[1/1\] {re.escape(str(nb))} done in \d+\.\d s \(4 code cells\)", ln) for ln in lines)
    assert lines.index(f"[1/1] {nb} ...") < min(i for i, ln in enumerate(lines) if re.match(CELL, ln))


def test_quiet_reports_nothing_and_the_executed_notebook_does_not_depend_on_the_report(runs):
    _, result = runs
    err, quiet = result["quiet"]
    assert "[1/1]" not in err and not any(re.match(CELL, ln) for ln in err.splitlines())

    def untimed(nb):  # what papermill varies from run to run: timings, output path, injected cell's random id
        nb = json.loads(json.dumps(nb))
        nb["metadata"]["papermill"] = {k: v for k, v in nb["metadata"]["papermill"].items()
                                       if k not in {"start_time", "end_time", "duration", "output_path"}}
        for cell in nb["cells"]:
            cell["metadata"].pop("execution", None)
            if "injected-parameters" in cell["metadata"].get("tags", []):
                cell.pop("id")
            for key in ("start_time", "end_time", "duration"):
                cell["metadata"].get("papermill", {}).pop(key, None)
        return nb

    assert untimed(result["report"][1]) == untimed(quiet)


def test_failing_cell_is_reported_and_the_run_fails_with_papermills_error(tmp_path, capsys):
    from papermill.exceptions import PapermillExecutionError

    nb = _notebook(tmp_path / "bad.ipynb", "x = n + 1", "1 / 0", "never = True")
    params = tmp_path / "p.yml"
    params.write_text("n: 5\n")
    # in-process (a fresh interpreter spends seconds importing papermill): main lets papermill's
    # error through, so the console script exits with status 1 and its traceback
    with pytest.raises(PapermillExecutionError, match="ZeroDivisionError"):
        main(["notebooks", str(nb), "--params", str(params), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    cells = [re.match(CELL, ln).groups() for ln in lines if re.match(CELL, ln)]
    assert cells[-1] == ("5", "6", "FAILED", "1 / 0")           # the cell after it is never run
    assert any(re.fullmatch(rf"\[1/1\] {re.escape(str(nb))} FAILED after \d+\.\d s at cell 5/6 \(In \[4\]\)", ln)
               for ln in lines)
