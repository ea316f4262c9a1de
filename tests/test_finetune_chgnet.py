"""Fine-tuning CHGNet v0.3.0 (real pretrained weights) with chgnet's own trainer.

Proves that training really happens (features move), that heads-only keeps the backbone
bit for bit, that a run is reproducible from its seed, that every epoch becomes a derived
model the feature pipeline can use, and that bad data fails with a clear message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umlip_latents.errors import DatasetError, UnsupportedElement
from umlip_latents.extract import extract_features
from umlip_latents.finetune import finetune, split_structures
from umlip_latents.finetune.chgnet import build_model, fit_atomref
from umlip_latents.registry import get_spec

BASE = "chgnet-0.3.0"
EPOCHS = 2


@pytest.fixture(scope="module")
def ft_env(tmp_path_factory):
    """A private fine-tuning folder (derived registry) for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMLIP_LATENTS_FINETUNE", str(tmp_path_factory.mktemp("finetune")))
        yield


@pytest.fixture(scope="module")
def parts():
    from umlip_latents.datasets import load_dataset

    frames = [a for a in load_dataset("mpf-alkali-tp") if len(a) <= 10][:16]
    return split_structures(frames, seed=0)


@pytest.fixture(scope="module")
def runs(ft_env, parts):
    cache = {}

    def get(protocol, **kw):
        key = (protocol, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = finetune("chgnet", BASE, parts["train"], parts["valid"], protocol, epochs=EPOCHS, lr=1e-3,
                                  seed=0, batch_size=4, data_label="mpf-alkali-tp (test slice)", **kw)
        return cache[key]

    return get


def _state(spec):
    from chgnet.model import CHGNet

    return CHGNet.from_file(spec.source["path"]).state_dict()


def test_full_finetune_moves_features_and_registers_every_epoch(runs, parts):
    res = runs("ff")
    assert len(res.epochs) == EPOCHS and res.final == res.epochs[-1]
    assert [s.derived["epoch"] for s in res.epochs] == list(range(1, EPOCHS + 1))
    spec = get_spec(res.final.key)  # found through the derived registry
    assert spec == res.final and spec.parent == BASE and spec.derived["protocol"] == "ff"
    assert spec.derived["base"] == BASE and len(spec.derived["data_sha256"]) == 64
    assert len(res.history) == EPOCHS and all(np.isfinite(r["train_e_mae"]) for r in res.history)

    base = extract_features(BASE, parts["test"], layer="last", device="cpu")
    tuned = extract_features(spec, parts["test"], layer="last", device="cpu")
    change = np.linalg.norm(tuned.values - base.values) / np.linalg.norm(base.values)
    assert change > 1e-3, f"fine-tuning changed the features by only {change:.1e}"
    # the derived model is a proper model: its energy is re-read from its own features
    n = np.bincount(tuned.structure_index)
    assert np.abs(tuned.reread_energy() - tuned.energy).max() / n.min() < 1e-5
    # the two epochs are different checkpoints
    e1, e2 = (_state(s) for s in res.epochs)
    assert any(not torch.equal(e1[k], e2[k]) for k in e1)


def test_heads_only_keeps_backbone_bit_for_bit(runs):
    from chgnet.model import CHGNet

    base = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False).state_dict()
    tuned = _state(runs("hf").final)
    frozen = [k for k in base if not k.startswith("mlp.")]
    head = [k for k in base if k.startswith("mlp.")]
    assert frozen and head
    changed = [k for k in frozen if not torch.equal(base[k], tuned[k])]
    assert not changed, f"frozen parameters changed under heads-only: {changed[:5]}"
    assert any(not torch.equal(base[k], tuned[k]) for k in head), "the head did not train"


def test_run_is_reproducible_from_its_seed(runs, parts, tmp_path):
    first = runs("ff")
    again = finetune("chgnet", BASE, parts["train"], parts["valid"], "ff", epochs=EPOCHS, lr=1e-3, seed=0,
                     batch_size=4, data_label="mpf-alkali-tp (test slice)", workdir=tmp_path / "again")
    assert not again.reused
    a, b = _state(first.final), _state(again.final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a finished run is reused, not retrained
    same = finetune("chgnet", BASE, parts["train"], parts["valid"], "ff", epochs=EPOCHS, lr=1e-3, seed=0,
                    batch_size=4, data_label="mpf-alkali-tp (test slice)")
    assert same.reused and same.final == first.final


def test_new_head_and_bespoke_start_points(parts):
    base_model = build_model(get_spec(BASE), "ff", 0, parts["train"])
    new = build_model(get_spec(BASE), "newhead", 0, parts["train"])
    b, n = base_model.state_dict(), new.state_dict()
    assert all(torch.equal(b[k], n[k]) for k in b if not k.startswith("mlp."))
    assert all(not torch.equal(b[k], n[k]) for k in b if k.startswith("mlp.") and k.endswith("weight"))
    scratch = build_model(get_spec(BASE), "bespoke", 0, parts["train"]).state_dict()
    assert scratch.keys() == b.keys()
    assert not torch.equal(scratch["atom_embedding.embedding.weight"], b["atom_embedding.embedding.weight"])


def test_atomref_fit_reproduces_energies():
    from ase.build import bulk
    from chgnet.model.composition_model import AtomRef

    structures = [bulk("NaCl", "rocksalt", a=5.6), bulk("Na", "bcc", a=4.2), bulk("KCl", "rocksalt", a=6.3),
                  bulk("K", "bcc", a=5.2)]
    mu = {11: -1.3, 17: -1.8, 19: -1.1}
    for a in structures:
        a.info["energy"] = sum(mu[z] for z in a.numbers)
    ref = AtomRef(is_intensive=True)
    weight = fit_atomref(ref, structures)
    np.testing.assert_allclose([weight[z - 1] for z in mu], list(mu.values()), atol=1e-9)


def test_bad_training_data_is_named(ft_env, parts):
    from ase import Atoms

    no_energy = parts["train"][0].copy()
    no_energy.info.pop("energy")
    no_energy.info["structure_id"] = "no-energy-7"
    with pytest.raises(DatasetError, match="no-energy-7.*energ"):
        finetune("chgnet", BASE, [no_energy] + parts["train"][1:], parts["valid"], "ff", epochs=1)
    no_forces = parts["train"][0].copy()
    del no_forces.arrays["forces"]
    no_forces.info["structure_id"] = "no-forces-3"
    with pytest.raises(DatasetError, match="no-forces-3.*forces"):
        finetune("chgnet", BASE, [no_forces], parts["valid"], "ff", epochs=1)
    americium = Atoms("AmO", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[6, 6, 6], pbc=True)
    americium.info.update(structure_id="am-oxide-1", energy=-10.0)
    americium.arrays["forces"] = np.zeros((2, 3))
    with pytest.raises(UnsupportedElement) as err:
        finetune("chgnet", BASE, [americium], parts["valid"], "ff", epochs=1)
    assert "Am" in str(err.value) and "am-oxide-1" in str(err.value) and BASE in str(err.value)
    with pytest.raises(ValueError, match="protocol"):
        finetune("chgnet", BASE, parts["train"], parts["valid"], "everything", epochs=1)
    with pytest.raises(ValueError, match="mace model|chgnet model"):
        finetune("mace", BASE, parts["train"], parts["valid"], "ff", epochs=1)


def test_held_out_structures_keep_to_training_elements():
    from ase.build import bulk

    from umlip_latents.finetune import within_training_elements

    nacl, kcl, zr = bulk("NaCl", "rocksalt", a=5.6), bulk("KCl", "rocksalt", a=6.3), bulk("Zr", "hcp", a=3.2)
    parts, dropped = within_training_elements({"train": [nacl, kcl], "valid": [kcl, zr], "test": [zr, nacl]})
    assert dropped == 2 and parts["valid"] == [kcl] and parts["test"] == [nacl]
    with pytest.raises(DatasetError, match="training split"):
        within_training_elements({"train": [nacl], "valid": [zr], "test": [nacl]})
