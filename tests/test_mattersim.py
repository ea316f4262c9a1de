"""The MatterSim adapter (``mattersim`` environment) on a small M3GNet built here, and its registered checkpoints.

The model is a randomly initialised MatterSim M3GNet (seeded, small hypers) with per-element
reference energies and scales in its normaliser, saved with mattersim's ``Potential.save``,
read back with ``Potential.from_checkpoint`` and cached across sessions. M3GNet sees only
distances and angles, so rotation, translation, permutation and supercells leave the
features unchanged, while a nudged atom changes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import test_cache_dir as cache_dir  # aliased: pytest would collect test_*
from conftest import transformed_variants

from umlip_latents.errors import ModelUnavailable, UnsupportedElement
from umlip_latents.extract import extract_features
from umlip_latents.extract.worker import environment_python
from umlip_latents.registry import ModelSpec, load_registry

TYPES = [1, 3, 8, 11, 12, 14, 17, 29]
RECIPE = dict(seed=0, reference_energies={z: -1.0 - 0.5 * i for i, z in enumerate(TYPES)},
              scales={z: 0.5 + 0.25 * i for i, z in enumerate(TYPES)},
              num_blocks=2, units=16, max_l=2, max_n=3, cutoff=5.0, threebody_cutoff=4.0)
TOL = 1e-5


def _env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="mattersim", **(extra or {}))


@pytest.fixture(scope="module")
def test_mattersim() -> ModelSpec:
    """A small random MatterSim M3GNet saved by mattersim in the mattersim environment, cached across sessions."""
    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"mattersim-{key}" / "test-mattersim.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        script = ("import json, sys\nfrom umlip_latents.extract.mattersim import build_random_mattersim\n"
                  "build_random_mattersim(sys.argv[1], **json.loads(sys.argv[2]))\n")
        subprocess.run([str(environment_python("mattersim")), "-c", script, str(path), json.dumps(RECIPE)],
                       check=True, capture_output=True, text=True, env=_env())
    return ModelSpec(key="test-mattersim", family="mattersim", environment="mattersim",
                     source={"kind": "local", "path": str(path)},
                     training_data="none (random weights, built in the test session)", functional="none",
                     layers={"last": "gated readout hidden layer + gate", "backbone": "node features"},
                     description="small random MatterSim M3GNet for tests; not a foundation model")


@pytest.fixture(scope="module")
def features(test_mattersim, crystals):
    cache = {}

    def get(layer, batch_size=None):
        if (layer, batch_size) not in cache:
            structures, maps = transformed_variants(crystals)
            cache[layer, batch_size] = (extract_features(test_mattersim, structures, layer=layer, device="cpu",
                                                         batch_size=batch_size), maps)
        return cache[layer, batch_size]

    return get


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_energy_reread_from_last_layer(features):
    fs, _ = features("last")
    n_atoms = np.bincount(fs.structure_index)
    err = np.abs(fs.reread_energy() - fs.energy) / n_atoms
    assert err.max() <= TOL, f"energy re-read error {err.max():.2e} eV/atom"
    # the gate column carries the last layer's bias: without it the re-read is off
    w = fs.readout.weight.copy()
    w[:, -1] = 0.0
    partial = np.einsum("ij,ij->i", fs.values.astype(np.float64), w[fs.species]) + fs.readout.bias[fs.species]
    assert np.abs(np.bincount(fs.structure_index, partial) - fs.energy).max() > 1e-3
    shifted = fs.readout.atom_energies(fs.values + 0.1, fs.species)
    assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)
    # the per-element scale and shift of the normaliser are part of the readout
    for z, e in RECIPE["reference_energies"].items():
        assert fs.readout.bias[z] == pytest.approx(e)


@pytest.mark.parametrize("layer", ["last", "backbone"])
def test_invariances(layer, features):
    fs, maps = features(layer)
    assert fs.values.dtype == np.float32 and np.isfinite(fs.values).all()
    assert fs.blocks[0].start == 0 and fs.blocks[-1].stop == fs.dim
    rows = lambda k: fs.values[fs.structure_index == k].astype(np.float64)  # noqa: E731
    for kind, base, k, idx in maps:
        err = _rel(rows(k), rows(base)[idx])
        if kind == "nudged":
            assert err >= 3 * TOL, f"{layer}: nudged structure {base} changes the features by only {err:.2e}"
        else:
            assert err <= TOL, f"{layer}: {kind} structure {base} differs by {err:.2e} (relative)"


@pytest.mark.parametrize("layer", ["last", "backbone"])
def test_batched_equals_single(layer, features):
    batched, _ = features(layer)
    single, _ = features(layer, batch_size=1)
    assert _rel(single.values.astype(np.float64), batched.values.astype(np.float64)) <= TOL
    np.testing.assert_allclose(batched.energy, single.energy, rtol=0, atol=1e-4)


def test_unsupported_element_names_element_structure_model(test_mattersim, crystals):
    from ase import Atoms

    bad = Atoms("OgH", positions=[[0, 0, 0], [0, 0, 1.5]], cell=[8, 8, 8], pbc=True)
    bad.info["structure_id"] = "bad-structure-42"
    with pytest.raises(UnsupportedElement) as err:
        extract_features(test_mattersim, [crystals[0], bad], device="cpu")
    msg = str(err.value)
    assert "Og" in msg and "bad-structure-42" in msg and "test-mattersim" in msg


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals):
    """Every registered MatterSim is a mattersim loader entry; offline each raises ModelUnavailable naming the file."""
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no mattersim download cache either
    specs = [s for s in load_registry(derived=False).values() if s.family == "mattersim"]
    assert len(specs) >= 2 and all(s.source["kind"] == "loader" and s.source["package"] == "mattersim" for s in specs)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
    script = ("import json, sys\nfrom umlip_latents.errors import ModelUnavailable\n"
              "from umlip_latents.extract.mattersim import _checkpoint_path\n"
              "from umlip_latents.registry import get_spec\n"
              "out = {}\nfor key in sys.argv[1:]:\n    try:\n        out[key] = 'loaded ' + _checkpoint_path(get_spec(key))\n"
              "    except ModelUnavailable as exc:\n        out[key] = str(exc)\nprint(json.dumps(out))\n")
    proc = subprocess.run([str(environment_python("mattersim")), "-c", script, *[s.key for s in specs]], check=True,
                          capture_output=True, text=True, env=_env())
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec in specs:
        assert spec.source["filename"] in messages[spec.key] and "checkpoints folder" in messages[spec.key], spec.key
