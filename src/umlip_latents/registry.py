"""Model registry: one YAML file per model under ``models/``, validated against a schema.

A model is data: its key, family, the environment it runs in, where its weights come from,
what it was trained on and which layers it offers. Adapters (``umlip_latents.extract``)
turn a :class:`ModelSpec` into features.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import paths
from .errors import ModelUnavailable, RegistryError
from .families import load_families
from .families import schema as load_schema

#: keys every model entry needs (the full schema is ``schemas/model.schema.json``)
REQUIRED = ("key", "family", "source", "training_data", "functional", "layers", "citation", "licence")
#: files of the models folder that are not model files
NOT_MODELS = ("families.yml",)


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    ``source`` says where the weights come from: ``kind`` is ``wheel`` (shipped inside the
    family's wheel; ``name`` is what the family's loader takes), ``loader`` (the package's
    official foundation-model loader, which downloads and caches when online; ``name`` is
    the loader's model argument and ``filename`` the cached checkpoint's file name) or
    ``local`` (``path``, absolute or relative to the checkpoints folder).
    """

    key: str
    family: str
    environment: str
    source: dict
    training_data: str
    functional: str
    layers: dict
    #: the paper(s) to cite for these weights, and the weights' licence (required in the registry)
    citation: str = ""
    licence: str = ""
    parent: str | None = None
    description: str = ""
    options: dict = field(default_factory=dict)
    #: for models made by :mod:`umlip_latents.finetune`: protocol, base (architecture source),
    #: data_sha256, epoch, run (None for registered models)
    derived: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def validate(raw: dict, origin: str = "<dict>") -> ModelSpec:
    """Check one registry entry against ``schemas/model.schema.json`` and return it as a :class:`ModelSpec`.

    The schema's family enum is the family table's names and an entry's ``options`` are checked
    against ``$defs/options/<family>`` where the schema has one. Raises :class:`RegistryError`
    with one line naming ``origin``, the entry's key and the field.
    """
    table = load_families()
    key = raw.get("key") if isinstance(raw, dict) else None
    where = f"{origin} ({key})" if isinstance(key, str) else origin
    errors = _schema_errors(raw, table)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RegistryError(f"{where}: {_describe(errors[0])}{more}")
    if errors is None and not (isinstance(raw, dict) and set(REQUIRED) <= set(raw) and raw["family"] in table):
        raise RegistryError(f"{where}: not a model entry: it needs {', '.join(REQUIRED)} and a family of "
                            f"{', '.join(sorted(table))} (install jsonschema for the full check)")
    environment = table[raw["family"]].environment
    if raw.get("environment", environment) != environment:
        raise RegistryError(f"{where}: environment: {raw['environment']!r} is not the {raw['family']} family's "
                            f"({environment!r}, models/families.yml); leave it out")
    return ModelSpec(**dict(raw, environment=environment))


def _schema_errors(raw, table: dict) -> list | None:
    """The schema violations of ``raw`` (shallowest first), or None without ``jsonschema``."""
    try:
        import jsonschema
    except ImportError:  # family environments: they get specs from a main process that validated them
        return None
    schema = load_schema("model")
    schema["properties"]["family"]["enum"] = sorted(table)
    family = raw.get("family") if isinstance(raw, dict) else None
    if isinstance(family, str) and family in schema["$defs"]["options"]:
        schema["properties"]["options"] = {"$ref": f"#/$defs/options/{family}"}
    errors = jsonschema.Draft202012Validator(schema).iter_errors(raw)
    return sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])


def _describe(err) -> str:
    """``field.path: problem`` for one schema violation; a missing or unknown key is named in the path."""
    path, message = [str(p) for p in err.absolute_path], err.message
    if err.validator == "required":
        path.append(next(k for k in err.validator_value if k not in err.instance))
    elif err.validator == "additionalProperties" and err.validator_value is False:
        allowed = sorted(err.schema.get("properties", {}))
        path.append(sorted(str(k) for k in err.instance if k not in allowed)[0])
        message = f"unknown key; allowed: {', '.join(allowed) or 'none'}"
    return f"{'.'.join(path) or '(top level)'}: {message}"


def _read(path: Path, label: str) -> list[ModelSpec]:
    """The validated entries of one registry file (one model, or a list of models)."""
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RegistryError(f"{label}:{line} not valid YAML ({problem})") from None
    entries = doc if isinstance(doc, list) else [doc]
    return [validate(raw, f"{label}[{i}]") for i, raw in enumerate(entries)]


def _add(out: dict, specs: list[ModelSpec], label: str) -> None:
    """Add ``specs`` to ``out`` by key; :class:`RegistryError` (nothing added) if a key is taken."""
    keys = [s.key for s in specs]
    dup = next((k for i, k in enumerate(keys) if k in out or k in keys[:i]), None)
    if dup is not None:
        raise RegistryError(f"{label}: duplicate model key {dup!r}")
    out.update((s.key, s) for s in specs)


def load_registry(folder: str | os.PathLike | None = None, derived: bool = True) -> dict[str, ModelSpec]:
    """All models of ``models/*.yml`` (one model, or a list of models, per file), by key.

    With ``derived`` (and no ``folder``), the models made by fine-tuning runs are added: each
    run folder under :func:`umlip_latents.paths.finetune_dir` holds a ``models.yml``. A
    malformed ``models.yml`` of a run is skipped with a :class:`RuntimeWarning`; a malformed
    file of the models folder raises :class:`RegistryError`.
    """
    out: dict[str, ModelSpec] = {}
    for path in sorted((Path(folder) if folder else paths.models_dir()).glob("*.yml")):
        if path.name not in NOT_MODELS:
            _add(out, _read(path, path.name), path.name)
    if derived and folder is None:
        for path in sorted(paths.finetune_dir().glob("*/models.yml")):
            label = f"{path.parent.name}/{path.name}"
            try:
                _add(out, _read(path, label), label)
            except RegistryError as exc:
                warnings.warn(f"fine-tuned models of {path} skipped: {exc}", RuntimeWarning, stacklevel=2)
    return out


def get_spec(model: str | ModelSpec) -> ModelSpec:
    """The spec of a registered key (a :class:`ModelSpec` is returned as it is)."""
    if isinstance(model, ModelSpec):
        return model
    reg = load_registry()
    if model not in reg:
        raise ModelUnavailable(f"unknown model {model!r}; registered: {', '.join(sorted(reg))}")
    return reg[model]


def local_checkpoint(spec: ModelSpec) -> Path | None:
    """A checkpoint file for ``spec`` in the checkpoints folder, if one is there.

    Looked up as ``source.path`` (local models) or ``source.filename`` and ``<key>.<ext>``.
    """
    src = spec.source
    root = paths.checkpoints_dir()
    candidates = []
    if src["kind"] == "local":
        p = Path(src["path"]).expanduser()
        candidates.append(p if p.is_absolute() else root / p)
    if "filename" in src:
        candidates.append(root / src["filename"])
    candidates += [root / f"{spec.key}{ext}" for ext in (".model", ".pth", ".pt", ".ckpt")]
    return next((c for c in candidates if c.is_file()), None)
