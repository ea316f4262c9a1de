"""The PET adapter (``pet`` environment): what is specific to PET beyond the family contract.

The contract (``tests/test_family_contract.py``) runs a small random PET
(:data:`umlip_latents.testing.CONTRACT_MODELS`); here: the registered checkpoints offline.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import extract_features
from umlip_latents.families import environment_python
from umlip_latents.registry import load_registry


def _pet_env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="pet", **(extra or {}))


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals):
    """Every registered PET is a upet loader entry; offline each raises ModelUnavailable naming the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    specs = [s for s in load_registry(derived=False).values() if s.family == "pet"]
    assert len(specs) >= 9 and all(s.source["kind"] == "loader" and s.source["package"] == "upet" for s in specs)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
    script = ("import json, sys\nfrom umlip_latents.errors import ModelUnavailable\n"
              "from umlip_latents.families import adapter_class\nfrom umlip_latents.registry import get_spec\n"
              "out = {}\nfor key in sys.argv[1:]:\n    try:\n        out[key] = 'loaded ' + adapter_class('pet').resolve_checkpoint(get_spec(key))\n"
              "    except ModelUnavailable as exc:\n        out[key] = str(exc)\nprint(json.dumps(out))\n")
    proc = subprocess.run([str(environment_python("pet")), "-c", script, *[s.key for s in specs]], check=True,
                          capture_output=True, text=True, env=_pet_env())
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec in specs:
        assert spec.source["filename"] in messages[spec.key] and "checkpoints folder" in messages[spec.key], spec.key


#: the layout of the uPET releases, at small widths: residual featurizer reading out from every one
#: of 3 GNN layers, a long cutoff with an adaptive neighbour count (metatrain's ``PET`` hypers
#: ``featurizer_type``, ``num_gnn_layers``, ``cutoff``, ``num_neighbors_adaptive``), in an LLPR wrapper
LLPR_RECIPE = dict(seed=1, atomic_types=[1, 3, 8, 11, 12, 14, 17, 29], llpr=True,
                   reference_energies={z: -1.0 - 0.5 * i for i, z in enumerate([1, 3, 8, 11, 12, 14, 17, 29])},
                   d_pet=16, d_head=16, d_node=32, d_feedforward=32, num_heads=2, num_attention_layers=1,
                   num_gnn_layers=3, featurizer_type="residual", cutoff=7.5, num_neighbors_adaptive=16)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_llpr_wrapped_pet_mad_loads_by_unwrapping(suffix, monkeypatch, tmp_path, crystals):
    """A random PET in PET-MAD v1.0.2's wrapper, placed as a user would, extracts through the public API:
    the energy equals the wrapper's own (metatomic's calculator) and re-reads from the last-layer features."""
    from umlip_latents.extract import availability
    from umlip_latents.registry import get_spec
    from umlip_latents.testing import build_in_environment

    spec = get_spec("pet-mad-s-v1.0.2")
    name = spec.source["filename"] if suffix == ".ckpt" else f"{spec.key}.pt"
    build_in_environment("pet", "build_random_pet", tmp_path / name, LLPR_RECIPE)
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    assert availability(spec)[0]
    fs = extract_features(spec, crystals, device="cpu")
    n = np.bincount(fs.structure_index)
    assert np.abs(fs.reread_energy() - fs.energy).max() / n.min() <= 1e-5
    # 3 residual readout layers x [node, edge] x d_head, plus the neighbour-weight column
    assert fs.dim == 3 * 2 * 16 + 1 and [b.name for b in fs.blocks] == ["last_layer_features", "neighbour_weight"]
    script = ("import json, sys\nfrom ase.io import read\nfrom umlip_latents.checks import calculator_energies\n"
              "from umlip_latents.extract import load_adapter\nfrom umlip_latents.registry import get_spec\n"
              "calc = load_adapter(get_spec(sys.argv[1]), 'cpu').calculator()\n"
              "print(json.dumps(calculator_energies(calc, read(sys.argv[2], ':')).tolist()))\n")
    from ase.io import write

    write(tmp_path / "crystals.xyz", crystals, format="extxyz")
    proc = subprocess.run([str(environment_python("pet")), "-c", script, spec.key, str(tmp_path / "crystals.xyz")],
                          check=True, capture_output=True, text=True,
                          env=_pet_env({"UMLIP_LATENTS_CHECKPOINTS": str(tmp_path)}))
    own = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert np.abs(fs.energy - own).max() / n.min() <= 1e-5


def test_a_checkpoint_that_is_not_a_pet_says_what_it_holds():
    from umlip_latents.extract.pet import unwrap

    class Other:
        original_name = "SoapBpnn"

    with pytest.raises(ModelUnavailable, match="SoapBpnn, not a metatrain PET"):
        unwrap(Other())


def test_a_zbl_pet_is_refused_with_its_reason(tmp_path, crystals):
    from umlip_latents.registry import ModelSpec
    from umlip_latents.testing import build_in_environment

    path = tmp_path / "zbl-pet.pt"
    build_in_environment("pet", "build_random_pet", path, dict(seed=0, atomic_types=[11, 17], zbl=True, d_pet=16,
                         d_head=16, d_node=32, d_feedforward=32, num_heads=2, num_attention_layers=1))
    spec = ModelSpec(key="zbl-pet", family="pet", environment="pet", source={"kind": "local", "path": str(path)},
                     training_data="none", functional="none", layers={"last": "x"})
    with pytest.raises(ModelUnavailable, match="zbl-pet.*ZBL pair repulsion.*refuses"):
        extract_features(spec, crystals[1:2], device="cpu")
