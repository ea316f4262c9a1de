"""Shared fixtures: small structures, the offline model panel and a MACE model trained here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from umlip_latents.checks import random_rotation
from umlip_latents import paths
from umlip_latents.registry import ModelSpec, load_registry

#: MACE training recipe for the test model (part of its cache key).
MACE_RECIPE = dict(n_train=40, seed=0, max_epochs=3, num_channels=16, max_L=1, r_max=4.5,
                   num_interactions=2)


#: test files that need a family environment (besides tests parametrized over such models or families)
ENV_FILES = {"test_worker.py", "test_pet.py", "test_pet_released.py", "test_uma.py", "test_dpa.py",
             "test_mattersim.py", "test_orb.py", "test_dpa_released.py", "test_uma_released.py", "test_orb_released.py"}
#: test files that train or fine-tune models
TRAINING_FILES = {"test_finetune_chgnet.py", "test_finetune_mace.py", "test_notebook_finetune.py", "test_training.py"}


def pytest_collection_modifyitems(config, items):
    """Mark tests ``envs`` (a family environment is needed) and ``training`` (`make test-fast` leaves both out)."""
    from umlip_latents.families import load_families

    table = load_families()
    registry = load_registry(derived=False)
    other = {k for k, s in registry.items() if s.environment != "main"} | \
        {f for f, row in table.items() if row.environment != "main"}
    for item in items:
        name = Path(str(item.fspath)).name
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = {v for v in params.values() if isinstance(v, str)}
        if name in ENV_FILES or values & other:
            item.add_marker(pytest.mark.envs)
        if name in TRAINING_FILES or "trained_mace" in item.fixturenames or values & {"mace"}:
            item.add_marker(pytest.mark.training)


def squeezed_crystals() -> list:
    """Compressed crystals: Cu-Cu and Na-Cl pairs inside the sum of covalent radii, so ZBL is on."""
    from ase.build import bulk

    out = [bulk("Cu", "fcc", a=2.9), bulk("NaCl", "rocksalt", a=4.2).repeat((1, 1, 2))]
    for i, atoms in enumerate(out):
        atoms.rattle(stdev=0.02, seed=i)
        atoms.info["structure_id"] = f"squeezed-{i}"
    return out


def offline_panel() -> list[str]:
    """Registered models whose weights ship inside a wheel (loadable offline)."""
    return sorted(k for k, s in load_registry(derived=False).items() if s.source["kind"] == "wheel")


def test_cache_dir() -> Path:
    """Folder for artefacts reused across test sessions (ignored by git)."""
    return Path(os.environ.get("UMLIP_LATENTS_TEST_CACHE", paths.project_root() / ".cache" / "tests"))


@pytest.fixture(scope="session")
def crystals():
    """Small periodic structures of elements every offline model supports."""
    from ase.build import bulk

    out = []
    for i, atoms in enumerate([
        bulk("Si", "diamond", a=5.43),
        bulk("NaCl", "rocksalt", a=5.64),
        bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1)),
        bulk("MgO", "rocksalt", a=4.21).repeat((1, 1, 2)),
        # no neighbours within 3 A: CHGNet builds no angles for it (batching regression)
        bulk("Na", "bcc", a=4.23, cubic=True),
    ]):
        atoms.rattle(stdev=0.05, seed=i)
        atoms.info["structure_id"] = f"test-{i}-{atoms.get_chemical_formula()}"
        out.append(atoms)
    return out


@pytest.fixture(scope="session")
def mptrj_small():
    """A few real MPtrj frames (fetched and checksummed through the dataset registry)."""
    from umlip_latents.datasets import load_dataset

    frames = load_dataset("mptrj-random-1k")
    small = [a for a in frames if 2 <= len(a) <= 12]
    return small[:4]


@pytest.fixture(scope="session")
def trained_mace() -> ModelSpec:
    """A small MACE trained here with ``mace_run_train`` on an MPtrj slice, cached across sessions."""
    from umlip_latents.datasets import load_dataset
    from umlip_latents.training import train_mace

    key = hashlib.sha256(json.dumps(MACE_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    workdir = test_cache_dir() / f"mace-{key}"
    model = workdir / "test-mace.model"
    if not model.exists():
        recipe = dict(MACE_RECIPE)
        structures = [a for a in load_dataset("mptrj-random-1k", seed=recipe["seed"]) if len(a) <= 16]
        structures = structures[: recipe.pop("n_train")]
        trained = train_mace(structures, workdir, name="test-mace", **recipe)
        assert trained.exists(), f"mace_run_train wrote no model at {trained}"
        model = trained
    return ModelSpec(
        key="test-mace", family="mace", environment="main",
        source={"kind": "local", "path": str(model)},
        training_data=f"{MACE_RECIPE['n_train']} MPtrj frames (trained in the test session)",
        functional="PBE/PBE+U", layers={"last": "readout inputs", "backbone": "get_descriptors"},
        description="small MACE trained here for tests; not a foundation model",
    )


def feature_cache(resolve, crystals):
    """``get(name, layer, batch_size=None) -> (FeatureSet, maps)`` of :func:`transformed_variants` of
    ``crystals``, for the model ``resolve(name)``, extracted once per (name, layer, batch size)."""
    from umlip_latents.extract import extract_features

    cache = {}

    def get(name, layer, batch_size=None):
        if (name, layer, batch_size) not in cache:
            structures, maps = transformed_variants(crystals)
            fs = extract_features(resolve(name), structures, layer=layer, device="cpu", batch_size=batch_size)
            cache[name, layer, batch_size] = (fs, maps)
        return cache[name, layer, batch_size]

    return get


def transformed_variants(crystals):
    """Base structures followed by transformed copies, with the map back to base atoms.

    Kinds: rotated, translated, permuted, 2x2x2 supercell (features must agree with the base
    atoms they map to) and nudged (one atom moved 0.3 A: features must change).
    """
    base = crystals
    out, maps = list(base), []
    rot = random_rotation(7)
    for i, atoms in enumerate(base):
        n = len(atoms)
        r = atoms.copy()
        r.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
        r.positions = atoms.positions @ rot.T
        t = atoms.copy()
        t.positions += np.array([0.37, -1.1, 2.3])
        p = atoms[::-1]
        s = atoms.repeat(2)
        d = atoms.copy()  # control: a real (small) physical change the features must see
        d.positions[0] += np.array([0.3, 0.0, 0.0])
        for kind, a, idx in (("rotated", r, np.arange(n)), ("translated", t, np.arange(n)),
                             ("permuted", p, np.arange(n)[::-1]), ("supercell", s, np.arange(8 * n) % n),
                             ("nudged", d, np.arange(n))):
            a.info["structure_id"] = f"{atoms.info['structure_id']}-{kind}"
            maps.append((kind, i, len(out), idx))
            out.append(a)
    return out, maps
