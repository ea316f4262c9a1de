"""Datasets: checksums, labels, selection, validation of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from umlip_latents import datasets
from umlip_latents.errors import ChecksumMismatch, DatasetError, StructureError


def test_default_collection_is_labelled_and_has_no_single_atoms():
    frames = datasets.load_dataset("default")
    assert len(frames) > 1900
    subsets = {a.info["subset"] for a in frames}
    assert subsets == {"mptrj-random-1k", "alexandria-random-1k"}
    assert all(len(a) > 1 for a in frames)
    ids = [a.info["structure_id"] for a in frames]
    assert len(set(ids)) == len(ids)
    for a in frames[:50]:
        assert a.info["dataset"] == "default"
        assert np.isfinite(a.info["energy"])
        assert a.arrays["forces"].shape == (len(a), 3)
        assert a.calc is None


def test_limit_is_seeded_and_split_between_members():
    a = datasets.load_dataset("default", limit=10, seed=1)
    b = datasets.load_dataset("default", limit=10, seed=1)
    c = datasets.load_dataset("default", limit=10, seed=2)
    ids = lambda fr: [x.info["structure_id"] for x in fr]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert sum(x.info["subset"] == "mptrj-random-1k" for x in a) == 5


def test_cached_files_match_registry_checksums():
    reg = datasets.registry()
    for name, spec in reg["datasets"].items():
        if "archive" in spec:
            assert datasets.sha256_file(datasets.fetch(name)) == spec["sha256"]


def test_corrupted_cache_is_detected(tmp_path, monkeypatch):
    monkeypatch.setenv("UMLIP_LATENTS_DATA", str(tmp_path))
    target = tmp_path / "datasets" / "mpf-alkali-tp.xyz"
    target.parent.mkdir(parents=True)
    target.write_text("1\nLattice=\"1 0 0 0 1 0 0 0 1\" Properties=species:S:1:pos:R:3\nH 0 0 0\n")
    with pytest.raises(ChecksumMismatch, match="mpf-alkali-tp"):
        datasets.fetch("mpf-alkali-tp")


def test_any_extxyz_path_and_g2(tmp_path):
    src = datasets.fetch("mpf-alkali-tp")
    lines = src.read_text().splitlines()
    n = int(lines[0])
    path = tmp_path / "mine.xyz"
    path.write_text("\n".join(lines[: n + 2]) + "\n")
    frames = datasets.load_dataset(path)
    assert len(frames) == 1 and frames[0].info["dataset"] == "mine" and "energy" in frames[0].info
    g2 = datasets.load_dataset("g2")
    assert len(g2) > 100 and all(not a.pbc.any() for a in g2)


@pytest.mark.parametrize("text, problem", [
    ("3\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 1\n", "cannot be read"),  # truncated
    ("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH nan 0 1\n", "non-finite positions"),
    ("2\nProperties=species:S:1:pos:R:3\nH 0 0 zero\nH 0 0 1\n", "cannot be read"),  # malformed
    ("", "holds no structures"),
])
def test_bad_files_give_one_clear_error(tmp_path, text, problem):
    path = tmp_path / "bad.xyz"
    path.write_text(text)
    with pytest.raises((StructureError, DatasetError), match=problem):
        datasets.load_dataset(path)


def test_empty_structure_is_rejected():
    from ase import Atoms

    with pytest.raises(StructureError, match="empty-1.*no atoms"):
        datasets.validate_structure(Atoms(), "empty-1")


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.load_dataset("no-such-set")


def test_structures_hash_sees_every_input():
    from ase.build import bulk

    a = bulk("Si", "diamond", 5.43)
    h = datasets.structures_hash([a])
    b = a.copy()
    b.positions[0, 0] += 1e-9
    c = a.copy()
    c.pbc = [True, True, False]
    assert len({h, datasets.structures_hash([b]), datasets.structures_hash([c])}) == 3


def test_path_entry_is_verified(tmp_path, monkeypatch):
    import yaml

    from umlip_latents import paths

    src = datasets.fetch("mpf-alkali-tp")
    reg = yaml.safe_load(paths.datasets_file().read_text())
    reg["datasets"]["mine"] = {"description": "user file", "path": str(src), "sha256": datasets.sha256_file(src)}
    reg["datasets"]["tampered"] = {"description": "user file", "path": str(src), "sha256": "0" * 64}
    monkeypatch.setattr(datasets, "registry", lambda: reg)
    assert len(datasets.load_dataset("mine")) == 460
    with pytest.raises(ChecksumMismatch, match="tampered"):
        datasets.load_dataset("tampered")


@pytest.mark.parametrize("change, line", [
    (lambda reg: reg["datasets"]["g2"].pop("source"), "datasets.g2: 'source' is a required property"),
    (lambda reg: reg["datasets"]["mpf-tp"].update(sha256="abc"), "datasets.mpf-tp.sha256: 'abc' does not match"),
    (lambda reg: reg["datasets"]["mpf-tp"].pop("member"), "datasets.mpf-tp: 'member' is a dependency of 'archive'"),
    (lambda reg: reg["collections"]["default"].update(colour="red"),
     "collections.default: Additional properties are not allowed"),
])
def test_schema_rejects_a_bad_dataset_entry(tmp_path, monkeypatch, change, line):
    import yaml

    from umlip_latents import paths

    reg = yaml.safe_load(paths.datasets_file().read_text())
    change(reg)
    (tmp_path / "datasets.yml").write_text(yaml.safe_dump(reg))
    monkeypatch.setattr(paths, "datasets_file", lambda: tmp_path / "datasets.yml")
    with pytest.raises(DatasetError) as err:
        datasets.registry()
    assert str(err.value).startswith(f"datasets.yml: {line}")
    assert "\n" not in str(err.value)


def _pair(distance, cell=None, pbc=False, where=(0.0, 0.0, 0.0), n=2):
    from ase import Atoms

    atoms = Atoms("H2", positions=[where, np.add(where, [distance, 0, 0])], cell=cell, pbc=pbc)[:n]
    atoms.info["structure_id"] = f"pair-{distance}"
    return atoms


@pytest.mark.parametrize("atoms, words", [
    (_pair(0.0), ["pair-0.0", "atoms 0 and 1", "0.000 Å"]),
    (_pair(0.1), ["pair-0.1", "atoms 0 and 1", "0.100 Å"]),
    # 4.9 Å apart in the cell, 0.1 Å through its face: minimum-image distances
    (_pair(4.9, cell=[5, 5, 5], pbc=True, where=(0.05, 1, 1)), ["atoms 0 and 1", "0.100 Å"]),
    (_pair(2.0, cell=[0.3, 5, 5], pbc=True, n=1), ["atom 0 is 0.300 Å from its own periodic image"]),
])
def test_atoms_closer_than_any_bond_are_rejected(atoms, words):
    with pytest.raises(StructureError) as err:
        datasets.validate_structure(atoms)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_distance_limit_keeps_real_bonds_and_is_a_parameter():
    datasets.validate_structure(_pair(0.74))  # H2, the shortest bond there is
    assert datasets.MIN_DISTANCE <= 0.74 * 0.7
    datasets.validate_structure(_pair(0.1), min_distance=0.05)
    datasets.validate_structure(_pair(0.0), min_distance=None)
    with pytest.raises(StructureError, match="min_distance=1.0"):
        datasets.validate_structure(_pair(0.74), min_distance=1.0)


def test_periodic_direction_without_a_cell_is_rejected():
    from ase import Atoms

    atoms = Atoms("NaCl", positions=[[0, 0, 0], [2.5, 0, 0]], pbc=(True, False, False))
    with pytest.raises(StructureError, match="periodic along a"):
        datasets.validate_structure(atoms, "chain")
    atoms.cell = [5, 0, 0]
    datasets.validate_structure(atoms, "chain")  # a cell vector along the periodic direction is enough


@pytest.mark.parametrize("kwargs, problem", [
    (dict(limit=0), "limit must be a positive"), (dict(limit=-1), "limit must be a positive"),
    (dict(limit=2, seed=-1), "seed must be a non-negative"),
])
def test_bad_limit_or_seed(kwargs, problem):
    with pytest.raises(datasets.DatasetError, match=problem):
        datasets.load_dataset("mpf-alkali-tp", **kwargs)


def test_ids_are_unique_and_assigned_deterministically():
    from ase import Atoms

    plain = [Atoms("H", positions=[[0, 0, 0]]) for _ in range(3)]
    named = datasets.with_ids(plain, "mine")
    assert [a.info["structure_id"] for a in named] == ["mine-00000", "mine-00001", "mine-00002"]
    assert all("structure_id" not in a.info for a in plain)  # the caller's atoms are left alone
    named[2].info["structure_id"] = "mine-00000"
    with pytest.raises(StructureError, match="'mine-00000' is given twice .structures 0 and 2"):
        datasets.structure_ids(named)
