"""The ORB adapter (``orb`` environment) on a small ORB v3 built here, and its registered checkpoints.

The model is a randomly initialised ORB v3 direct regressor (orb-models' own architecture
builder, seeded, small sizes, up to 120 neighbours), saved as a state dict, read back with
orb-models' ``load_model`` and cached across sessions. ORB's energy head is graph-level, so
the "last" features are a structure-level vector broadcast to the atoms plus the pair
repulsion per atom. ORB is not rotationally constrained, so rotation is checked to *change*
the features, while translation, permutation and supercells leave them unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import test_cache_dir as cache_dir  # aliased: pytest would collect test_*
from conftest import transformed_variants

from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import extract_features
from umlip_latents.families import environment_python
from umlip_latents.registry import ModelSpec, load_registry
from umlip_latents.testing import contract_model

TOL = 1e-5


def _env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="orb", **(extra or {}))


@pytest.fixture(scope="module")
def test_orb() -> ModelSpec:
    """The family contract's small random ORB v3 (``umlip_latents.testing.CONTRACT_MODELS``), built once."""
    return contract_model("orb", cache_dir())


@pytest.fixture(scope="module")
def features(test_orb, crystals):
    cache = {}

    def get(layer, batch_size=None):
        if (layer, batch_size) not in cache:
            structures, maps = transformed_variants(crystals)
            cache[layer, batch_size] = (extract_features(test_orb, structures, layer=layer, device="cpu",
                                                         batch_size=batch_size), maps)
        return cache[layer, batch_size]

    return get


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _reread_error(fs):
    return np.abs(fs.reread_energy() - fs.energy) / np.bincount(fs.structure_index)


def test_energy_reread_from_last_layer(features, test_orb):
    fs, _ = features("last")
    err = _reread_error(fs)
    assert err.max() <= TOL, f"energy re-read error {err.max():.2e} eV/atom"
    shifted = fs.readout.atom_energies(fs.values + 0.1, fs.species)
    assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)
    # the structure-level block is the same for every atom of a structure
    for k in range(3):
        rows = fs.values[fs.structure_index == k, :-1]
        assert np.abs(rows - rows[0]).max() == 0.0
    # compressed crystals: the ZBL repulsion is on, and its column carries it exactly
    from ase.build import bulk

    squeezed = [bulk("Cu", "fcc", a=2.9), bulk("NaCl", "rocksalt", a=4.2).repeat((1, 1, 2))]
    for i, atoms in enumerate(squeezed):
        atoms.rattle(stdev=0.02, seed=i)
        atoms.info["structure_id"] = f"squeezed-{i}"
    hard = extract_features(test_orb, squeezed, layer="last", device="cpu")
    assert (hard.values[:, -1] > 1e-3).all()
    err = _reread_error(hard)
    assert err.max() <= TOL, f"energy re-read error with repulsion {err.max():.2e} eV/atom"


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals):
    """Every registered ORB is an orb-models loader entry; offline each raises ModelUnavailable naming the file."""
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached_path download cache either
    specs = [s for s in load_registry(derived=False).values() if s.family == "orb"]
    assert len(specs) >= 8 and all(s.source["kind"] == "loader" and s.source["package"] == "orb-models" for s in specs)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
    script = ("import json, sys\nfrom umlip_latents.errors import ModelUnavailable\n"
              "from umlip_latents.families import adapter_class\nfrom umlip_latents.registry import get_spec\n"
              "out = {}\nfor key in sys.argv[1:]:\n    try:\n        out[key] = 'loaded ' + adapter_class('orb').resolve_checkpoint(get_spec(key))\n"
              "    except ModelUnavailable as exc:\n        out[key] = str(exc)\nprint(json.dumps(out))\n")
    proc = subprocess.run([str(environment_python("orb")), "-c", script, *[s.key for s in specs]], check=True,
                          capture_output=True, text=True, env=_env({"HOME": str(tmp_path)}))
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec in specs:
        assert spec.source["filename"] in messages[spec.key] and "checkpoints folder" in messages[spec.key], spec.key
