"""MACE fine-tuning back end: the four protocols on a tiny MACE pretrained here.

The base is a small MACE trained from scratch on 30 MPtrj frames (cached in the test cache
folder); the fine-tuning data are alkali compounds of ``mpf-alkali-tp`` whose elements the
base knows. Every run goes through :func:`umlip_latents.finetune.finetune`.
"""

from __future__ import annotations

import numpy as np
import pytest

from umlip_latents.errors import DatasetError, ModelUnavailable, UnsupportedElement
from umlip_latents.extract import extract_features
from umlip_latents.finetune import finetune
from umlip_latents.registry import get_spec, load_registry

from conftest import test_cache_dir as cache_dir  # aliased: pytest would collect test_*

#: the tiny base (part of its cache key through pretrain_base's settings)
BASE_HYPER = dict(seed=0, epochs=4, num_channels=8, max_L=0, num_interactions=2, correlation=2)
RUN = dict(epochs=2, lr=1e-2, seed=0, batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def finetune_cache():
    """Pretrained base and its models.yml live in the test cache, not in the project's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMLIP_LATENTS_FINETUNE", str(cache_dir() / "finetune"))
        yield


@pytest.fixture(scope="module")
def data():
    """Pretraining frames covering every element of the fine-tuning frames."""
    from umlip_latents.datasets import load_dataset

    mptrj = [a for a in load_dataset("mptrj-random-1k") if len(a) <= 12]
    known = set().union(*(set(a.numbers) for a in mptrj))
    alkali = [a for a in load_dataset("mpf-alkali-tp") if len(a) <= 8 and set(a.numbers) <= known][:16]
    need = set().union(*(set(a.numbers) for a in alkali))
    pre = []
    for atoms in mptrj:  # greedy cover of the fine-tuning elements, then fill up to 30
        covered = set().union(set(), *(set(a.numbers) for a in pre))
        if set(atoms.numbers) & (need - covered):
            pre.append(atoms)
    pre += [a for a in mptrj if all(a is not b for b in pre)][:30 - len(pre)]
    assert need <= set().union(*(set(a.numbers) for a in pre))
    return {"pretrain": pre, "train": alkali[:12], "valid": alkali[12:], "mptrj": mptrj}


@pytest.fixture(scope="module")
def base(data):
    from umlip_latents.finetune.mace import pretrain_base

    return pretrain_base(data["pretrain"], **BASE_HYPER)


def _run(base, data, protocol, workdir, **kw):
    return finetune("mace", base, data["train"], data["valid"], protocol, workdir=workdir, **{**RUN, **kw})


def _state(spec):
    import torch

    from umlip_latents.registry import local_checkpoint

    return torch.load(local_checkpoint(spec), map_location="cpu", weights_only=False).state_dict()


@pytest.fixture(scope="module")
def ff(base, data, tmp_path_factory):
    return _run(base, data, "ff", tmp_path_factory.mktemp("ff"))


def test_pretrained_base_is_registered(base):
    assert base.derived["protocol"] == "pretrain" and base.parent is None
    assert "not a foundation model" in base.description
    assert load_registry()[base.key] == base


def test_ff_trains_and_rereads_energy(base, ff, data):
    structs = data["valid"] + data["train"][:2]
    fb = extract_features(base, structs, layer="last", device="cpu")
    fs = extract_features(ff.final, structs, layer="last", device="cpu")
    assert fs.values.shape == fb.values.shape
    assert not np.allclose(fs.values, fb.values)
    assert ff.final.parent == base.key and ff.final.derived["protocol"] == "ff"
    n_atoms = np.array([len(a) for a in structs])
    np.testing.assert_allclose(fs.reread_energy() / n_atoms, fs.energy / n_atoms, atol=1e-5)
    assert [s.derived["epoch"] for s in ff.epochs] == [1, 2]
    assert [h["epoch"] for h in ff.history] == [0, 1, 2]  # epoch 0: mace's evaluation before training
    assert ff.history[0]["train_loss"] is None and np.isfinite(ff.history[0]["valid_loss"])
    assert all(np.isfinite(h["valid_rmse_e_per_atom"]) and np.isfinite(h["train_loss"]) for h in ff.history[1:])
    valid = [h["valid_loss"] for h in ff.history[1:]]
    assert ff.best_epoch == int(np.argmin(valid)) + 1 and ff.final == ff.epochs[ff.best_epoch - 1]


def test_epoch_models_differ_and_last_is_maces(ff):
    first, last = _state(ff.epochs[0]), _state(ff.epochs[-1])
    assert any(not np.array_equal(first[k].numpy(), last[k].numpy()) for k in first)
    final = ff.workdir / "run.model"
    import torch

    ref = torch.load(final, map_location="cpu", weights_only=False).state_dict()
    assert all(np.array_equal(ref[k].numpy(), last[k].numpy()) for k in ref)


def test_e0s_refit_on_the_training_split(base, ff, tmp_path, data):
    """With refit_offsets (the default) the E0s of the training elements move and the others stay; without, all stay."""
    from umlip_latents.extract import load_adapter

    key = "atomic_energies_fn.atomic_energies"
    zs = [int(z) for z in load_adapter(base, device="cpu").z_table]
    seen = {int(z) for a in data["train"] for z in a.numbers}
    before = _state(base)[key].numpy().ravel()
    after = _state(ff.final)[key].numpy().ravel()
    moved = {z for z, b, a in zip(zs, before, after) if b != a}
    assert moved and moved <= seen
    kept = _run(base, data, "ff", tmp_path / "foundation", refit_offsets=False)
    assert kept.final.derived["run"] != ff.final.derived["run"]
    assert np.array_equal(_state(kept.final)[key].numpy().ravel(), before)


def test_mace_patience_stops_on_a_plateau(base, data, tmp_path):
    """lr = 0: the validation loss never falls after epoch 1, so mace's --patience 1 stops after epoch 2."""
    run = _run(base, data, "ff", tmp_path / "stop", lr=0.0, epochs=5, patience=1, refit_offsets=False)
    assert run.stopped_early and len(run.epochs) == 2 and run.best_epoch == 1
    assert run.final == run.epochs[0] and [h["epoch"] for h in run.history] == [0, 1, 2]


def test_hf_freezes_backbone(base, data, tmp_path):
    from umlip_latents.finetune.mace import FROZEN_PREFIXES

    hf = _run(base, data, "hf", tmp_path / "hf")
    before, after = _state(base), _state(hf.epochs[-1])
    frozen = [k for k in before if k.startswith(FROZEN_PREFIXES)]
    readout = [k for k in before if k.startswith("readouts.")]
    assert frozen and readout
    for k in frozen:
        assert np.array_equal(before[k].numpy(), after[k].numpy()), k
    assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in readout)
    offsets = {"atomic_energies_fn.atomic_energies"}  # refitted by mace (--E0s estimated), not trained
    for k in set(before) - set(readout) - offsets:  # nothing else moves (scale/shift may gain a head axis)
        assert np.array_equal(before[k].numpy().ravel(), after[k].numpy().ravel()), k


def test_reproducible(base, data, ff, tmp_path):
    again = _run(base, data, "ff", tmp_path / "again", recompute=True)
    assert not again.reused
    a, b = _state(ff.final), _state(again.final)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    fa = extract_features(ff.final, data["valid"], layer="last", device="cpu")
    fb = extract_features(again.final, data["valid"], layer="last", device="cpu")
    np.testing.assert_array_equal(fa.values, fb.values)


def test_newhead(base, data, tmp_path):
    from umlip_latents.extract import load_adapter
    from umlip_latents.finetune.mace import NEW_HEAD, PT_HEAD

    base_z = set(int(z) for z in load_adapter(base, device="cpu").z_table)
    replay = [a for a in data["pretrain"] if set(a.numbers) <= base_z][:10]
    run = _run(base, data, "newhead", tmp_path / "newhead", replay=replay)
    assert run.final.options["head"] == NEW_HEAD
    adapter = load_adapter(run.final, device="cpu")
    assert adapter.heads == [PT_HEAD, NEW_HEAD] and adapter.head == NEW_HEAD
    fs = extract_features(run.final, data["valid"], layer="last", device="cpu")
    assert np.isfinite(fs.values).all()
    n_atoms = np.array([len(a) for a in data["valid"]])
    np.testing.assert_allclose(fs.reread_energy() / n_atoms, fs.energy / n_atoms, atol=1e-5)


def test_default_replay_is_seeded_and_known_to_base(base):
    from umlip_latents.extract import load_adapter
    from umlip_latents.finetune.mace import default_replay

    known = set(load_adapter(base, device="cpu").z_table)
    a, b = default_replay(known, 5, seed=1), default_replay(known, 5, seed=1)
    assert 0 < len(a) <= 5 and [x.info["structure_id"] for x in a] == [x.info["structure_id"] for x in b]
    assert all(set(int(z) for z in x.numbers) <= known for x in a)


def test_bespoke_same_architecture(base, data, tmp_path):
    from umlip_latents.extract import load_adapter
    from umlip_latents.finetune.mace import architecture

    run = _run(base, data, "bespoke", tmp_path / "bespoke")
    assert run.final.parent is None and run.final.derived["protocol"] == "bespoke"
    m_base, m_new = load_adapter(base, device="cpu").model, load_adapter(run.final, device="cpu").model
    assert architecture(m_new) == architecture(m_base)
    a, b = _state(base), _state(run.final)
    shared = [k for k in a if k in b and a[k].shape == b[k].shape and k.startswith(("interactions.", "readouts."))]
    assert shared and any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in shared)


def test_missing_energy_is_named(base, data, tmp_path):
    bad = [a.copy() for a in data["train"]]
    bad[3].info = {k: v for k, v in data["train"][3].info.items() if k != "energy"}
    with pytest.raises(DatasetError, match=bad[3].info["structure_id"]):
        finetune("mace", base, bad, data["valid"], "ff", workdir=tmp_path / "x", **RUN)


def test_unknown_element_is_named(base, data, tmp_path):
    from ase.build import bulk

    from umlip_latents.extract import load_adapter

    known = set(load_adapter(base, device="cpu").z_table)
    assert 79 not in known  # Au
    gold = bulk("Au", "fcc", a=4.08)
    gold.info.update(energy=-3.2, structure_id="gold-1")
    gold.arrays["forces"] = np.zeros((1, 3))
    with pytest.raises(UnsupportedElement, match=rf"gold-1.*Au.*{base.key}"):
        finetune("mace", base, data["train"] + [gold], data["valid"], "ff", workdir=tmp_path / "x", **RUN)


def test_missing_foundation_checkpoint(tmp_path, monkeypatch, data):
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = get_spec("mace-mp-0b3-medium")
    with pytest.raises(ModelUnavailable, match=r"mace-mp-0b3-medium\.model.*UMLIP_LATENTS_CHECKPOINTS"):
        finetune("mace", spec, data["train"], data["valid"], "ff", workdir=tmp_path / "x", **RUN)
