"""Run the study's notebooks with papermill and keep committed outputs machine-independent."""

from __future__ import annotations

import os
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


def run_notebook(notebook: str | os.PathLike, output: str | os.PathLike, params_file: str | os.PathLike,
                 kernel: str = "python3") -> Path:
    """Execute ``notebook`` with the parameters of a ``params/*.yml`` file into ``output``.

    A params file serves every notebook; each gets the values of the parameters it declares.
    """
    import papermill

    params = yaml.safe_load(Path(params_file).read_text()) or {}
    declared = papermill.inspect_notebook(str(notebook))
    params = {k: v for k, v in params.items() if k in declared}
    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=kernel,
                               cwd=str(notebook.parent), progress_bar=False)
    relativise_outputs(output)
    return output
