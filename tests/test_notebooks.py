"""The notebooks' parameter cells: papermill must understand every parameter they declare."""

from __future__ import annotations

import json

import pytest
import yaml

from umlip_latents import paths

NOTEBOOKS = sorted((paths.project_root() / "notebooks").glob("[0-9][0-9]-*.ipynb"))


def _parameters_source(path) -> str:
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{path.name}: one cell tagged 'parameters' expected, found {len(cells)}"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(path):
    from papermill.translators import PythonTranslator

    src = _parameters_source(path)
    declared = [ln.split("=")[0].strip() for ln in src.splitlines() if ln and not ln.startswith("#") and "=" in ln]
    parsed = [p.name for p in PythonTranslator.inspect({"source": src})]
    assert parsed == declared, f"{path.name}: papermill could not parse {sorted(set(declared) - set(parsed))}"


def test_parameter_sets_only_set_declared_parameters():
    declared = set()
    for path in NOTEBOOKS:
        src = _parameters_source(path)
        declared |= {ln.split("=")[0].strip() for ln in src.splitlines() if ln and not ln.startswith("#") and "=" in ln}
    for params in sorted((paths.project_root() / "params").glob("*.yml")):
        unknown = set(yaml.safe_load(params.read_text())) - declared
        assert not unknown, f"{params.name} sets parameters no notebook declares: {sorted(unknown)}"


def test_paper_panel_names_registered_models():
    from umlip_latents.registry import load_registry

    panel = yaml.safe_load((paths.project_root() / "params" / "paper.yml").read_text())["models"]
    unknown = set(panel) - set(load_registry(derived=False))
    assert not unknown, f"params/paper.yml names unregistered models: {sorted(unknown)}"
