"""Model registry: one YAML file per model under ``models/``, validated against a schema.

A model is data: its key, family, the environment it runs in, where its weights come from,
what it was trained on and which layers it offers. Adapters (``umlip_latents.extract``)
turn a :class:`ModelSpec` into features.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import paths
from .errors import ModelUnavailable, RegistryError

FAMILIES = ("mace", "chgnet", "sevenn", "diep", "pet", "uma", "dpa", "mattersim", "orb")
SOURCE_KINDS = ("wheel", "loader", "local")
LAYERS = ("last", "backbone")
REQUIRED = ("key", "family", "environment", "source", "training_data", "functional", "layers")


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
    parent: str | None = None
    description: str = ""
    options: dict = field(default_factory=dict)
    #: for models made by :mod:`umlip_latents.finetune`: protocol, base (architecture source),
    #: data_sha256, epoch, run (None for registered models)
    derived: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def validate(raw: dict, origin: str = "<dict>") -> ModelSpec:
    """Check one registry entry against the schema and return it as a :class:`ModelSpec`."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{origin}: a model entry must be a mapping")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise RegistryError(f"{origin}: missing keys {missing}")
    unknown = set(raw) - set(REQUIRED) - {"parent", "description", "options", "derived"}
    if unknown:
        raise RegistryError(f"{origin}: unknown keys {sorted(unknown)}")
    if raw["family"] not in FAMILIES:
        raise RegistryError(f"{origin}: family {raw['family']!r} not one of {FAMILIES}")
    src = raw["source"]
    if not isinstance(src, dict) or src.get("kind") not in SOURCE_KINDS:
        raise RegistryError(f"{origin}: source.kind must be one of {SOURCE_KINDS}")
    need = {"wheel": ("package", "name"), "loader": ("package", "name", "filename"), "local": ("path",)}
    for k in need[src["kind"]]:
        if k not in src:
            raise RegistryError(f"{origin}: source of kind {src['kind']} needs {k!r}")
    layers = raw["layers"]
    if not isinstance(layers, dict) or not set(layers) <= set(LAYERS) or "last" not in layers:
        raise RegistryError(f"{origin}: layers must map a subset of {LAYERS} (with 'last') to descriptions")
    for k in ("key", "environment", "training_data", "functional"):
        if not isinstance(raw[k], str) or not raw[k]:
            raise RegistryError(f"{origin}: {k} must be a non-empty string")
    derived = raw.get("derived")
    if derived is not None:
        if not isinstance(derived, dict) or not {"protocol", "base", "data_sha256", "epoch", "run"} <= set(derived):
            raise RegistryError(f"{origin}: derived must map protocol, base, data_sha256, epoch and run")
        if src["kind"] != "local":
            raise RegistryError(f"{origin}: a derived model's source must be a local checkpoint")
    return ModelSpec(**{k: raw[k] for k in raw})


def load_registry(folder: str | os.PathLike | None = None, derived: bool = True) -> dict[str, ModelSpec]:
    """All models of ``models/*.yml`` (one model, or a list of models, per file), by key.

    With ``derived`` (and no ``folder``), the models made by fine-tuning runs are added: each
    run folder under :func:`umlip_latents.paths.finetune_dir` holds a ``models.yml``.
    """
    files = sorted((Path(folder) if folder else paths.models_dir()).glob("*.yml"))
    if derived and folder is None:
        files += sorted(paths.finetune_dir().glob("*/models.yml"))
    out: dict[str, ModelSpec] = {}
    for path in files:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
        entries = doc if isinstance(doc, list) else [doc]
        for i, raw in enumerate(entries):
            spec = validate(raw, f"{path.name}[{i}]")
            if spec.key in out:
                raise RegistryError(f"{path.name}: duplicate model key {spec.key!r}")
            out[spec.key] = spec
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
