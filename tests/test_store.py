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
    assert leftovers == [".last.lock"]  # the writers' lock file stays (by design), nothing else


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


# -- the store never serves a wrong number: input, resume, damage, concurrency ---------------------
def fake_extract(spec, chunk, layer="last", on_unsupported="raise", value=None, **kwargs):
    """A model-free extraction: features (Z, position, 1, 2) per atom, skipping oganesson when asked."""
    from umlip_latents.errors import UnsupportedElement
    from umlip_latents.features import Block, FeatureSet, Readout

    keep = [a for a in chunk if 118 not in a.numbers]
    if len(keep) < len(chunk) and on_unsupported == "raise":
        raise UnsupportedElement(f"model {spec.key} does not support element(s) Og")
    n = [len(a) for a in keep]
    z = np.concatenate([a.numbers for a in keep]).astype(np.int64) if keep else np.zeros(0, np.int64)
    values = np.stack([z, np.arange(len(z)), np.ones(len(z)), np.full(len(z), 2.0)], 1).astype(np.float32)
    if value is not None:
        values[:] = value
    return FeatureSet(values=values, structure_index=np.repeat(np.arange(len(keep)), n), species=z,
                      blocks=[Block("x", 0, 4)], structure_ids=[a.info["structure_id"] for a in keep],
                      meta={"skipped": [a.info["structure_id"] for a in chunk if a not in keep]},
                      energy=np.array([float(len(a)) for a in keep]), readout=Readout(np.ones((119, 4)), np.zeros(119)))


class Fake(Counting):
    def __init__(self, fail_on=None, **options):
        super().__init__(fail_on)
        self.options = options

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("killed mid-way")
        return fake_extract(*args, **kwargs, **self.options)


def entry(tmp_path, label="t"):
    return tmp_path / label / MODEL / "last"


def hidden(tmp_path, label="t"):
    """What an entry's writers left beside it, besides the lock file."""
    return sorted(p.name for p in (tmp_path / label / MODEL).glob(".*") if not p.name.endswith(".lock"))


def test_atoms_on_top_of_each_other_fail_before_any_work(tmp_path, structures):
    from umlip_latents.errors import StructureError

    bad = structures[0].copy()
    bad.positions[1] = bad.positions[0] + [0.1, 0, 0]
    ex = Fake()
    with pytest.raises(StructureError, match=f"structure {bad.info['structure_id']}: atoms 0 and 1"):
        get_features("t", MODEL, structures=[structures[1], bad], store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == 0 and not (tmp_path / "t").exists()
    with pytest.raises(StructureError, match="0.100 Å apart"):
        extract_features(MODEL, [bad], device="cpu")


def test_nan_is_an_error_and_never_stored(tmp_path, structures):
    from umlip_latents.errors import NonFiniteFeatures

    for value in (np.nan, np.inf):
        with pytest.raises(NonFiniteFeatures, match="not stored"):
            get_features("t", MODEL, structures=structures, store=tmp_path, extract=Fake(value=value), device="cpu")
        assert not entry(tmp_path).exists() and hidden(tmp_path) == []
    coincident = structures[1].copy()  # the real model gives NaN here when the distance check is off
    coincident.positions[1] = coincident.positions[0]
    with pytest.raises(NonFiniteFeatures, match=coincident.info["structure_id"]):
        extract_features(MODEL, [coincident], device="cpu", min_distance=None)


def test_duplicate_ids_fail_before_any_work_and_absent_ids_are_assigned(tmp_path, structures):
    from ase import Atoms

    from umlip_latents.errors import StructureError

    twin = structures[1].copy()
    twin.info.update(structure_id=structures[0].info["structure_id"], subset="other", energy=-1.0)
    ex = Fake()
    with pytest.raises(StructureError, match="given twice"):
        get_features("t", MODEL, structures=[structures[0], twin], store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == 0 and not (tmp_path / "t").exists()
    with pytest.raises(StructureError, match="given twice"):
        extract_features(MODEL, [structures[0], twin], device="cpu")
    plain = [Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc) for a in structures[:3]]
    fs = get_features("plain", MODEL, structures=plain, store=tmp_path, shard_size=1, device="cpu")
    assert fs.structure_ids == ["plain-00000", "plain-00001", "plain-00002"]
    assert all("structure_id" not in a.info for a in plain)


def test_resume_with_another_shard_size_holds_exactly_the_structures_given(tmp_path, structures):
    with pytest.raises(KeyboardInterrupt):
        get_features("t", MODEL, structures=structures, store=tmp_path / "a", shard_size=5, extract=Fake(fail_on=2),
                     device="cpu")
    fs = get_features("t", MODEL, structures=structures, store=tmp_path / "a", shard_size=3, extract=Fake(),
                      device="cpu")
    assert fs.structure_ids == [a.info["structure_id"] for a in structures]
    assert fs.n_atoms == sum(len(a) for a in structures)
    fresh = get_features("t", MODEL, structures=structures, store=tmp_path / "b", shard_size=3, extract=Fake(),
                         device="cpu")
    assert (entry(tmp_path / "a") / "values.npy").read_bytes() == (entry(tmp_path / "b") / "values.npy").read_bytes()
    np.testing.assert_array_equal(fs.species, fresh.species)


def test_resume_switching_skip_to_raise_raises(tmp_path, structures):
    from ase import Atoms

    from umlip_latents.errors import UnsupportedElement

    odd = Atoms("Og2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[8, 8, 8], pbc=True)
    odd.info["structure_id"] = "oganesson-dimer"
    mixed = [structures[0], odd] + list(structures[1:4])
    with pytest.raises(KeyboardInterrupt):  # the shard holding the dimer finishes (skipped), then a kill
        get_features("t", MODEL, structures=mixed, store=tmp_path, shard_size=2, extract=Fake(fail_on=2),
                     device="cpu", on_unsupported="skip")
    with pytest.raises(UnsupportedElement, match="Og"):
        get_features("t", MODEL, structures=mixed, store=tmp_path, shard_size=2, extract=Fake(), device="cpu")


DAMAGE = {
    "random bytes": lambda e: (e / "values.npy").write_bytes(
        (e / "values.npy").read_bytes()[:128] + np.random.default_rng(0).bytes((e / "values.npy").stat().st_size - 128)),
    "reversed rows": lambda e: np.save(e / "values.npy", np.load(e / "values.npy")[::-1].copy()),
    "no readout": lambda e: (e / "readout.npz").unlink(),
    "truncated values": lambda e: (e / "values.npy").write_bytes((e / "values.npy").read_bytes()[:-40]),
    "truncated index": lambda e: (e / "index.parquet").write_bytes((e / "index.parquet").read_bytes()[:100]),
    "truncated structures": lambda e: (e / "structures.parquet").write_bytes(b"PAR1"),
    "garbled meta": lambda e: (e / "meta.json").write_text('{"cache_key": '),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_entry_is_recomputed_with_a_warning_or_named(tmp_path, structures, damage, monkeypatch):
    from umlip_latents import store_integrity
    from umlip_latents.errors import EntryDamaged, StoreError, StoreWarning

    ex = Fake()
    first = get_features("t", MODEL, structures=structures, store=tmp_path, extract=ex, device="cpu")
    good = np.array(first.values)
    DAMAGE[damage](entry(tmp_path))
    with pytest.raises(EntryDamaged, match=str(entry(tmp_path))):
        read_entry(entry(tmp_path))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:  # recomputing is not allowed: an error naming the entry
        m.setattr(store_integrity.os, "open", read_only)
        with pytest.raises(EntryDamaged, match="cannot be recomputed.*not writable|cannot be recomputed"):
            get_features("t", MODEL, structures=structures, store=tmp_path, extract=ex, device="cpu")
    with pytest.warns(StoreWarning, match=f"{entry(tmp_path)}.*recomputing"):
        again = get_features("t", MODEL, structures=structures, store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == 2 and again.readout is not None
    np.testing.assert_array_equal(again.values, good)
    with monkeypatch.context() as m:  # an intact entry of a read-only store is served
        m.setattr(store_integrity.os, "open", read_only)
        get_features("t", MODEL, structures=structures, store=tmp_path, extract=ex, device="cpu")
        with pytest.raises(StoreError, match="cannot write the feature store"):
            get_features("u", MODEL, structures=structures, store=tmp_path, extract=ex, device="cpu")
    assert ex.calls == 2


def test_a_damaged_shard_is_recomputed(tmp_path, structures):
    from umlip_latents.errors import StoreWarning

    with pytest.raises(KeyboardInterrupt):
        get_features("t", MODEL, structures=structures, store=tmp_path, shard_size=3, extract=Fake(fail_on=3),
                     device="cpu")
    shard = next((tmp_path / "t" / MODEL).glob(".last.staging-*/shard-000000-000003"))
    (shard / "result.npz").write_bytes(b"\0" * (shard / "result.npz").stat().st_size)
    ex = Fake()
    with pytest.warns(StoreWarning, match="shard-000000-000003.*recomputing"):
        fs = get_features("t", MODEL, structures=structures, store=tmp_path, shard_size=3, extract=ex, device="cpu")
    assert ex.calls == len(range(0, len(structures), 3)) - 1 and fs.n_structures == len(structures)


def test_failed_and_killed_writers_leave_nothing(tmp_path, structures):
    from umlip_latents.errors import UnsupportedElement

    def failing(*args, **kwargs):
        raise UnsupportedElement("no")

    with pytest.raises(UnsupportedElement):
        get_features("t", MODEL, structures=structures, store=tmp_path, extract=failing, device="cpu")
    assert hidden(tmp_path) == [] and not entry(tmp_path).exists()
    get_features("t", MODEL, structures=structures, store=tmp_path, extract=Fake(), device="cpu")
    key = json.loads((entry(tmp_path) / "meta.json").read_text())["cache_key"]
    for stale in (f".last.old-{key[:16]}", f".last.final-{key[:16]}", ".last.old-0123456789abcdef"):
        (tmp_path / "t" / MODEL / stale / "x").mkdir(parents=True)  # what a killed writer leaves
    get_features("t", MODEL, structures=structures, store=tmp_path, extract=Fake(), device="cpu", recompute=True)
    assert hidden(tmp_path) == []


WRITER = """
import json, sys, time
sys.path.insert(0, {tests!r})
from test_store import MODEL, fake_extract
from umlip_latents.datasets import load_dataset
from umlip_latents.store import get_features

def slow(*args, **kwargs):
    with open({log!r}, "a") as fh:
        fh.write("call\\n")
    time.sleep(1.0)
    return fake_extract(*args, **kwargs)

fs = get_features("mpf-alkali-tp", MODEL, limit=6, store={store!r}, shard_size=2, extract=slow, device="cpu")
print(json.dumps([fs.n_structures, fs.values.sum().item()]))
"""


def test_two_processes_extracting_one_entry_do_the_work_once(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "calls.log"
    code = WRITER.format(tests=str(Path(__file__).parent), log=str(log), store=str(tmp_path / "store"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]
    assert log.read_text().count("call") == 3  # three shards, extracted once


def test_a_stricter_distance_check_is_applied_to_a_stored_entry(tmp_path, structures):
    from umlip_latents.errors import StructureError

    close = structures[0].copy()
    close.positions[1] = close.positions[0] + [0.2, 0, 0]
    ex = Fake()
    get_features("t", MODEL, structures=[close], store=tmp_path, extract=ex, device="cpu", min_distance=0.1)
    get_features("t", MODEL, structures=[close], store=tmp_path, extract=ex, device="cpu", min_distance=0.15)
    assert ex.calls == 1  # served: it was made under a stricter check
    with pytest.raises(StructureError, match="0.200 Å apart"):
        get_features("t", MODEL, structures=[close], store=tmp_path, extract=ex, device="cpu")
