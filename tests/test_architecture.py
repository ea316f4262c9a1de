"""Dependencies point down: imports between the package's modules, the notebooks and the README's map."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from umlip_latents import paths

SRC = paths.project_root() / "src" / "umlip_latents"
MODULES = sorted(p for p in SRC.rglob("*.py"))
#: private names of third-party packages that are their only entry point (each explained where used)
THIRD_PARTY_PRIVATE = {"sevenn._keys", "upet._models._resolve_and_download_checkpoint", "chemiscope.sphinx._nodes"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree, module: str):
    """(imported module, names) of every import in ``tree``, relative imports resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                is_package = (SRC.parent / Path(*module.split("."))).is_dir()
                parent = parent if is_package else parent[:-1]
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_anothers_private_names(path):
    module = _module_name(path)
    for target, names in _imports(ast.parse(path.read_text()), module):
        if target.split(".")[0] != "umlip_latents":
            continue
        if target.split(".")[-1].startswith("_") and target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0]:
            continue  # a package's private engine module (metrics._engine) serves that package's modules
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module} imports private {private} from {target}"
        assert target != "umlip_latents.testing", f"{module} (production code) imports umlip_latents.testing"


def test_third_party_private_imports_are_the_known_ones():
    found = set()
    for path in MODULES:
        for target, names in _imports(ast.parse(path.read_text()), _module_name(path)):
            if target.split(".")[0] == "umlip_latents":
                continue
            found |= {f"{target}.{n}" for n in names if n.startswith("_")}
            if any(part.startswith("_") for part in target.split(".")) and not names:
                found.add(target)
    assert found <= THIRD_PARTY_PRIVATE, found - THIRD_PARTY_PRIVATE


def test_notebooks_import_public_modules_only():
    for nb in sorted((paths.project_root() / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            if source.lstrip().startswith(("%", "!")):
                continue
            for target, names in _imports(ast.parse(source), "notebook"):
                if target.split(".")[0] != "umlip_latents":
                    continue
                assert target != "umlip_latents.cli", f"{nb.name} imports the command line ({names})"
                assert not any(part.startswith("_") for part in target.split(".")), f"{nb.name}: {target}"
                assert not [n for n in names if n.startswith("_")], f"{nb.name} imports private {names}"


def test_readme_module_map_lists_every_module():
    readme = (paths.project_root() / "README.md").read_text()
    table = readme[readme.index("### Module map"):readme.index("### Model families")]
    for path in MODULES:
        name = _module_name(path).removeprefix("umlip_latents").lstrip(".")
        if not name:
            continue
        leaf = name.split(".")[-1]
        assert f"`{name}`" in table or f"`{leaf}`" in table or (
            name.startswith("extract.") and "`extract.<family>`" in table), f"README's module map lacks {name}"
