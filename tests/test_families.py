"""The family table: schema, what derives from it, and a new family added in its four places only."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import feature_cache

import test_family_contract as contract
from umlip_latents import families, paths
from umlip_latents.errors import RegistryError

#: a complete adapter of a made-up family: per-atom features are a fixed random map of radial
#: sums over neighbours (exactly invariant), the energy is linear in them with per-element biases
TOY_ADAPTER = '''
"""A throw-away family for tests: radial neighbour sums through a fixed random map."""
import numpy as np
from ase.neighborlist import neighbor_list

from umlip_latents.extract.base import Adapter, species_readout
from umlip_latents.features import Block

CUTOFF = 5.0


class ToyAdapter(Adapter):
    def __init__(self, spec, device, path, weights):
        super().__init__(spec, device, path)
        self.w = weights

    @classmethod
    def open(cls, spec, device, path):
        with np.load(path) as d:
            return cls(spec, device, path, {k: d[k] for k in d.files})

    @property
    def supported_elements(self):
        return set(range(1, 95))

    def _features(self, atoms):
        i, d = neighbor_list("id", atoms, CUTOFF)
        widths = self.w["widths"]
        radial = np.zeros((len(atoms), len(widths)))
        np.add.at(radial, i, np.exp(-np.outer(d, 1.0 / widths)) * (1 - d[:, None] / CUTOFF) ** 2)
        hidden = np.tanh(radial @ self.w["w1"] + self.w["embed"][atoms.numbers])
        return hidden, np.tanh(hidden @ self.w["w2"])

    def forward(self, structures, layer):
        parts = [self._features(a) for a in structures]
        x = np.concatenate([p[1] if layer == "last" else p[0] for p in parts])
        r = self.readout()
        sizes = [len(a) for a in structures]
        last = np.concatenate([p[1] for p in parts])
        species = np.concatenate([a.numbers for a in structures])
        e_atom = np.einsum("ij,ij->i", last, r.weight[species]) + r.bias[species]
        energy = np.add.reduceat(e_atom, np.cumsum([0] + sizes[:-1]))
        return x.astype(np.float32), [Block(layer, 0, x.shape[1], "toy " + layer)], energy

    def readout(self):
        return species_readout(range(1, 95), self.w["out"], self.w["bias"][1:95])
'''


def _toy_weights(path, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, widths=np.array([0.5, 1.0, 2.0]), w1=rng.normal(size=(3, 8)), embed=rng.normal(size=(119, 8)),
             w2=rng.normal(size=(8, 6)) / 3, out=rng.normal(size=6), bias=rng.normal(size=119))


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    """A family ``toy`` added in its four places: adapter module, table row, models/toy.yml, pin file."""
    (tmp_path / "src").mkdir()
    adapter = tmp_path / "src" / "toyfam_adapter.py"
    adapter.write_text(TOY_ADAPTER)                                                     # 1. adapter module
    table = yaml.safe_load(paths.families_file().read_text())
    table["toy"] = {"environment": "main", "adapter": "toyfam_adapter:ToyAdapter", "distribution": "numpy",
                    "import": "numpy", "versions": ["numpy", "ase"], "origin": "nowhere (tests)",
                    "checkpoints": "npz of weights", "last": "tanh layer", "backbone": "hidden layer",
                    "invariance": {"rotation": "exact", "translation": "exact", "permutation": "exact",
                                   "supercell": "exact", "tolerance": 1e-5}}
    (tmp_path / "families.yml").write_text(yaml.safe_dump(table))                     # 2. table row
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "toy.yml").write_text(yaml.safe_dump([{                  # 3. models/toy.yml
        "key": "toy-1", "family": "toy", "source": {"kind": "local", "path": "toy-1.npz"},
        "training_data": "none", "functional": "none", "layers": {"last": "tanh", "backbone": "hidden"},
        "description": "a throw-away family", "citation": "none (a test)", "licence": "MIT"}]))
    assert (paths.project_root() / "requirements" / "main.txt").is_file()             # 4. its pin file (main)
    (tmp_path / "checkpoints").mkdir()
    _toy_weights(tmp_path / "checkpoints" / "toy-1.npz")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delitem(sys.modules, "toyfam_adapter", raising=False)  # this test's copy, not an earlier one
    for var, folder in (("FAMILIES", "families.yml"), ("MODELS", "models"), ("CHECKPOINTS", "checkpoints"),
                        ("STORE", "store"), ("FINETUNE", "finetune")):
        monkeypatch.setenv(f"UMLIP_LATENTS_{var}", str(tmp_path / folder))
    return adapter


def test_a_new_family_runs_end_to_end_from_its_four_places(toy_family, crystals):
    """Registry, adapter, availability, the whole family contract and the store, with nothing else edited."""
    from umlip_latents.extract import models_table
    from umlip_latents.registry import get_spec
    from umlip_latents.store import get_features

    spec = get_spec("toy-1")
    assert spec.environment == "main" and families.get_family("toy").tolerance == 1e-5
    assert {r["key"]: r["available"] for r in models_table()} == {"toy-1": True}
    features = feature_cache(lambda family: spec, crystals)
    contract.test_energy_reread_from_last_layer(features, "toy")
    for layer in ("last", "backbone"):
        contract.test_declared_invariances(features, "toy", layer)
    contract.test_batch_equals_one_structure_per_pass(features, "toy")
    contract.test_unsupported_element_names_the_structure(lambda family: spec, crystals, "toy")
    fs = get_features("toy-set", "toy-1", "last", structures=crystals)
    assert fs.meta["versions"]["numpy"] == np.__version__
    np.testing.assert_allclose(fs.reread_energy(), fs.energy, atol=1e-9)


def test_editing_an_adapter_line_recomputes_its_features(toy_family, crystals):
    from umlip_latents.extract import extract_features
    from umlip_latents.store import get_features

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return extract_features(*args, **kwargs)

    first = get_features("toy-set", "toy-1", "last", structures=crystals, extract=counting)
    again = get_features("toy-set", "toy-1", "last", structures=crystals, extract=counting)
    assert len(calls) == 1 and again.meta["cache_key"] == first.meta["cache_key"]
    toy_family.write_text(toy_family.read_text().replace("CUTOFF = 5.0", "CUTOFF = 5.0  # edited"))
    edited = get_features("toy-set", "toy-1", "last", structures=crystals, extract=counting)
    assert len(calls) == 2 and edited.meta["cache_key"] != first.meta["cache_key"]


def test_every_family_has_a_contract_model_and_its_pin_file():
    from umlip_latents.testing import CONTRACT_MODELS

    for name, fam in families.load_families().items():
        assert name in CONTRACT_MODELS, name
        assert fam.requirements.is_file(), f"{name}: {fam.requirements} missing"
        assert fam.adapter_module.startswith("umlip_latents.extract."), name


def test_models_take_their_environment_from_the_table():
    from umlip_latents.registry import load_registry

    for spec in load_registry(derived=False).values():
        assert spec.environment == families.get_family(spec.family).environment, spec.key


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t["pet"].pop("adapter"), "pet: 'adapter' is a required property"),
    (lambda t: t["orb"]["invariance"].update(rotation="sometimes"), "orb.invariance.rotation"),
    (lambda t: t["mace"].update(colour="red"), "Additional properties"),
])
def test_a_malformed_table_is_one_line_naming_the_field(tmp_path, monkeypatch, edit, problem):
    table = yaml.safe_load(paths.families_file().read_text())
    edit(table)
    (tmp_path / "families.yml").write_text(yaml.safe_dump(table))
    monkeypatch.setenv("UMLIP_LATENTS_FAMILIES", str(tmp_path / "families.yml"))
    with pytest.raises(RegistryError, match="families.yml") as err:
        families.load_families()
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_unknown_family_names_the_known_ones():
    with pytest.raises(RegistryError, match="chgnet.*uma"):
        families.get_family("nope")


def test_readme_family_table_is_made_from_the_table():
    readme = (paths.project_root() / "README.md").read_text()
    assert families.readme_table() in readme, "README's family table is stale: paste families.readme_table()"


def test_makefile_environments_are_the_tables():
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    out = subprocess.run(["make", "-s", "--no-print-directory", "print-family-envs"], cwd=paths.project_root(),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == families.environments()


def test_code_digest_covers_the_adapter_module():
    digests = {name: families.code_digest(name) for name in families.load_families()}
    assert len(set(digests.values())) == len(digests)  # each family's own adapter code
