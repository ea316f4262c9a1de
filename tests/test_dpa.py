"""The DPA adapter (``dpa`` environment) on a small DPA-3 built here, and its registered checkpoints.

The model is a randomly initialised deepmd-kit DPA-3 energy model (seeded, small hypers,
from deepmd's own config normalisation and ``get_model``) with per-element reference
energies in its output bias, saved as a deepmd training checkpoint and cached across
sessions. Its ``type_map`` is deliberately *not* sorted by atomic number, so a mapping of
atom types by each structure's sorted elements gives other features (checked below).
DPA-3 sees distances and angles only: rotation, translation, permutation and supercells
leave features and energy unchanged.
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

#: O before H, Cl before Cu ...: not sorted by atomic number (nor alphabetically)
TYPE_MAP = ["O", "H", "Si", "Na", "Cl", "Cu", "Mg", "Li"]
RECIPE = dict(seed=0, type_map=TYPE_MAP, reference_energies={s: -1.0 - 0.5 * i for i, s in enumerate(TYPE_MAP)},
              n_dim=16, e_dim=8, a_dim=8, nlayers=2, neuron=[16, 16], e_sel=40, a_sel=24)
#: e_sel/a_sel above the neighbour counts of the test structures: deepmd keeps the sel nearest
#: neighbours, and among equally distant periodic images which ones is set by atom order
HEADS = ["branch_a", "branch_b"]
TOL = 1e-5


def _dpa_env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="dpa", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                **(extra or {}))


def _run_dpa(script: str, *args, extra_env=None) -> dict:
    """Run ``script`` in the dpa environment; it prints one JSON line last."""
    proc = subprocess.run([str(environment_python("dpa")), "-c", script, *args], capture_output=True, text=True,
                          env=_dpa_env(extra_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spec(path, key="test-dpa", head=None) -> ModelSpec:
    source = {"kind": "local", "path": str(path)}
    if head is not None:
        source["head"] = head
    return ModelSpec(key=key, family="dpa", environment="dpa", source=source,
                     training_data="none (random weights, built in the test session)", functional="none",
                     layers={"last": "fitting net last hidden activation", "backbone": "descriptor"},
                     description="small random DPA-3 for tests; not a foundation model")


@pytest.fixture(scope="module")
def test_models() -> dict:
    """Paths of a small random DPA-3 and of a two-branch multi-task one, built in the dpa environment and cached."""
    key = hashlib.sha256(json.dumps([RECIPE, HEADS], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / f"dpa-{key}"
    paths = {"single": folder / "test-dpa.pt", "multi": folder / "test-dpa-multitask.pt"}
    if not all(p.exists() for p in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        script = ("import json, sys\nfrom umlip_latents.testing import build_random_dpa3\n"
                  "r = json.loads(sys.argv[3])\nbuild_random_dpa3(sys.argv[1], **r)\n"
                  "r.pop('reference_energies'); build_random_dpa3(sys.argv[2], heads=json.loads(sys.argv[4]), **r)\n"
                  "print(json.dumps('ok'))\n")
        _run_dpa(script, str(paths["single"]), str(paths["multi"]), json.dumps(RECIPE), json.dumps(HEADS))
    return paths


@pytest.fixture(scope="module")
def test_dpa(test_models) -> ModelSpec:
    return _spec(test_models["single"])


FEATURES_SCRIPT = """
import json, sys
from pathlib import Path
from umlip_latents.extract import load_adapter
from umlip_latents.extract.base import run_adapter
from umlip_latents.extract.worker import unpack_structures
from umlip_latents.registry import ModelSpec

folder = Path(sys.argv[2])
adapter = load_adapter(ModelSpec(**json.loads(sys.argv[1])), "cpu")
structures = unpack_structures(folder / "structures.npz")
for layer in ("last", "backbone"):
    for batch_size in (None, 1):
        out = folder / f"{layer}-{batch_size}"
        out.mkdir()
        run_adapter(adapter, structures, layer=layer, batch_size=batch_size).save(out)
print(json.dumps("ok"))
"""


@pytest.fixture(scope="module")
def features(test_dpa, crystals, tmp_path_factory):
    """FeatureSets of the transformed crystals for both layers, batched and one structure per pass.

    One process of the dpa environment runs what the extraction worker runs
    (``load_adapter``, ``run_adapter``, ``save_featureset``) for all four, to pay deepmd's
    import once; the worker path itself is exercised by the tests below.
    """
    folder = tmp_path_factory.mktemp("dpa-features")
    structures, maps = transformed_variants(crystals)
    pack_structures(structures, folder / "structures.npz")
    _run_dpa(FEATURES_SCRIPT, json.dumps(test_dpa.to_dict()), str(folder))

    def get(layer, batch_size=None):
        return FeatureSet.load(folder / f"{layer}-{batch_size}"), maps

    return get


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_energy_reread_from_last_layer(features):
    fs, _ = features("last")
    n_atoms = np.bincount(fs.structure_index)
    err = np.abs(fs.reread_energy() - fs.energy) / n_atoms
    assert err.max() <= TOL, f"energy re-read error {err.max():.2e} eV/atom"
    # the per-element bias is part of the readout: a single shared bias is off
    flat = np.einsum("ij,ij->i", fs.values.astype(np.float64), fs.readout.weight[fs.species]) + fs.readout.bias[14]
    assert np.abs(np.bincount(fs.structure_index, flat) - fs.energy).max() > 1e-2
    shifted = fs.readout.atom_energies(fs.values + 0.1, fs.species)
    assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)


TYPE_MAP_SCRIPT = """
import json, sys
import numpy as np
from ase.build import bulk, molecule
from umlip_latents.extract import load_adapter
from umlip_latents.registry import ModelSpec

spec = ModelSpec(**json.loads(sys.argv[1]))
adapter = load_adapter(spec, "cpu")
dp = adapter.deep_pot
out = {}
structures = [("MgO", bulk("MgO", "rocksalt", a=4.21)), ("NaCl", bulk("NaCl", "rocksalt", a=5.64)),
              ("Cu3Si", bulk("Cu", "fcc", a=3.6, cubic=True)), ("H2O (open)", molecule("H2O"))]
for name, atoms in structures:
    if name == "Cu3Si":
        atoms.numbers[0] = 14
    atoms.rattle(0.05, seed=3)
    last, _, energy = adapter.forward([atoms], "last")
    backbone, _, _ = adapter.forward([atoms], "backbone")
    args = (atoms.positions.reshape(1, -1), atoms.cell.array.reshape(1, -1) if atoms.pbc.all() else None)
    right = [dp.get_type_map().index(s) for s in atoms.get_chemical_symbols()]
    elements = sorted(set(atoms.get_chemical_symbols()))
    wrong = [elements.index(s) for s in atoms.get_chemical_symbols()]  # the pitfall
    res = {}
    for label, atype in (("type_map", right), ("sorted", wrong)):
        desc, hidden, _ = dp.deep_eval.eval_embedding(*args, atype, dtype="fp64")
        e = float(np.asarray(dp.eval(*args, atype)[0]).ravel()[0])
        res[label] = {"last": float(np.abs(hidden[0] - last).max() / np.abs(last).max()),
                      "backbone": float(np.abs(desc[0] - backbone).max() / np.abs(backbone).max()),
                      "energy": abs(e - float(energy[0])) / len(atoms)}
    from deepmd.calculator import DP
    calc_atoms = atoms.copy()
    calc_atoms.calc = DP(adapter.path)
    res["ase_calculator_energy"] = abs(calc_atoms.get_potential_energy() - float(energy[0])) / len(atoms)
    out[name] = res
    # reordering atoms (and so the order in which elements first appear) leaves the features alone
    order = np.argsort(-atoms.numbers, kind="stable")
    moved, _, moved_energy = adapter.forward([atoms[order]], "last")
    out[name]["reordered"] = float(np.abs(moved - last[order]).max() / np.abs(last).max())
    out[name]["reordered_energy"] = abs(float(moved_energy[0] - energy[0])) / len(atoms)
# periodic and open structures in one batch: each as it is alone
batch = [atoms for _, atoms in structures][::-1]
_, _, together = adapter.forward(batch, "last")
alone = [float(adapter.forward([atoms], "last")[2][0]) for atoms in batch]
out["mixed_boundaries_batch"] = float(np.max(np.abs(together - np.array(alone)) / np.abs(alone)))
print(json.dumps(out))
"""


def test_atom_types_follow_the_model_type_map(test_dpa):
    """Types come from the model's type_map (not sorted by Z here): equal to deepmd's own evaluation
    with type_map types, and different from the sorted-elements mapping, which would go unnoticed."""
    from ase.data import atomic_numbers

    zs = [atomic_numbers[s] for s in TYPE_MAP]
    assert zs != sorted(zs), "the test model's type_map must not be sorted by atomic number"
    res = _run_dpa(TYPE_MAP_SCRIPT, json.dumps(test_dpa.to_dict()))
    assert res.pop("mixed_boundaries_batch") <= TOL  # relative: float32 sums in another padding
    for name, r in res.items():
        for what in ("last", "backbone", "energy"):
            assert r["type_map"][what] <= TOL, f"{name} {what}: differs from DeepPot with type_map types"
            assert r["sorted"][what] > 1e-3, f"{name} {what}: sorted-element types give the same result"
        assert r["ase_calculator_energy"] <= TOL, f"{name}: differs from deepmd's ASE calculator"
        assert r["reordered"] <= TOL and r["reordered_energy"] <= TOL, f"{name}: atom order changes the result"


MULTITASK_SCRIPT = """
import json, sys
from ase.build import bulk
from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import load_adapter
from umlip_latents.registry import ModelSpec

atoms = bulk("NaCl", "rocksalt", a=5.64)
atoms.rattle(0.05, seed=1)
out = {}
for raw in json.loads(sys.argv[1]):
    spec = ModelSpec(**raw)
    try:
        adapter = load_adapter(spec, "cpu")
        out[str(spec.source.get("head"))] = float(adapter.forward([atoms], "last")[2][0])
    except ModelUnavailable as exc:
        out[str(spec.source.get("head"))] = str(exc)
# a frozen (TorchScript) .pth of the single-task model, deepmd's own `dp --pt freeze`
from deepmd.pt.entrypoints.main import freeze
single = ModelSpec(**json.loads(sys.argv[2]))
frozen = dict(single.to_dict(), source={"kind": "local", "path": sys.argv[3]})
freeze(single.source["path"], sys.argv[3])
for label, spec in (("pt", single), ("pth", ModelSpec(**frozen))):
    values, _, energy = load_adapter(spec, "cpu").forward([atoms], "last")
    out[label] = [float(energy[0])] + values.ravel().tolist()
print(json.dumps(out))
"""


def test_checkpoint_formats(test_models, test_dpa, tmp_path):
    """A multi-task checkpoint (like DPA-3.1-3M) loads one branch per ``source.head``, and no or an
    unknown head is a ModelUnavailable naming the branches; a frozen ``.pth`` gives what its ``.pt`` gives."""
    specs = [_spec(test_models["multi"], key=f"test-dpa-{h}", head=h).to_dict() for h in HEADS + [None, "nope"]]
    res = _run_dpa(MULTITASK_SCRIPT, json.dumps(specs), json.dumps(test_dpa.to_dict()), str(tmp_path / "frozen.pth"))
    np.testing.assert_allclose(res["pth"], res["pt"], rtol=0, atol=1e-6)
    assert isinstance(res["branch_a"], float) and isinstance(res["branch_b"], float)
    assert abs(res["branch_a"] - res["branch_b"]) > 1e-3, "the two branches gave the same energy"
    for bad in ("None", "nope"):
        assert isinstance(res[bad], str) and "branch_a" in res[bad] and "branch_b" in res[bad], res[bad]


OFFLINE_SCRIPT = """
import json, sys
from umlip_latents.errors import ModelUnavailable
from umlip_latents.families import adapter_class
from umlip_latents.registry import get_spec

out = {}
for key in sys.argv[1:]:
    try:
        out[key] = "loaded " + adapter_class("dpa").resolve_checkpoint(get_spec(key))
    except ModelUnavailable as exc:
        out[key] = str(exc)
# the download path itself, with every source unreachable (a closed port on this machine)
import os
os.environ.pop("HF_HUB_OFFLINE")
from deepmd.pretrained import download
spec = get_spec(sys.argv[1])
download.MODEL_REGISTRY[spec.source["name"]]["urls"] = ["https://127.0.0.1:9/" + spec.source["filename"]]
try:
    out["download"] = "loaded " + adapter_class("dpa").resolve_checkpoint(spec)
except ModelUnavailable as exc:
    out["download"] = str(exc)
print(json.dumps(out))
"""


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals):
    """The DPA-3.1-3M branches are deepmd-kit loader entries; offline each raises ModelUnavailable naming the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # deepmd's download cache lives under ~/.cache/deepmd
    specs = [s for s in load_registry(derived=False).values() if s.family == "dpa"]
    heads = {s.source.get("head") for s in specs}
    assert {"MP_traj_v024_alldata_mixu", "Omat24", "OC20M", "ODAC23", "SPICE2"} <= heads
    assert all(s.source["kind"] == "loader" and s.source["name"] == "DPA-3.1-3M" for s in specs)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
    messages = _run_dpa(OFFLINE_SCRIPT, *[s.key for s in specs])
    for spec in specs:
        msg = messages[spec.key]
        assert spec.source["filename"] in msg and "checkpoints folder" in msg, (spec.key, msg)
    assert "could not download" in messages["download"] and specs[0].source["filename"] in messages["download"]
    assert "checkpoints folder" in messages["download"], messages["download"]
