"""The family contract: one parametrized test over every family of ``models/families.yml``.

Each family runs through the public API (``extract_features``, and so its own environment's
worker) on a small real or random model of its own architecture
(:data:`umlip_latents.testing.CONTRACT_MODELS`) and must: re-read its energy from the
last-layer features with its own readout, keep the invariances its table row declares within
the declared tolerance (and see a real change of the structure), give the same features in a
batch as one structure per pass, refuse an element it lacks naming the structure (or skip it
when asked), and say which file is missing when its checkpoint is not there. What is specific
to one family stays in ``tests/test_<family>.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from conftest import test_cache_dir as cache_dir  # aliased: pytest would collect test_*
from conftest import feature_cache

from umlip_latents import testing
from umlip_latents.errors import ModelUnavailable, UnsupportedElement
from umlip_latents.extract import availability, extract_features
from umlip_latents.families import INVARIANCES, get_family, load_families
from umlip_latents.registry import ModelSpec, get_spec

FAMILIES = sorted(load_families())
#: eV/atom: the energy re-read from the features, and the energy of invariant copies
ENERGY_TOL = 1e-5
#: kinds of copies of ``conftest.transformed_variants`` -> the invariance they test
INVARIANCE_OF = {"rotated": "rotation", "translated": "translation", "permuted": "permutation",
                 "supercell": "supercell"}


#: conftest marks the families of other environments ``envs`` and MACE (trained here) ``training``
PARAMS = FAMILIES


@pytest.fixture(scope="module")
def models(request):
    """The contract model of each family, resolved once per module."""
    cache = {}

    def get(family) -> ModelSpec:
        if family not in cache:
            row = testing.CONTRACT_MODELS.get(family)
            assert row is not None, (f"family {family} has no contract model: add a row to "
                                     "umlip_latents.testing.CONTRACT_MODELS")
            if "wheel" in row:
                cache[family] = get_spec(row["wheel"])
            elif "fixture" in row:
                cache[family] = request.getfixturevalue(row["fixture"])
            else:
                cache[family] = testing.contract_model(family, cache_dir())
        return cache[family]

    return get


@pytest.fixture(scope="module")
def features(models, crystals):
    return feature_cache(models, crystals)


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _rows(fs, i):
    return np.asarray(fs.values[fs.structure_index == i], dtype=np.float64)


@pytest.mark.parametrize("family", PARAMS)
def test_energy_reread_from_last_layer(features, family):
    fs, _ = features(family, "last")
    n = np.bincount(fs.structure_index)
    err = np.abs(fs.reread_energy() - fs.energy) / n
    assert err.max() <= ENERGY_TOL, f"{family}: energy re-read error {err.max():.2e} eV/atom"
    # the readout is not trivially satisfied: shifting the features changes the re-read energy
    shifted = fs.readout.atom_energies(np.asarray(fs.values) + 1.0, fs.species)
    assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)


@pytest.mark.parametrize("layer", ["last", "backbone"])
@pytest.mark.parametrize("family", PARAMS)
def test_declared_invariances(features, family, layer):
    """Exact invariances of the family's row hold within its tolerance; a nudged atom changes the features."""
    fam = get_family(family)
    fs, maps = features(family, layer)
    n = np.bincount(fs.structure_index)
    checked = set()
    for kind, base, copy, idx in maps:
        ref, got = _rows(fs, base), _rows(fs, copy)
        err = _rel(got, ref[idx])
        if kind == "nudged":
            assert err >= 3 * fam.tolerance, f"{family} {layer}: nudged structure {base} changes only {err:.2e}"
            continue
        if not fam.exact(INVARIANCE_OF[kind]):
            continue  # declared approximate: learned, not constrained
        checked.add(INVARIANCE_OF[kind])
        assert err <= fam.tolerance, f"{family} {layer}: {kind} copy of {base} differs by {err:.2e} (relative)"
        per_atom = abs(fs.energy[copy] / n[copy] - fs.energy[base] / n[base])
        assert per_atom <= 10 * ENERGY_TOL, f"{family}: {kind} copy of {base} energy differs by {per_atom:.2e} eV/atom"
    assert checked == {k for k in INVARIANCES if fam.exact(k)}


@pytest.mark.parametrize("family", PARAMS)
def test_batch_equals_one_structure_per_pass(features, family):
    batched, _ = features(family, "last")
    single, _ = features(family, "last", batch_size=1)
    assert _rel(np.asarray(single.values, np.float64), np.asarray(batched.values, np.float64)) <= get_family(family).tolerance
    np.testing.assert_allclose(batched.energy, single.energy, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", PARAMS)
def test_unsupported_element_names_the_structure(models, crystals, family):
    bad = Atoms("Og2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[8, 8, 8], pbc=True)
    bad.info["structure_id"] = "oganesson-dimer"
    spec = models(family)
    with pytest.raises(UnsupportedElement, match=f"{spec.key}.*Og.*oganesson-dimer"):
        extract_features(spec, [crystals[0], bad], device="cpu")
    fs = extract_features(spec, [crystals[0], bad], device="cpu", on_unsupported="skip")
    assert fs.structure_ids == [crystals[0].info["structure_id"]] and fs.meta["skipped"] == ["oganesson-dimer"]


@pytest.mark.parametrize("family", PARAMS)
def test_missing_checkpoint_says_which_file_and_where(models, crystals, tmp_path, family):
    spec = models(family)
    missing = ModelSpec(**{**spec.to_dict(), "key": f"{family}-missing",
                           "source": {"kind": "local", "path": str(tmp_path / f"{family}-missing.bin")}})
    ok, why = availability(missing)
    assert not ok and f"{family}-missing.bin" in why and "UMLIP_LATENTS_CHECKPOINTS" in why, why
    with pytest.raises(ModelUnavailable, match=f"{family}-missing.bin"):
        extract_features(missing, crystals[:1], device="cpu")
