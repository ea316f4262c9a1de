"""Model families as data: the table ``models/families.yml``, one row per family.

A family is its environment (and so its pin file), its adapter class, the distribution that
defines its models, where that package's loader downloads checkpoints from, and the
invariances its features promise. Everything that needs one of these reads it here: the
registry's family check, :func:`umlip_latents.extract.adapter_class`, the environment worker,
the store's cache key (:func:`code_digest`), notebook 01's invariance checks, the Makefile's
environments and the README's family table (:func:`readme_table`).

The table is validated against ``schemas/families.schema.json`` wherever ``jsonschema`` is
importable (the main environment, which loads the registry); family environments read it as
it is, since their requests come from a main process that validated it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import paths
from .errors import RegistryError

INVARIANCES = ("rotation", "translation", "permutation", "supercell")
#: modules besides the family's adapter whose code shapes every family's features
FEATURE_MODULES = ("umlip_latents.extract.base", "umlip_latents.features")


@dataclass(frozen=True)
class Family:
    """One row of the family table (see the comments at the top of ``models/families.yml``)."""

    name: str
    environment: str
    adapter: str
    distribution: str
    import_name: str
    versions: tuple
    origin: str
    checkpoints: str
    invariance: dict = field(default_factory=dict)
    last: str = ""
    backbone: str = ""

    @property
    def tolerance(self) -> float:
        """Relative (Frobenius) tolerance of the ``exact`` invariances, in float32."""
        return float(self.invariance["tolerance"])

    def exact(self, kind: str) -> bool:
        """Whether the features are invariant under ``kind`` (one of :data:`INVARIANCES`) within :attr:`tolerance`."""
        return self.invariance[kind] == "exact"

    @property
    def requirements(self) -> Path:
        """The pin file the family's environment is built from."""
        return paths.project_root() / "requirements" / f"{self.environment}.txt"

    @property
    def adapter_module(self) -> str:
        return self.adapter.split(":")[0]

    def importable(self) -> bool:
        """Whether the family's package can be imported in this process (without importing it)."""
        try:
            return importlib.util.find_spec(self.import_name) is not None
        except ModuleNotFoundError:  # a dotted name whose parent is missing
            return False


def schema(name: str) -> dict:
    """A JSON Schema shipped with the package (``schemas/<name>.schema.json``)."""
    return json.loads((Path(__file__).parent / "schemas" / f"{name}.schema.json").read_text())


def schema_errors(doc, name: str, origin: str) -> list[str]:
    """One line per schema violation of ``doc``: ``origin: field.path: problem``.

    Empty when ``jsonschema`` is not importable (family environments; see the module doc).
    """
    try:
        import jsonschema
    except ImportError:
        return []
    validator = jsonschema.Draft202012Validator(schema(name))
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        out.append(f"{origin}: {where}: {err.message}")
    return out


@lru_cache(maxsize=8)
def _load(path: str, stamp: int) -> dict[str, Family]:
    import yaml

    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"{path}: cannot read the family table ({exc})") from None
    errors = schema_errors(doc, "families", Path(path).name)
    if errors:
        raise RegistryError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    out = {}
    for name, row in doc.items():
        row = dict(row)
        out[name] = Family(name=name, import_name=row.pop("import"), versions=tuple(row.pop("versions")), **row)
    return out


def load_families(path=None) -> dict[str, Family]:
    """The family table (``$UMLIP_LATENTS_FAMILIES`` or ``models/families.yml``), by name."""
    path = Path(path) if path else paths.families_file()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        raise RegistryError(f"{path}: the family table is missing") from None
    return _load(str(path), stamp)


def get_family(name: str) -> Family:
    """One family by name; :class:`RegistryError` naming the known ones otherwise."""
    table = load_families()
    if name not in table:
        raise RegistryError(f"unknown model family {name!r}; the family table has {', '.join(sorted(table))}")
    return table[name]


def environments() -> list[str]:
    """Names of the family environments other than ``main`` (each built by ``make setup``)."""
    return sorted({f.environment for f in load_families().values()} - {"main"})


def environment_python(name: str) -> Path:
    """The python executable of environment ``name`` (``main`` is the project's ``.venv``)."""
    root = paths.project_root() / ".venv" if name == "main" else paths.envs_dir() / name
    return root / "bin" / "python"


def adapter_class(name: str):
    """The adapter class of family ``name`` (imports its module, and so the family's package).

    The class gets the family's row as its ``family`` attribute.
    """
    fam = get_family(name)
    module, attr = fam.adapter.split(":")
    cls = getattr(importlib.import_module(module), attr)
    cls.family = fam
    return cls


def _module_file(module: str) -> Path:
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise RegistryError(f"module {module!r} of the family table cannot be found")
    return Path(found.origin)


def source_digest(modules) -> str:
    """sha256 over the names and source files of ``modules`` (found without importing them)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.encode())
        digest.update(_module_file(module).read_bytes())
    return digest.hexdigest()


def code_digest(name: str) -> str:
    """:func:`source_digest` of family ``name``'s adapter module and of :data:`FEATURE_MODULES`.

    Part of every store cache key: editing the code that makes a family's features recomputes
    them. Found without importing the family's package.
    """
    return source_digest((get_family(name).adapter_module, *FEATURE_MODULES))


def readme_table() -> str:
    """The README's family table (Markdown), made from the family table."""
    lines = ["| family | environment | package | checkpoints | \"last\" | \"backbone\" | rotation |",
             "|---|---|---|---|---|---|---|"]
    for f in load_families().values():
        env = "`.venv`" if f.environment == "main" else f"`.envs/{f.environment}`"
        lines.append(f"| {f.name} | {env} | {f.distribution} | {f.checkpoints} | {f.last} | {f.backbone} | "
                     f"{f.invariance['rotation']} |")
    return "\n".join(lines) + "\n"
