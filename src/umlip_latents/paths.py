"""Every location the toolkit reads or writes, in one place.

Each folder can be moved with an environment variable; nothing is created on import.

==========================  ===============================  ==================================
variable                    default                          holds
==========================  ===============================  ==================================
``UMLIP_LATENTS_DATA``      ``<project>/data/cache``         downloaded dataset files
``UMLIP_LATENTS_STORE``     ``<project>/store``              extracted features
``UMLIP_LATENTS_CHECKPOINTS`` ``<project>/checkpoints``      local model checkpoints
``UMLIP_LATENTS_ENVS``      ``<project>/.envs``              per-family virtual environments
``UMLIP_LATENTS_MODELS``    ``<project>/models``             model registry (one YAML per family)
``UMLIP_LATENTS_FAMILIES``  ``<project>/models/families.yml`` the family table
==========================  ===============================  ==================================
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository root (the folder holding ``models/`` and ``data/datasets.yml``)."""
    env = os.environ.get("UMLIP_LATENTS_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def _from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


def data_dir() -> Path:
    """Cache of downloaded dataset files."""
    return _from_env("UMLIP_LATENTS_DATA", project_root() / "data" / "cache")


def store_dir() -> Path:
    """Root of the on-disk feature store."""
    return _from_env("UMLIP_LATENTS_STORE", project_root() / "store")


def checkpoints_dir() -> Path:
    """Folder searched for local checkpoints (``<key>.model``, ``<key>.pth`` ...)."""
    return _from_env("UMLIP_LATENTS_CHECKPOINTS", project_root() / "checkpoints")


def finetune_dir() -> Path:
    """Fine-tuning runs: checkpoints, logs and the derived-model registry of each run."""
    return _from_env("UMLIP_LATENTS_FINETUNE", project_root() / ".cache" / "finetune")


def envs_dir() -> Path:
    """Folder of the per-family virtual environments made by ``make setup``."""
    return _from_env("UMLIP_LATENTS_ENVS", project_root() / ".envs")


def models_dir() -> Path:
    """Model registry folder (one YAML file per family, beside the family table)."""
    return _from_env("UMLIP_LATENTS_MODELS", project_root() / "models")


def families_file() -> Path:
    """The family table (:mod:`umlip_latents.families`)."""
    return _from_env("UMLIP_LATENTS_FAMILIES", project_root() / "models" / "families.yml")


def datasets_file() -> Path:
    """Dataset registry."""
    return project_root() / "data" / "datasets.yml"
