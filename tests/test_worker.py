"""Families in other environments: the subprocess path and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import extract_features
from umlip_latents.extract.worker import pack_structures, unpack_structures
from umlip_latents.registry import ModelSpec, get_spec


def test_structures_travel_exactly(tmp_path, crystals):
    pack_structures(crystals, tmp_path / "s.npz")
    back = unpack_structures(tmp_path / "s.npz")
    for a, b in zip(crystals, back):
        assert a.positions.tobytes() == b.positions.tobytes()
        assert (a.numbers == b.numbers).all() and (a.pbc == b.pbc).all()
        assert a.info["structure_id"] == b.info["structure_id"]
        assert "charge" not in b.info and "spin" not in b.info  # absent stays absent: the model's default


def test_charge_and_spin_travel_and_key_the_store(tmp_path, crystals):
    from umlip_latents.datasets import structures_hash

    ions = [a.copy() for a in crystals[:2]]
    ions[0].info.update(charge=-1, spin=2)
    ions[1].info.update(charge=0.5)
    pack_structures(ions, tmp_path / "s.npz")
    back = unpack_structures(tmp_path / "s.npz")
    assert (back[0].info["charge"], back[0].info["spin"]) == (-1, 2)
    assert back[1].info["charge"] == 0.5 and "spin" not in back[1].info
    assert structures_hash(ions) != structures_hash(crystals[:2])


def test_missing_environment_says_how_to_make_it(crystals):
    spec = ModelSpec(**{**get_spec("sevennet-0").to_dict(), "key": "x", "environment": "no-such-env"})
    with pytest.raises(ModelUnavailable, match="make setup"):
        extract_features(spec, crystals[:1])


def test_child_error_comes_back_with_its_message(crystals, tmp_path):
    spec = ModelSpec(**{**get_spec("sevennet-0").to_dict(), "key": "sevennet-missing",
                        "source": {"kind": "local", "path": str(tmp_path / "nope.pth")}})
    with pytest.raises(ModelUnavailable) as err:
        extract_features(spec, crystals[:1], device="cpu")
    assert "sevennet-missing" in str(err.value) and "[in environment sevenn]" in str(err.value)


def test_sevenn_energy_equals_its_own_calculator(crystals, tmp_path):
    """The batched pass in the child is the real model: energies equal sevenn's ASE calculator."""
    import json
    import subprocess

    from umlip_latents.families import environment_python

    fs = extract_features("sevennet-0", crystals, device="cpu")
    script = (
        "import json, sys\n"
        "from ase.io import read\n"
        "from umlip_latents.extract import load_adapter\n"
        "calc = load_adapter('sevennet-0', 'cpu').calculator()\n"
        "out = []\n"
        "for a in read(sys.argv[1], ':'):\n"
        "    a.calc = calc; out.append(a.get_potential_energy())\n"
        "print(json.dumps(out))\n"
    )
    from ase.io import write

    path = tmp_path / "crystals.xyz"
    write(path, crystals, format="extxyz")
    proc = subprocess.run([str(environment_python("sevenn")), "-c", script, str(path)], capture_output=True,
                          text=True, check=True)
    ref = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    n = np.array([len(a) for a in crystals])
    assert np.abs(fs.energy - ref).max() / n.min() < 1e-5


def _live_worker(name="sevenn"):
    from umlip_latents.extract import worker

    return worker.live_worker(name)


def test_worker_is_kept_between_calls_and_replaced_when_needed(crystals, monkeypatch):
    """One process answers repeated calls; a dead or unexpectedly failing one is replaced."""
    from umlip_latents.errors import ExtractionFailed

    first = extract_features("sevennet-0", crystals[:1], device="cpu")
    pid = _live_worker().pid
    again = extract_features("sevennet-0", crystals[:1], device="cpu")
    assert _live_worker().pid == pid
    np.testing.assert_array_equal(first.values, again.values)
    # an unexpected exception in the child comes back as ExtractionFailed with its message ...
    with pytest.raises(ExtractionFailed, match="ValueError: model sevennet-0 offers layers") as err:
        extract_features("sevennet-0", crystals[:1], layer="middle", device="cpu")
    # ... with the child's traceback attached (attribute, and a note under the parent's traceback)
    assert "Traceback" in err.value.remote_traceback and "run_adapter" in err.value.remote_traceback
    assert any("traceback in environment sevenn" in n for n in err.value.__notes__)
    # ... and the next call starts a new worker
    extract_features("sevennet-0", crystals[:1], device="cpu")
    assert _live_worker().pid != pid
    pid = _live_worker().pid
    _live_worker().kill()
    _live_worker().wait()
    np.testing.assert_array_equal(extract_features("sevennet-0", crystals[:1], device="cpu").values, first.values)
    assert _live_worker().pid != pid
    # the environment variables choose checkpoints and folders: a change starts a new worker
    pid = _live_worker().pid
    monkeypatch.setenv("UMLIP_LATENTS_TEST_MARKER", "1")
    extract_features("sevennet-0", crystals[:1], device="cpu")
    assert _live_worker().pid != pid
    # ... but a variable outside the allow-list (worker.KEY_VARIABLES) does not
    pid = _live_worker().pid
    monkeypatch.setenv("SOME_UNRELATED_SETTING", "1")
    extract_features("sevennet-0", crystals[:1], device="cpu")
    assert _live_worker().pid == pid


def test_stopped_worker_times_out_with_a_clear_message(crystals):
    """A worker that never answers (SIGSTOP) makes the call fail within its timeout; the worker is killed."""
    import signal
    import time

    from umlip_latents.extract.worker import WorkerTimeout

    extract_features("sevennet-0", crystals[:1], device="cpu")
    proc = _live_worker()
    proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(WorkerTimeout, match="did not answer 'extract' within 3 s.*UMLIP_LATENTS_WORKER_TIMEOUT"):
        extract_features("sevennet-0", crystals[:1], device="cpu", timeout=3)
    assert time.monotonic() - t0 < 30
    assert proc.wait(timeout=10) != 0 and _live_worker() is None
    # the next call starts a fresh worker and works
    assert extract_features("sevennet-0", crystals[:1], device="cpu").n_structures == 1


def test_timeout_from_the_environment(monkeypatch):
    from umlip_latents.extract.worker import default_timeout

    assert default_timeout("extract", 1000) > default_timeout("extract", 10) >= default_timeout("versions")
    monkeypatch.setenv("UMLIP_LATENTS_WORKER_TIMEOUT", "7")
    assert default_timeout("extract", 10**6) == 7
    monkeypatch.setenv("UMLIP_LATENTS_WORKER_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="UMLIP_LATENTS_WORKER_TIMEOUT"):
        default_timeout("extract")


def test_ops_other_than_extract_run_in_the_family_environment(tmp_path):
    """availability, versions and supported elements come from the adapter in its own environment."""
    from umlip_latents.extract import availability
    from umlip_latents.extract.worker import call

    spec = get_spec("sevennet-0")
    assert availability(spec) == (True, "bundled in the sevenn wheel (environment sevenn)")
    missing = ModelSpec(**{**spec.to_dict(), "key": "sevennet-missing",
                           "source": {"kind": "local", "path": str(tmp_path / "nope.pth")}})
    ok, why = availability(missing)
    assert not ok and "nope.pth" in why and "UMLIP_LATENTS_CHECKPOINTS" in why
    versions = call("sevenn", "versions", {"spec": spec.to_dict(), "device": "cpu"})
    assert versions["sevenn"] and versions["e3nn"].split(".")[:2] != ["0", "4"]  # e3nn>=0.5 there, 0.4.4 here
    elements = call("sevenn", "supported_elements", {"spec": spec.to_dict(), "device": "cpu"})
    assert {1, 8, 14, 29} <= set(elements) and all(isinstance(z, int) for z in elements)
    with pytest.raises(ValueError, match="unknown worker op"):
        call("sevenn", "train", {})


def test_one_process_per_call_when_asked(crystals, monkeypatch):
    from umlip_latents.extract import worker

    monkeypatch.setenv("UMLIP_LATENTS_KEEP_WORKERS", "0")
    worker.close_workers()
    fs = extract_features("sevennet-0", crystals[:1], device="cpu")
    assert fs.n_structures == 1 and worker.live_worker("sevenn") is None
