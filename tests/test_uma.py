"""The UMA adapter (``uma`` environment) on a small UMA built here, and its registered checkpoints.

The model is a randomly initialised fairchem UMA in UMA-S-1.1's layout (eSCN-MD backbone with
mixture of linear experts, one energy head shared by the five tasks), seeded, with per-task
element reference energies, saved as a fairchem inference checkpoint and cached across
sessions. It is loaded with fairchem's own ``load_predict_unit``. The backbone is
SO(3)-equivariant, so its invariant features do not change under rotation.

Starting the ``uma`` environment costs ~15 s (fairchem's imports), so the in-process runs
(both layers, batched and one structure per batch, two tasks, the cross-check against
fairchem's calculator) share one child process; the worker path is exercised once.
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

from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import extract_features
from umlip_latents.extract.worker import pack_structures
from umlip_latents.families import environment_python
from umlip_latents.features import FeatureSet
from umlip_latents.registry import ModelSpec, load_registry

TYPES = [1, 3, 8, 11, 12, 14, 17, 29]
RECIPE = dict(seed=0, reference_energies={"omat": {z: -1.0 - 0.5 * i for i, z in enumerate(TYPES)},
                                          "omol": {z: -2.0 - 0.25 * i for i, z in enumerate(TYPES)}},
              sphere_channels=16, hidden_channels=16, edge_channels=16, num_distance_basis=16, num_layers=2,
              num_experts=4, lmax=2, mmax=2, cutoff=6.0, rmsd=1.423)
TOL = 1e-5
#: (task, layer, batch_size) runs made in one child process
RUNS = [("omat", "last", None), ("omat", "backbone", None), ("omat", "last", 1), ("omat", "backbone", 1),
        ("omol", "last", None), ("omol", "backbone", None)]

CHILD = """
import json, sys
from pathlib import Path
from umlip_latents.extract import load_adapter
from umlip_latents.errors import ModelUnavailable, UnsupportedElement
from umlip_latents.extract.base import run_adapter
from umlip_latents.extract.uma import UmaAdapter
from umlip_latents.extract.worker import unpack_structures
from umlip_latents.registry import ModelSpec, get_spec

out, spec_json, runs = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
structures = unpack_structures(out / "structures.npz")
adapters, info = {}, {}
for task, layer, batch in runs:
    if task not in adapters:
        adapters[task] = load_adapter(ModelSpec(**dict(spec_json, key="test-uma-" + task, options={"task": task})), "cpu")
    folder = out / f"{task}-{layer}-{batch}"
    folder.mkdir()
    run_adapter(adapters[task], structures, layer=layer, batch_size=batch).save(folder)
atoms = structures[0].copy()
atoms.calc = adapters["omat"].calculator()
info["calculator_energy"] = float(atoms.get_potential_energy())
bad = unpack_structures(out / "bad.npz")
try:
    run_adapter(adapters["omat"], bad)
except UnsupportedElement as exc:
    info["unsupported"] = str(exc)
molecule = structures[0].copy()
charged = molecule.copy()
charged.info.update(charge=1, spin=2)
info["omol_charge_spin"] = adapters["omol"].forward([molecule, charged], "last")[2].tolist()
info["registered"] = {}
for key in sys.argv[4:]:  # offline (HF_HUB_OFFLINE=1, empty checkpoints folder)
    spec = get_spec(key)
    try:
        UmaAdapter.load(spec, "cpu")
        message = "loaded"
    except ModelUnavailable as exc:
        message = str(exc)
    info["registered"][key] = [message, UmaAdapter.availability(spec)[0]]
(out / "info.json").write_text(json.dumps(info))
"""


def _uma_env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="uma", **(extra or {}))


def _run_uma(args, extra_env=None):
    proc = subprocess.run([str(environment_python("uma")), *args], capture_output=True, text=True,
                          env=_uma_env(extra_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _spec(path, task="omat") -> ModelSpec:
    return ModelSpec(key=f"test-uma-{task}", family="uma", environment="uma",
                     source={"kind": "local", "path": str(path)}, options={"task": task},
                     training_data="none (random weights, built in the test session)", functional="none",
                     layers={"last": "energy head last hidden layer", "backbone": "l=0 node embedding"},
                     description="small random UMA (UMA-S-1.1 layout) for tests; not a foundation model")


@pytest.fixture(scope="module")
def uma_file():
    """A small random UMA checkpoint written with fairchem in the uma environment, cached across sessions."""
    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"uma-{key}" / "test-uma.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        script = ("import json, sys\nfrom umlip_latents.testing import build_random_uma\n"
                  "r = json.loads(sys.argv[2])\n"
                  "r['reference_energies'] = {t: {int(z): e for z, e in v.items()} for t, v in r['reference_energies'].items()}\n"
                  "build_random_uma(sys.argv[1], **r)\n")
        _run_uma(["-c", script, str(path), json.dumps(RECIPE)])
    return path


def _offline_env(tmp) -> dict:
    """No hub access, an empty fairchem cache and an empty checkpoints folder."""
    return {"HF_HUB_OFFLINE": "1", "FAIRCHEM_CACHE_DIR": str(tmp / "fairchem"), "UMLIP_LATENTS_CHECKPOINTS": str(tmp)}


def _registered():
    return [s for s in load_registry(derived=False).values() if s.family == "uma"]


@pytest.fixture(scope="module")
def runs(uma_file, crystals, tmp_path_factory):
    """FeatureSets of :data:`RUNS` on the transformed crystals, from one child process, plus checks.

    The child runs offline (:func:`_offline_env`; the test model is an absolute path) and also
    tries to load every registered UMA entry.
    """
    from ase import Atoms

    out = tmp_path_factory.mktemp("uma-runs")
    structures, maps = transformed_variants(crystals)
    pack_structures(structures, out / "structures.npz")
    bad = Atoms("OgH", positions=[[0, 0, 0], [0, 0, 1.5]], cell=[8, 8, 8], pbc=True)
    bad.info["structure_id"] = "bad-structure-42"
    pack_structures([crystals[0], bad], out / "bad.npz")
    _run_uma(["-c", CHILD, str(out), json.dumps(_spec(uma_file).to_dict()), json.dumps(RUNS),
              *[s.key for s in _registered()]], _offline_env(tmp_path_factory.mktemp("uma-offline")))
    sets = {(t, layer, b): FeatureSet.load(out / f"{t}-{layer}-{b}") for t, layer, b in RUNS}
    return sets, maps, json.loads((out / "info.json").read_text())


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("task", ["omat", "omol"])
def test_energy_reread_from_last_layer(task, runs):
    sets, _, _ = runs
    fs = sets[task, "last", None]
    n_atoms = np.bincount(fs.structure_index)
    err = np.abs(fs.reread_energy() - fs.energy) / n_atoms
    assert err.max() <= TOL, f"{task}: energy re-read error {err.max():.2e} eV/atom"
    # the per-element reference energies are part of the readout
    refs = RECIPE["reference_energies"][task]
    offset = fs.readout.bias[list(refs)] - np.array(list(refs.values()))
    assert np.ptp(offset) < 1e-9, "bias minus reference energy must be the same head bias for every element"
    shifted = fs.readout.atom_energies(fs.values + 0.1, fs.species)
    assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)


def test_energy_matches_fairchem_calculator(runs):
    sets, _, info = runs
    fs = sets["omat", "last", None]
    assert fs.energy[0] == pytest.approx(info["calculator_energy"], abs=1e-5)


def test_task_heads_share_weights_not_features(runs):
    """The task enters the backbone (dataset embedding, expert mixture); the head MLP is shared."""
    sets, _, _ = runs
    for layer in ("last", "backbone"):
        a, b = sets["omat", layer, None], sets["omol", layer, None]
        assert a.values.shape == b.values.shape
        assert _rel(b.values.astype(np.float64), a.values.astype(np.float64)) > 1e-3, layer
    ra, rb = sets["omat", "last", None].readout, sets["omol", "last", None].readout
    np.testing.assert_array_equal(ra.weight, rb.weight)  # one energy head for every task
    assert not np.allclose(ra.bias[TYPES], rb.bias[TYPES])  # per-task element references
    assert np.abs(sets["omat", "last", None].energy - sets["omol", "last", None].energy).max() > 1e-2


def test_omol_reads_charge_and_spin(runs):
    """The same atoms with charge 1 and spin 2 (atoms.info) get another omol energy than the defaults (0, 1)."""
    neutral, charged = runs[2]["omol_charge_spin"]
    assert abs(neutral - charged) > 1e-4


def test_worker_path_equals_in_process(uma_file, crystals, runs):
    sets, _, _ = runs
    structures, _ = transformed_variants(crystals)
    fs = extract_features(_spec(uma_file), structures, layer="last", device="cpu")
    ref = sets["omat", "last", None]
    np.testing.assert_array_equal(fs.values, ref.values)
    np.testing.assert_array_equal(fs.energy, ref.energy)
    assert fs.meta["versions"]["uma_task"] == "omat" and fs.meta["checkpoint_sha256"]


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals, runs):
    """The five UMA-S-1.1 task heads share one fairchem loader entry; offline each raises ModelUnavailable."""
    specs = _registered()
    assert sorted(s.options["task"] for s in specs) == sorted(["omat", "omol", "oc20", "odac", "omc"])
    assert all(s.source["kind"] == "loader" and s.source["name"] == "uma-s-1p1" for s in specs)
    for spec in specs:
        msg, available = runs[2]["registered"][spec.key]
        assert spec.source["filename"] in msg and "checkpoints folder" in msg and "facebook/UMA" in msg, spec.key
        assert available is False
    # and through the worker, as a caller in the main environment sees it
    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
