"""Feature store: cache keys, atomic writes, resumable sharded extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umlip_latents.extract import extract_features
from umlip_latents.store import get_features, read_entry

MODEL = "chgnet-0.3.0"


class Counting:
    """extract_features that counts calls and can fail on a given call."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = 0, fail_on

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("killed mid-way")
        return extract_features(*args, **kwargs)


@pytest.fixture(scope="module")
def structures(mptrj_small, crystals):
    return list(crystals) + list(mptrj_small)


def test_second_call_reads_the_store(tmp_path, structures):
    ex = Counting()
    a = get_features("t", MODEL, structures=structures, store=tmp_path, shard_size=3, extract=ex, device="cpu")
    n = ex.calls
    b = get_features("t", MODEL, structures=structures, store=tmp_path, shard_size=3, extract=ex, device="cpu")
    assert ex.calls == n == 3
    assert isinstance(b.values, np.memmap)
    np.testing.assert_array_equal(a.values, b.values)
    meta = json.loads((tmp_path / "t" / MODEL / "last" / "meta.json").read_text())
    for key in ("cache_key", "checkpoint_sha256", "versions", "blocks", "structures_sha256", "wall_seconds"):
        assert meta[key], key
    assert b.readout is not None
    assert np.abs(b.reread_energy() - b.energy).max() < 1e-4


def test_changed_input_recomputes(tmp_path, structures):
    ex = Counting()
    get_features("t", MODEL, structures=structures, store=tmp_path, extract=ex, device="cpu")
    moved = [a.copy() for a in structures]
    moved[0].positions[0, 0] += 0.01
    fs = get_features("t", MODEL, structures=moved, store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == 2
    get_features("t", MODEL, "backbone", structures=moved, store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == 3
    assert fs.n_structures == len(moved)


def test_skip_entry_is_not_served_to_raise_and_labels_are_keyed(tmp_path, structures):
    """An entry that skipped structures must not hide the error a 'raise' caller asked for;
    relabelled structures (new subset or energy) rewrite the stored index."""
    from umlip_latents.errors import UnsupportedElement
    from ase import Atoms

    odd = Atoms("Og2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[8, 8, 8], pbc=True)
    odd.info["structure_id"] = "oganesson-dimer"
    mixed = list(structures[:3]) + [odd]
    ex = Counting()
    skipped = get_features("t", MODEL, structures=mixed, store=tmp_path, extract=ex, device="cpu",
                           on_unsupported="skip")
    assert skipped.n_structures == 3 and ex.calls == 1
    with pytest.raises(UnsupportedElement, match="oganesson-dimer"):
        get_features("t", MODEL, structures=mixed, store=tmp_path, extract=ex, device="cpu")
    # an entry that skipped nothing serves both kinds of caller (no second extraction)
    clean = list(structures[:3])
    get_features("t2", MODEL, structures=clean, store=tmp_path, extract=ex, device="cpu")
    calls = ex.calls
    get_features("t2", MODEL, structures=clean, store=tmp_path, extract=ex, device="cpu", on_unsupported="skip")
    assert ex.calls == calls
    relabelled = [a.copy() for a in structures[:3]]
    relabelled[0].info["subset"] = "relabelled"
    get_features("t", MODEL, structures=structures[:3], store=tmp_path, extract=ex, device="cpu")
    calls = ex.calls
    fs = get_features("t", MODEL, structures=relabelled, store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == calls + 1
    assert "relabelled" in set(fs.subsets)


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path, structures):
    ex = Counting(fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        get_features("t", MODEL, structures=structures, store=tmp_path / "a", shard_size=2, extract=ex, device="cpu")
    assert not (tmp_path / "a" / "t" / MODEL / "last").exists()  # nothing half-written in place
    resumed = Counting()
    a = get_features("t", MODEL, structures=structures, store=tmp_path / "a", shard_size=2, extract=resumed,
                     device="cpu")
    assert resumed.calls == len(range(0, len(structures), 2)) - 2  # two shards were already done
    b = get_features("t", MODEL, structures=structures, store=tmp_path / "b", shard_size=2, device="cpu")
    assert (tmp_path / "a" / "t" / MODEL / "last" / "values.npy").read_bytes() == \
        (tmp_path / "b" / "t" / MODEL / "last" / "values.npy").read_bytes()
    np.testing.assert_array_equal(a.species, b.species)
    assert a.structure_ids == b.structure_ids
    leftovers = [p.name for p in (tmp_path / "a" / "t" / MODEL).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_index_tables(tmp_path, structures):
    import pandas as pd

    fs = get_features("t", MODEL, structures=structures, store=tmp_path, device="cpu")
    folder = tmp_path / "t" / MODEL / "last"
    index = pd.read_parquet(folder / "index.parquet")
    assert list(index.columns) == ["structure_index", "structure_id", "atom_index", "Z", "subset"]
    assert len(index) == fs.n_atoms == sum(len(a) for a in structures)
    first = structures[0]
    rows = index[index.structure_id == first.info["structure_id"]]
    assert rows.atom_index.tolist() == list(range(len(first)))
    assert rows.Z.tolist() == first.numbers.tolist()
    again = read_entry(folder, mmap=False)
    np.testing.assert_array_equal(again.values, fs.values)


def test_two_cpu_runs_are_identical(structures):
    a = extract_features(MODEL, structures, device="cpu")
    b = extract_features(MODEL, structures, device="cpu")
    assert a.values.tobytes() == b.values.tobytes()
