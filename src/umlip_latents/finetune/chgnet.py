"""CHGNet back end of :func:`umlip_latents.finetune.finetune`: chgnet's own ``Trainer``.

The base is any CHGNet of the registry (``chgnet-0.3.0`` by default: real pretrained
weights from the chgnet wheel) or a local ``.pth.tar``. Training data become chgnet
``StructureData`` (energy per atom, forces) with the base model's own graph converter, fed
in seeded shuffled batches to ``chgnet.trainer.Trainer`` (Adam, cosine learning rate, MSE on
energy and forces, chgnet's defaults; targets ``"ef"``).

Protocols
---------
``ff``       every weight trains (the composition model AtomRef stays fixed, chgnet's default).
``hf``       only the readout MLP ``model.mlp`` trains; everything else has
             ``requires_grad=False`` (Adam leaves parameters without gradients untouched).
``newhead``  ``model.mlp`` is re-initialised (seeded) and the whole model trains.
``bespoke``  a CHGNet built from the base's ``model_args`` with fresh seeded weights; its
             AtomRef (per-element energies) is fitted to the training energies per atom by
             minimum-norm least squares in float64 before training (chgnet's own
             ``AtomRef.fit`` solves the normal equations with ``pinv`` in float32, which on a
             few hundred structures returns offsets of hundreds of eV).

Checkpoints: after each epoch the model is written as ``epochs/epoch-NNN.pth.tar`` in the
format ``CHGNet.from_file`` reads (``{"model": model.as_dict()}``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..errors import ModelUnavailable
from ..registry import ModelSpec
from . import BackendOutput

#: CHGNet embeds elements 1..94
MAX_Z = 94
#: parameters that train under "hf" (the per-atom energy readout)
HEAD_PREFIXES = ("mlp.",)


def check_base(base: ModelSpec) -> None:
    """Raise ModelUnavailable when the base cannot be loaded."""
    from ..extract.chgnet import ChgnetAdapter

    ok, why = ChgnetAdapter.availability(base)
    if not ok:
        raise ModelUnavailable(f"base model {base.key}: {why}")


def supported_elements(base: ModelSpec, protocol: str) -> set[int] | None:
    """Elements CHGNet has an embedding for (1..94), None for a model trained from scratch."""
    return None if protocol == "bespoke" else set(range(1, MAX_Z + 1))


def versions() -> dict:
    from importlib.metadata import version

    return {"chgnet": version("chgnet"), "torch": version("torch")}


def _structure_data(structures: list, graph_converter):
    from chgnet.data.dataset import StructureData
    from pymatgen.io.ase import AseAtomsAdaptor

    return StructureData(
        structures=[AseAtomsAdaptor.get_structure(a) for a in structures],
        energies=[float(a.info["energy"]) / len(a) for a in structures],
        forces=[np.asarray(a.arrays["forces"], dtype=float).tolist() for a in structures],
        structure_ids=[str(a.info.get("structure_id", i)) for i, a in enumerate(structures)],
        graph_converter=graph_converter,
        shuffle=False,
    )


def _loader(data, batch_size: int, shuffle: bool, seed: int):
    import torch
    from chgnet.data.dataset import collate_graphs
    from torch.utils.data import DataLoader

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_graphs, generator=gen,
                      num_workers=0)


def fit_atomref(atomref, structures: list) -> np.ndarray:
    """Fit CHGNet's AtomRef to ``info["energy"]`` per atom by min-norm least squares (float64).

    Returns the 94 per-element energies (eV/atom) loaded into ``atomref.fc.weight``;
    elements absent from ``structures`` get 0.
    """
    import torch

    x = np.zeros((len(structures), MAX_Z))
    for i, atoms in enumerate(structures):
        x[i] = np.bincount(atoms.numbers - 1, minlength=MAX_Z) / len(atoms)
    y = np.array([float(a.info["energy"]) / len(a) for a in structures])
    weight, *_ = np.linalg.lstsq(x, y, rcond=None)
    with torch.no_grad():
        atomref.fc.weight.copy_(torch.as_tensor(weight, dtype=atomref.fc.weight.dtype).view(1, MAX_Z))
    atomref.fitted = True
    return weight


def build_model(base: ModelSpec, protocol: str, seed: int, train: list):
    """The model a protocol starts from (the base loaded on CPU, modified per protocol)."""
    import torch
    from chgnet.model import CHGNet

    from ..extract.chgnet import ChgnetAdapter

    pretrained = ChgnetAdapter.load(base, "cpu").model
    torch.manual_seed(seed)
    if protocol == "bespoke":
        model = CHGNet(**pretrained.model_args)
        fit_atomref(model.composition_model, train)
        return model
    model = pretrained
    if protocol == "newhead":
        for module in model.mlp.modules():
            if hasattr(module, "reset_parameters") and module is not model.mlp:
                module.reset_parameters()
    if protocol == "hf":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(HEAD_PREFIXES)
    return model


def train(base: ModelSpec, train: list, valid: list, protocol: str, *, epochs: int, lr: float, seed: int,
          device: str, batch_size: int, workdir: Path, train_composition_model: bool = False) -> BackendOutput:
    """Train with chgnet's ``Trainer``; one checkpoint per epoch.

    Parameters
    ----------
    train_composition_model
        Also train the AtomRef (per-element energy offsets); chgnet recommends it when the
        new data's reference energies differ from the pretraining data's.
    """
    import torch
    from chgnet.trainer import Trainer

    workdir = Path(workdir)
    (workdir / "epochs").mkdir(parents=True, exist_ok=True)
    checkpoints: list[Path] = []

    class EpochTrainer(Trainer):
        """chgnet's Trainer writing every epoch's model (and none of its own best/epoch files)."""

        def save_checkpoint(self, epoch: int, mae_error: dict, save_dir: str) -> None:
            path = workdir / "epochs" / f"epoch-{epoch + 1:03d}.pth.tar"
            torch.save({"model": self.model.as_dict()}, path)
            checkpoints.append(path)

    # chgnet prints progress; it goes to the run's log
    with open(workdir / "train.log", "w") as log, contextlib.redirect_stdout(log):
        torch.manual_seed(seed)
        model = build_model(base, protocol, seed, train)
        train_loader = _loader(_structure_data(train, model.graph_converter), batch_size, True, seed)
        valid_loader = _loader(_structure_data(valid, model.graph_converter), batch_size, False, seed)
        trainer = EpochTrainer(model=model, targets="ef", optimizer="Adam", scheduler="CosLR", criterion="MSE",
                               epochs=epochs, learning_rate=lr, use_device=device, torch_seed=seed,
                               print_freq=10**6)
        trainer.train(train_loader, valid_loader, None, save_dir=str(workdir / "trainer"),
                      train_composition_model=train_composition_model)
    hist = trainer.training_history
    history = [{"epoch": e + 1, **{f"{split}_{k}_mae": float(hist[k][split][e]) for k in ("e", "f")
                                   for split in ("train", "val")}} for e in range(len(checkpoints))]
    return BackendOutput(epoch_checkpoints=checkpoints, history=history)
