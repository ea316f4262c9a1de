"""Run the study's notebooks with papermill and keep committed outputs machine-independent."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from . import paths


def relativise_outputs(path: str | os.PathLike, root: str | os.PathLike | None = None) -> int:
    """Replace the project's absolute path by ``<project>`` in every output of a notebook.

    Returns the number of outputs changed. Committed notebooks then name no machine path.
    """
    import nbformat

    root = str(Path(root or paths.project_root()).resolve())
    home = str(Path.home())
    nb = nbformat.read(path, as_version=4)
    changed = 0

    def fix(text: str) -> str:
        return text.replace(root, "<project>").replace(home, "~")

    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out and isinstance(out["text"], str):
                new = fix(out["text"])
                changed += new != out["text"]
                out["text"] = new
            for mime, value in out.get("data", {}).items():
                if isinstance(value, str) and mime.startswith("text/"):
                    new = fix(value)
                    changed += new != value
                    out["data"][mime] = new
    nbformat.write(nb, path)
    return changed


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)} min {seconds:04.1f} s"


def _first_line(source: str, width: int) -> str:
    line = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


class NotebookProgress:
    """Report a papermill run as plain lines: one per notebook start and end, one per code cell.

    Each line is written to ``stream`` (default: ``sys.stderr`` at the time of writing) and
    flushed at once, so make and CI logs show it live; nothing is drawn in place. Cell lines give
    the cell's 1-based position in the executed notebook (papermill's injected-parameters cell
    included), how long it ran, the time since the notebook started (kernel start included) and
    the first line of its source, cut to ``width`` characters. The cell timings come from
    nbclient's ``on_cell_execute``/``on_cell_executed`` hooks (:meth:`hooks`); they only print,
    so the executed notebook is the same with or without a report.

    ``total`` is the number of notebooks of the run, for the ``[i/total]`` prefix.
    """

    def __init__(self, total: int = 1, stream=None, width: int = 60):
        self.total, self.stream, self.width = total, stream, width
        self.index = 0
        self._label = ""
        self._t_notebook = self._t_cell = 0.0
        self._n_cells = 0
        self._executed = 0
        self._running: int | None = None
        self._failed_count = None

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            print(text, file=stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream must not fail the run
            pass

    def _prefix(self) -> str:
        return f"[{self.index}/{self.total}]"

    def notebook_started(self, notebook: str | os.PathLike) -> None:
        self.index += 1
        self._label = str(notebook)
        self._t_notebook = time.perf_counter()
        self._n_cells, self._executed, self._running, self._failed_count = 0, 0, None, None
        self._write(f"{self._prefix()} {self._label} ...")

    def notebook_finished(self, failed: bool = False) -> None:
        elapsed = _duration(time.perf_counter() - self._t_notebook)
        if not failed:
            self._write(f"{self._prefix()} {self._label} done in {elapsed} ({self._executed} code cells)")
            return
        where = "" if self._running is None else f" at cell {self._running + 1}/{self._n_cells}"
        if self._failed_count is not None:
            where += f" (In [{self._failed_count}])"
        self._write(f"{self._prefix()} {self._label} FAILED after {elapsed}{where}")

    def hooks(self) -> dict:
        """nbclient hooks that feed this report, to pass to ``papermill.execute_notebook``."""
        return {"on_notebook_start": self._on_notebook_start, "on_cell_execute": self._on_cell_execute,
                "on_cell_executed": self._on_cell_executed}

    def _on_notebook_start(self, notebook, **_):
        self._n_cells = len(notebook.cells)

    def _on_cell_execute(self, cell, cell_index, **_):
        self._running = cell_index
        self._t_cell = time.perf_counter()

    def _on_cell_executed(self, cell, cell_index, execute_reply=None, **_):
        now = time.perf_counter()
        self._executed += 1
        ok = (execute_reply or {}).get("content", {}).get("status", "ok") != "error"
        if ok:
            self._running = None
        else:
            self._failed_count = cell.get("execution_count")
        self._write(f"  cell {cell_index + 1:>3}/{self._n_cells:<3} {'ok' if ok else 'FAILED':6s} "
                    f"{_duration(now - self._t_cell):>8}  (notebook {_duration(now - self._t_notebook)})  "
                    f"{_first_line(cell.source, self.width)}")


def run_notebook(notebook: str | os.PathLike, output: str | os.PathLike, params_file: str | os.PathLike,
                 kernel: str = "python3", progress: NotebookProgress | None = None) -> Path:
    """Execute ``notebook`` with the parameters of a ``params/*.yml`` file into ``output``.

    A params file serves every notebook; each gets the values of the parameters it declares.
    With ``progress``, the run is reported line by line as it goes (see :class:`NotebookProgress`);
    a failing cell is reported, then papermill's ``PapermillExecutionError`` is raised as without.
    """
    import papermill

    params = yaml.safe_load(Path(params_file).read_text()) or {}
    declared = papermill.inspect_notebook(str(notebook))
    params = {k: v for k, v in params.items() if k in declared}
    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    hooks = {}
    if progress is not None:
        progress.notebook_started(notebook)
        hooks = progress.hooks()  # papermill hands engine keyword arguments on to nbclient
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=kernel,
                                   cwd=str(notebook.parent), progress_bar=False, **hooks)
        relativise_outputs(output)
    except BaseException:
        if progress is not None:
            progress.notebook_finished(failed=True)
        raise
    if progress is not None:
        progress.notebook_finished()
    return output
