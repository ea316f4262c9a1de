"""CPU worker processes (``workers=``): same batches, same features, errors come back."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from test_extract import rel_err, tolerance

from umlip_latents.errors import StructureError
from umlip_latents.extract import extract_features
from umlip_latents.extract.base import Adapter, batches, resolve_workers, run_adapter
from umlip_latents.features import Block, Readout
from umlip_latents.registry import get_spec


class Toy(Adapter):
    """Features = (position norm, process id) per atom; fails on a structure id containing 'bad'."""

    default_batch_atoms = 4

    @classmethod
    def open(cls, spec, device, path):
        return cls(spec, device, path)

    @property
    def supported_elements(self):
        return set(range(1, 119))

    log = None  # a file each batch appends a line to, when set

    def forward(self, structures, layer):
        if self.log is not None:
            time.sleep(0.2)
            with open(self.log, "a") as fh:
                fh.write("batch\n")
        for a in structures:
            if "bad" in a.info["structure_id"]:
                raise StructureError(f"structure {a.info['structure_id']}: toy failure")
        rows = [[np.linalg.norm(p), os.getpid()] for a in structures for p in a.positions]
        return np.array(rows), [Block("norm", 0, 1), Block("pid", 1, 2)], np.array([len(a) for a in structures])

    def readout(self):
        return Readout(np.zeros((119, 2)), np.zeros(119))


def copies(structures, n):
    """``n`` copies of ``structures``, each copy's ids made unique (ids must be unique within a call)."""
    out = []
    for k in range(n):
        for atoms in structures:
            atoms = atoms.copy()
            atoms.info["structure_id"] = f"{atoms.info['structure_id']}-copy{k}"
            out.append(atoms)
    return out


@pytest.fixture
def toy():
    return Toy(get_spec("chgnet-0.3.0"), "cpu")


def test_workers_keep_the_order_and_run_in_other_processes(toy, crystals):
    structures = copies(crystals, 4)
    serial = run_adapter(toy, structures)
    parallel = run_adapter(toy, structures, workers=3)
    np.testing.assert_array_equal(parallel.values[:, 0], serial.values[:, 0])
    np.testing.assert_array_equal(parallel.structure_index, serial.structure_index)
    np.testing.assert_array_equal(parallel.energy, serial.energy)
    pids = set(parallel.values[:, 1].astype(int))
    assert os.getpid() not in pids and len(pids) >= 2
    assert parallel.meta["workers"] == 3 and serial.meta["workers"] == 1


def test_an_error_in_a_worker_comes_back_with_its_class_and_message(toy, crystals):
    bad = crystals[0].copy()
    bad.info["structure_id"] = "bad-7"
    with pytest.raises(StructureError, match="bad-7: toy failure"):
        run_adapter(toy, copies(crystals, 3) + [bad], workers=2)


def test_an_interrupt_drops_the_batches_not_started(toy, crystals, tmp_path):
    toy.log = tmp_path / "batches.txt"
    structures = copies(crystals, 16)  # 80 structures in 50 batches of at most 4 atoms

    def interrupt(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapter(toy, structures, workers=2, progress=interrupt)
    time.sleep(1.0)  # let the batches in flight finish
    n_batches = len(list(batches(structures, toy.default_batch_atoms)))
    # the first batch, those running and the few queued to the workers; not the other ~40
    assert len(toy.log.read_text().splitlines()) <= 12 < n_batches


def test_workers_argument():
    assert resolve_workers(1, "cpu") == 1 and resolve_workers(None, "cuda") == 1
    assert resolve_workers("auto", "cuda") == 1
    assert resolve_workers("auto", "cpu") >= 1
    with pytest.raises(ValueError, match="needs device 'cpu'"):
        resolve_workers(2, "cuda")
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            resolve_workers(bad, "cpu")


@pytest.mark.parametrize("key", ["chgnet-0.3.0", "diep", "sevennet-0"])
def test_real_models_give_the_serial_features(key, crystals):
    """Each family in its own environment (SevenNet forks inside its worker process)."""
    structures = copies(crystals, 2)
    serial = extract_features(key, structures, device="cpu", batch_size=20)
    parallel = extract_features(key, structures, device="cpu", batch_size=20, workers=2)
    assert parallel.meta["workers"] == 2
    assert rel_err(parallel.values.astype(np.float64), serial.values.astype(np.float64)) <= tolerance(key, "last")
    np.testing.assert_allclose(parallel.energy, serial.energy, rtol=0, atol=1e-4)
    again = extract_features(key, structures, device="cpu", batch_size=20, workers=2)
    np.testing.assert_array_equal(again.values, parallel.values)  # deterministic for a given setting
