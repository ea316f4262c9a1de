"""Fine-tuning CHGNet v0.3.0 (real pretrained weights) with chgnet's own trainer.

Proves that training really happens (features move), that heads-only keeps the backbone
bit for bit, that a run is reproducible from its seed, that every epoch becomes a derived
model the feature pipeline can use, that early stopping stops on a validation plateau and
keeps the best-validation epoch, that the offset refit fits the residual, and that bad data
fails with a clear message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from umlip_latents.errors import DatasetError, UnsupportedElement
from umlip_latents.extract import extract_features
from umlip_latents.finetune import EarlyStopping, best_epoch, finetune, split_structures
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
    assert len(res.epochs) == EPOCHS
    assert [s.derived["epoch"] for s in res.epochs] == list(range(1, EPOCHS + 1))
    spec = get_spec(res.final.key)  # found through the derived registry
    assert spec == res.final and spec.parent == BASE and spec.derived["protocol"] == "ff"
    assert spec.derived["base"] == BASE and len(spec.derived["data_sha256"]) == 64
    assert [r["epoch"] for r in res.history] == list(range(EPOCHS + 1))  # epoch 0: the starting model
    assert res.history[0]["train_loss"] is None and np.isfinite(res.history[0]["valid_rmse_e_per_atom"])
    for row in res.history[1:]:
        assert all(np.isfinite(row[k]) for k in ("train_loss", "valid_loss", "train_rmse_e_per_atom",
                                                 "valid_rmse_e_per_atom", "train_rmse_f", "valid_rmse_f"))
    # no patience: every epoch trains; the final model is the one of lowest validation loss
    assert not res.stopped_early
    valid = [r["valid_loss"] for r in res.history[1:]]
    assert res.best_epoch == int(np.argmin(valid)) + 1 and res.final == res.epochs[res.best_epoch - 1]
    frame = res.history_frame()
    assert list(frame.index) == list(range(EPOCHS + 1)) and "valid_rmse_f" in frame

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
    run = runs("hf")
    tuned = _state(run.epochs[-1])
    offsets = "composition_model.fc.weight"  # refitted on the training split, not trained
    frozen = [k for k in base if not k.startswith("mlp.") and k != offsets]
    head = [k for k in base if k.startswith("mlp.")]
    assert frozen and head
    changed = [k for k in frozen if not torch.equal(base[k], tuned[k])]
    assert not changed, f"frozen parameters changed under heads-only: {changed[:5]}"
    assert any(not torch.equal(base[k], tuned[k]) for k in head), "the head did not train"
    # the refit moves the offsets of the training elements only
    seen = sorted({int(z) for a in run_parts(run) for z in a.numbers})
    moved = np.flatnonzero((base[offsets] != tuned[offsets]).numpy().ravel()) + 1
    assert set(moved) <= set(seen) and len(moved) > 0


def run_parts(run):
    """The training structures of a run of this module (its ``parts`` fixture's train split)."""
    from umlip_latents.datasets import load_dataset

    frames = [a for a in load_dataset("mpf-alkali-tp") if len(a) <= 10][:16]
    return split_structures(frames, seed=0)["train"]


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


def test_bespoke_starts_from_fresh_weights(parts):
    b = build_model(get_spec(BASE), "ff", 0, parts["train"]).state_dict()
    scratch = build_model(get_spec(BASE), "bespoke", 0, parts["train"]).state_dict()
    assert scratch.keys() == b.keys()
    assert not torch.equal(scratch["atom_embedding.embedding.weight"], b["atom_embedding.embedding.weight"])


def test_new_head_linear_probe_is_the_least_squares_readout(parts):
    """The probe's rows times its readout equal chgnet's own energies and forces, and no readout does better."""
    from umlip_latents.finetune.chgnet import _structure_data, linear_probe, probe_design, readout

    structures = parts["train"]
    model = build_model(get_spec(BASE), "newhead", 0, structures)
    model.eval()
    data = _structure_data(structures, model.graph_converter)
    base_weight = readout(model).weight.detach().clone()
    probe = linear_probe(model, data, structures, energy_loss_ratio=10.0, batch_size=3)
    assert not torch.equal(readout(model).weight, base_weight)
    assert probe["probe_rank"] < 65  # 12 structures do not determine all 65 readout weights in float32
    xe, ye, xf, yf = probe_design(model, data, structures, batch_size=3)
    layer = readout(model)
    w = np.concatenate([layer.weight.detach().double().numpy().ravel(), layer.bias.detach().double().numpy()])
    pred = model.predict_graph([data[i][0] for i in range(len(data))], task="ef", batch_size=3)
    composition = model.composition_model([data[i][0] for i in range(len(data))]).detach().double().numpy()
    np.testing.assert_allclose([p["e"] for p in pred], xe @ w + composition, atol=1e-4)  # float32 model
    forces = np.concatenate([p["f"].ravel() for p in pred])
    np.testing.assert_allclose(forces, xf @ w, atol=1e-3)  # float32 model, forces of several eV/Å
    energies = np.array([a.info["energy"] / len(a) for a in structures])
    np.testing.assert_allclose(ye, energies - composition, atol=1e-6)

    def loss(v):
        return 10.0 * np.mean((xe @ v - ye) ** 2) + np.mean((xf @ v - yf) ** 2)

    rng = np.random.default_rng(0)
    assert all(loss(w) <= loss(w + 1e-3 * rng.standard_normal(w.shape)) for _ in range(5))
    # why the cutoff: without it the readout's weights are 1e8 (on directions the float32 features
    # resolve only to rounding), and the model's own forces no longer follow its design to 1e-3
    exact = np.linalg.lstsq(np.vstack([xe * np.sqrt(10.0 / len(ye)), xf / np.sqrt(len(yf))]),
                            np.concatenate([ye * np.sqrt(10.0 / len(ye)), yf / np.sqrt(len(yf))]), rcond=None)[0]
    assert np.linalg.norm(exact) > 1e4 * np.linalg.norm(w)


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


def test_offset_refit_fits_the_residual_and_keeps_other_elements():
    """With the model's predictions, the refit adds the per-element correction of the residual."""
    from ase.build import bulk
    from chgnet.model.composition_model import AtomRef

    structures = [bulk("NaCl", "rocksalt", a=5.6), bulk("Na", "bcc", a=4.2), bulk("KCl", "rocksalt", a=6.3),
                  bulk("K", "bcc", a=5.2)]
    shift = {11: 0.4, 17: -0.25, 19: 0.1}  # the new data's reference energies differ by these (eV/atom)
    interaction = np.array([0.03, -0.02, 0.05, 0.01])  # what the rest of the model predicts (eV/atom)
    ref = AtomRef(is_intensive=True)
    ref.initialize_from_MPtrj()
    before = ref.fc.weight.detach().double().numpy().ravel().copy()
    predicted = []
    for a, extra in zip(structures, interaction):
        old = np.mean([before[z - 1] for z in a.numbers])
        predicted.append(old + extra)
        a.info["energy"] = len(a) * (old + extra + np.mean([shift[z] for z in a.numbers]))
    weight = fit_atomref(ref, structures, predicted=predicted)
    np.testing.assert_allclose([weight[z - 1] - before[z - 1] for z in shift], list(shift.values()), atol=1e-6)
    others = [z for z in range(1, 95) if z not in shift]
    np.testing.assert_array_equal(weight[np.array(others) - 1], before[np.array(others) - 1])


@pytest.mark.parametrize("patience, values, stop, best", [
    (2, [3.0, 2.0, 2.5, 2.0, 1.0], 4, 2),  # equal is no improvement: stops after 2 epochs without one
    (1, [1.0, 1.0, 1.0], 2, 1),  # a plateau from the start keeps epoch 1
    (3, [5.0, 4.0, 3.0, 2.0], 4, 4),  # still improving at the cap
    (None, [2.0, 3.0, 4.0, 5.0], 4, 1),  # no patience: never stops, keeps the best
    (2, [float("nan"), 2.0, float("nan"), float("nan")], 4, 2),  # NaN never improves
])
def test_early_stopping_rule(patience, values, stop, best):
    assert best_epoch(values, patience) == (stop, best)


def test_early_stopping_rejects_bad_patience():
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)
    with pytest.raises(ValueError, match="patience"):
        finetune("chgnet", BASE, [], [], "ff", epochs=2, patience=0)


def test_early_stop_on_a_validation_plateau(ft_env, parts):
    """lr = 0: the model never changes, so validation plateaus at epoch 1 and training stops at 1 + patience."""
    run = finetune("chgnet", BASE, parts["train"], parts["valid"], "hf", epochs=6, lr=0.0, seed=0, batch_size=4,
                   patience=2, refit_offsets=False)
    assert run.stopped_early and len(run.epochs) == 3 and run.best_epoch == 1
    assert run.final == run.epochs[0] and run.final.derived["epoch"] == 1
    assert [r["epoch"] for r in run.history] == [0, 1, 2, 3]
    assert len({r["valid_loss"] for r in run.history}) == 1  # nothing moved, epoch 0 included
    again = finetune("chgnet", BASE, parts["train"], parts["valid"], "hf", epochs=6, lr=0.0, seed=0, batch_size=4,
                     patience=2, refit_offsets=False)
    assert again.reused and again.final == run.final and again.best_epoch == 1 and again.stopped_early


def test_run_key_covers_patience_and_offsets(ft_env, parts, monkeypatch):
    """A fake back end (no training) shows what names a run and that the manifest keeps the best epoch."""
    from umlip_latents.finetune import BackendOutput
    from umlip_latents.finetune import chgnet as backend

    def fake_train(base, train, valid, protocol, *, epochs, workdir, patience, refit_offsets, **kw):
        paths = []
        for e in range(1, 4):
            paths.append(workdir / f"e{e}.pth.tar")
            paths[-1].write_text("")
        history = [{"epoch": e, "valid_loss": v} for e, v in enumerate([3.0, 2.0, 1.0, 1.5])]
        return BackendOutput(epoch_checkpoints=paths, history=history, best_epoch=2, stopped_early=True)

    monkeypatch.setattr(backend, "train", fake_train)
    kw = dict(epochs=5, lr=1e-3, seed=0, batch_size=4)
    names = {}
    for settings in ({"patience": None}, {"patience": 1}, {"patience": 2}, {"patience": 2, "refit_offsets": False}):
        run = finetune("chgnet", BASE, parts["train"], parts["valid"], "ff", **kw, **settings)
        assert run.best_epoch == 2 and run.final == run.epochs[1] and len(run.epochs) == 3
        assert set(run.history[0]) >= {"epoch", "train_loss", "valid_loss", "valid_rmse_e_per_atom"}
        names[tuple(settings.items())] = run.final.derived["run"]
    assert len(set(names.values())) == len(names), names
    reread = finetune("chgnet", BASE, parts["train"], parts["valid"], "ff", **kw, patience=1)
    assert reread.reused and reread.final.derived["epoch"] == 2 and reread.stopped_early


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


def _fake_run(protocol, valid, cap, patience, best, stopped):
    """A FinetuneResult with a given validation history (no checkpoints behind it)."""
    from umlip_latents.finetune import FinetuneResult

    spec = get_spec(BASE)
    history = [{"epoch": e, "train_loss": None if e == 0 else 2.0 * v, "valid_loss": v,
                "train_rmse_e_per_atom": None if e == 0 else 20.0 * v, "valid_rmse_e_per_atom": 10.0 * v,
                "train_rmse_f": None if e == 0 else 200.0 * v, "valid_rmse_f": 100.0 * v}
               for e, v in enumerate(valid)]
    return FinetuneResult(backend="chgnet", protocol=protocol, base=BASE, final=spec,
                          epochs=[spec] * (len(valid) - 1), history=history, workdir=None, seconds=1.0,
                          settings={"epochs": cap, "patience": patience}, best_epoch=best, stopped_early=stopped)


def test_learning_curves_and_convergence_sentences():
    from umlip_latents.finetune.analysis import convergence_summary, curve_epochs, learning_curves

    runs = {"ff": _fake_run("ff", [5.0, 3.0, 2.0, 2.5, 2.6], cap=10, patience=2, best=2, stopped=True),
            "hf": _fake_run("hf", [5.0, 3.0, 2.9, 2.8, 2.7], cap=4, patience=None, best=4, stopped=False),
            "bespoke": _fake_run("bespoke", [9.0, 8.0, 7.0, 7.5, 7.6, 7.7, 7.8], cap=6, patience=None, best=2,
                                 stopped=False)}
    curves = learning_curves(runs)
    assert set(curves.split) == {"train", "valid"}
    assert (curves[curves.epoch == 0].split == "valid").all()  # epoch 0: the starting model, validation only
    assert curves[curves.best].groupby("protocol").size().eq(2).all()  # the kept epoch, train and valid rows
    ff = curves[(curves.protocol == "full fine-tune (FF)") & (curves.split == "valid")]
    np.testing.assert_allclose(ff["energy RMSE (meV/atom)"], [50, 30, 20, 25, 26])
    says = dict(zip(runs, convergence_summary(runs)))
    assert "stopped at epoch 4 after 2 epochs without improvement" in says["ff"] and "reached" in says["ff"]
    assert "did not reach its validation plateau" in says["hf"] and "epoch 4" in says["hf"]
    assert "reached its validation plateau" in says["bespoke"] and "did not" not in says["bespoke"]
    # the feature curves follow the path to the kept epoch, at most max_points of it
    assert curve_epochs(runs["ff"]) == [1, 2]
    long = _fake_run("ff", list(np.linspace(9, 1, 31)), cap=30, patience=None, best=30, stopped=False)
    picks = curve_epochs(long, max_points=8)
    assert len(picks) <= 8 and picks[0] == 1 and picks[-1] == 30 and picks == sorted(set(picks))
    assert curve_epochs(long, max_points=None) == list(range(1, 31))
