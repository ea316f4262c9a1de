"""CHGNet back end of :func:`umlip_latents.finetune.finetune`: chgnet's own ``Trainer``.

The base is any CHGNet of the registry (``chgnet-0.3.0`` by default: real pretrained
weights from the chgnet wheel) or a local ``.pth.tar``. Training data become chgnet
``StructureData`` (energy per atom, forces) with the base model's own graph converter, fed
in seeded shuffled batches to ``chgnet.trainer.Trainer`` (Adam, cosine learning rate over
the epoch cap, MSE on energy and forces with chgnet's ``energy_loss_ratio`` /
``force_loss_ratio``; targets ``"ef"``), on one CPU thread (:func:`~umlip_latents.threads.one_cpu_thread`).

Offsets: chgnet's fine-tuning recipe refits the composition model (AtomRef) when the new
data's reference energies differ from the pretraining data's. With ``refit_offsets`` the
fine-tuning protocols do it in its least-squares form: the per-element correction that best
fits the residual of the starting model on the training split (energy per atom, float64,
minimum norm) is added to the AtomRef before training; the AtomRef is not trained by gradient
(``train_composition_model=False``, chgnet's default).

Protocols
---------
``ff``       every weight but the AtomRef trains.
``hf``       only the readout MLP ``model.mlp`` trains; everything else has
             ``requires_grad=False`` (Adam leaves parameters without gradients untouched).
``newhead``  a new energy readout: the final ``Linear(64, 1)`` of ``model.mlp`` (the map the
             last-layer features are read by) is replaced by the least-squares minimum of the
             training loss on the new data with every other weight fixed (:func:`linear_probe`),
             then the whole model trains: linear probing then fine-tuning (LP-FT, Kumar et al.,
             ICLR 2022). A re-initialised random readout MLP did not learn here: with 93 training
             structures its forces never came below the base's (test 605 meV/Å against 447).
``bespoke``  a CHGNet built from the base's ``model_args`` with fresh seeded weights; its
             AtomRef (per-element energies) is fitted to the training energies per atom by
             minimum-norm least squares in float64 before training (chgnet's own
             ``AtomRef.fit`` solves the normal equations with ``pinv`` in float32, which on a
             few hundred structures returns offsets of hundreds of eV).

Early stopping and history: after every epoch chgnet's Trainer validates; a subclass records
train and validation loss and energy/force RMSE (from the batches the loss saw), writes the
epoch's model as ``epochs/epoch-NNN.pth.tar`` (the format ``CHGNet.from_file`` reads) and
ends training when :class:`~umlip_latents.finetune.EarlyStopping` says so. Epoch 0 is a
validation pass of the starting model.
"""

from __future__ import annotations

import contextlib
import time
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
    from ..families import adapter_class

    ok, why = adapter_class("chgnet").availability(base)
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


def fit_atomref(atomref, structures: list, predicted=None) -> np.ndarray:
    """Fit CHGNet's AtomRef to ``info["energy"]`` per atom by min-norm least squares (float64).

    Parameters
    ----------
    atomref : chgnet.model.composition_model.AtomRef
        Fitted in place (``fc.weight``).
    structures : list of ase.Atoms
    predicted : array of shape (n_structures,), optional
        Energies per atom (eV/atom) the model predicts for ``structures`` with ``atomref`` as
        it is. When given, the per-element *correction* that fits the residual
        ``energy / n - predicted`` is added to the current weights (an offset refit that
        leaves the rest of the model's prediction alone; elements absent from
        ``structures`` keep their offsets). Without it the weights are replaced by a fit to
        the energies themselves (elements absent get 0).

    Returns
    -------
    numpy.ndarray of shape (94,)
        The per-element energies (eV/atom) now in ``atomref.fc.weight``.
    """
    import torch

    x = np.zeros((len(structures), MAX_Z))
    for i, atoms in enumerate(structures):
        x[i] = np.bincount(atoms.numbers - 1, minlength=MAX_Z) / len(atoms)
    y = np.array([float(a.info["energy"]) / len(a) for a in structures])
    start = np.zeros(MAX_Z)
    if predicted is not None:
        y = y - np.asarray(predicted, dtype=float)
        start = atomref.fc.weight.detach().double().numpy().ravel()
    present = np.flatnonzero(x.any(axis=0))  # absent elements keep their offsets exactly
    weight = start.copy()
    weight[present] += np.linalg.lstsq(x[:, present], y, rcond=None)[0]
    with torch.no_grad():
        atomref.fc.weight.copy_(torch.as_tensor(weight, dtype=atomref.fc.weight.dtype).view(1, MAX_Z))
    atomref.fitted = True
    return weight


def predict_energies(model, data, batch_size: int = 16) -> np.ndarray:
    """Energies per atom (eV/atom) ``model`` predicts for the graphs of a chgnet ``StructureData``."""
    graphs = [data[i][0] for i in range(len(data))]
    out = model.predict_graph(graphs, task="e", batch_size=batch_size)
    out = [out] if isinstance(out, dict) else out
    return np.array([float(p["e"]) for p in out])


def build_model(base: ModelSpec, protocol: str, seed: int, train: list):
    """The model a protocol starts from (the base loaded on CPU, modified per protocol; offsets as the base's)."""
    import torch
    from chgnet.model import CHGNet

    from ..families import adapter_class

    pretrained = adapter_class("chgnet").load(base, "cpu").model
    torch.manual_seed(seed)
    if protocol == "bespoke":
        model = CHGNet(**pretrained.model_args)
        fit_atomref(model.composition_model, train)
        return model
    model = pretrained
    if protocol == "hf":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(HEAD_PREFIXES)
    return model


def readout(model):
    """The final ``Linear(d, 1)`` of CHGNet's energy MLP: the linear map the last-layer features are read by."""
    import torch

    return [m for m in model.mlp.modules() if isinstance(m, torch.nn.Linear)][-1]


def probe_design(model, data, structures: list, batch_size: int = 8):
    """The rows of the least-squares problem that is CHGNet's loss as a function of its readout.

    With everything but the readout fixed, a structure's energy per atom is
    ``mean_i(w . x_i) + b + composition`` and its forces ``-sum_j w_j d(sum_i x_ij)/dr``, with
    ``x_i`` the last-layer features of atom ``i``: both linear in ``(w, b)``. Returns
    ``(energy_rows, energy_targets, force_rows, force_targets)`` in eV/atom and eV/Å, with
    shapes ``(n_structures, d + 1)``, ``(n_structures,)``, ``(n_force_components, d + 1)``,
    ``(n_force_components,)``; the targets are the labels minus the composition model's
    energy. The force Jacobian takes one backward pass per feature and batch.
    """
    import torch
    from chgnet.model.model import BatchedGraph

    captured = {}
    hook = readout(model).register_forward_pre_hook(lambda _m, inp: captured.__setitem__("x", inp[0]))
    rows_e, rows_f, y_e, y_f = [], [], [], []
    try:
        for lo in range(0, len(data), batch_size):
            idx = range(lo, min(lo + batch_size, len(data)))
            graphs = [data[i][0] for i in idx]
            batch = BatchedGraph.from_graphs(graphs, bond_basis_expansion=model.bond_basis_expansion,
                                             angle_basis_expansion=model.angle_basis_expansion, compute_stress=False)
            model._compute(batch, compute_force=False)
            x, owners = captured.pop("x"), batch.atom_owners
            counts = torch.bincount(owners, minlength=len(graphs)).double()
            pooled = torch.zeros(len(graphs), x.shape[1], dtype=torch.float64).index_add_(0, owners, x.detach().double())
            rows_e.append(torch.cat([pooled / counts[:, None], torch.ones(len(graphs), 1, dtype=torch.float64)], 1))
            composition = model.composition_model(graphs).detach().double()
            y_e += [float(structures[i].info["energy"]) / len(structures[i]) - float(c) for i, c in zip(idx, composition)]
            columns = [torch.autograd.grad(x[:, j].sum(), batch.atom_positions, retain_graph=True)
                       for j in range(x.shape[1])]
            for k, i in enumerate(idx):
                jac = -torch.stack([col[k] for col in columns], dim=-1).detach().double().reshape(-1, x.shape[1])
                rows_f.append(torch.cat([jac, torch.zeros(len(jac), 1, dtype=torch.float64)], 1))
                y_f.append(np.asarray(structures[i].arrays["forces"], dtype=float).ravel())
    finally:
        hook.remove()
    return torch.cat(rows_e).numpy(), np.array(y_e), torch.cat(rows_f).numpy(), np.concatenate(y_f)


#: relative singular-value cutoff of the linear probe: CHGNet computes in float32 (eps 1.2e-7),
#: so directions of the design weaker than this are below what its features resolve
PROBE_RCOND = 1e-6


def linear_probe(model, data, structures: list, energy_loss_ratio: float = 1.0, force_loss_ratio: float = 1.0,
                 batch_size: int = 8, rcond: float = PROBE_RCOND) -> dict:
    """Set CHGNet's readout to the least-squares minimum of its training loss on ``structures``.

    The loss (``energy_loss_ratio`` x energy MSE + ``force_loss_ratio`` x force MSE, chgnet's
    ``CombinedLoss``) is quadratic in the readout (:func:`probe_design`), so the best readout
    for the fixed features is one weighted least-squares solve (float64, minimum norm): the
    linear-probing step of LP-FT (Kumar et al., ICLR 2022), solved exactly on the directions
    the features determine. Singular values below ``rcond`` times the largest are dropped: on
    a dozen structures the design's condition number reaches 1e10, and the untruncated
    solution has weights of 1e8 whose float32 forward pass loses 0.01 eV/Å to cancellation.

    Returns
    -------
    dict
        The probe's training energy and force RMSE (meV/atom, meV/Å), the rank it used and
        the norm of the readout it set.
    """
    import torch

    xe, ye, xf, yf = probe_design(model, data, structures, batch_size)
    we, wf = np.sqrt(energy_loss_ratio / len(ye)), np.sqrt(force_loss_ratio / len(yf))
    a = np.vstack([xe * we, xf * wf])
    w, _, rank, _ = np.linalg.lstsq(a, np.concatenate([ye * we, yf * wf]), rcond=rcond)
    layer = readout(model)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(w[:-1], dtype=layer.weight.dtype).view_as(layer.weight))
        layer.bias.copy_(torch.as_tensor(w[-1:], dtype=layer.bias.dtype))
    return {"probe_rmse_e_per_atom": 1000 * float(np.sqrt(np.mean((xe @ w - ye) ** 2))),
            "probe_rmse_f": 1000 * float(np.sqrt(np.mean((xf @ w - yf) ** 2))),
            "probe_rank": int(rank), "probe_weight_norm": float(np.linalg.norm(w))}


class _Recorder:
    """Wraps chgnet's ``CombinedLoss`` and sums what the loss sees: loss, squared energy and force errors."""

    def __init__(self, loss):
        self.loss = loss
        self.reset()

    def reset(self) -> None:
        self.sums = {"loss": 0.0, "batches": 0, "e": 0.0, "n_e": 0, "f": 0.0, "n_f": 0}

    def __call__(self, targets, prediction):
        import torch

        out = self.loss(targets, prediction)
        with torch.no_grad():
            de = (prediction["e"] - targets["e"]).detach()
            df = (torch.cat(prediction["f"]) - torch.cat(targets["f"])).detach()
            de, df = de[~torch.isnan(de)], df[~torch.isnan(df)]
            self.sums["loss"] += float(out["loss"]) * len(de)
            self.sums["batches"] += len(de)
            self.sums["e"] += float((de.double() ** 2).sum())
            self.sums["n_e"] += de.numel()
            self.sums["f"] += float((df.double() ** 2).sum())
            self.sums["n_f"] += df.numel()
        return out

    def summary(self, prefix: str) -> dict:
        """Mean loss (per structure) and energy / force RMSE in meV/atom and meV/Å since :meth:`reset`."""
        s = self.sums
        return {f"{prefix}_loss": s["loss"] / max(s["batches"], 1),
                f"{prefix}_rmse_e_per_atom": 1000 * float(np.sqrt(s["e"] / max(s["n_e"], 1))),
                f"{prefix}_rmse_f": 1000 * float(np.sqrt(s["f"] / max(s["n_f"], 1)))}


class _Stop(Exception):
    """Raised from the epoch hook to end chgnet's epoch loop when patience has run out."""


def train(base: ModelSpec, train: list, valid: list, protocol: str, *, epochs: int, lr: float, seed: int,
          device: str, batch_size: int, workdir: Path, patience: int | None = None, refit_offsets: bool = True,
          energy_loss_ratio: float = 1.0, force_loss_ratio: float = 1.0,
          train_composition_model: bool = False) -> BackendOutput:
    """Train with chgnet's ``Trainer``; one checkpoint per epoch, early stopping on the validation loss.

    Parameters
    ----------
    epochs
        Epoch cap (chgnet's cosine schedule spans it).
    patience
        Epochs without a lower validation loss before training stops (``None``: never).
    refit_offsets
        Before fine-tuning (ff, hf, newhead), refit the AtomRef on ``train`` to the residual
        of the starting model (:func:`fit_atomref` with ``predicted``), the least-squares
        form of chgnet's AtomRef refit for data with other reference energies.
    energy_loss_ratio, force_loss_ratio
        Weights of the energy (eV/atom) and force (eV/Å) MSE in the loss (chgnet's
        ``Trainer`` options; its defaults are 1 and 1).
    train_composition_model
        Also train the AtomRef by gradient (chgnet's ``train_composition_model``).
    """
    import torch
    from chgnet.trainer import Trainer

    from ..threads import one_cpu_thread
    from . import EarlyStopping

    workdir = Path(workdir)
    (workdir / "epochs").mkdir(parents=True, exist_ok=True)
    checkpoints: list[Path] = []
    history: list[dict] = []
    stopper = EarlyStopping(patience)

    class EpochTrainer(Trainer):
        """chgnet's Trainer recording train/validation errors, writing every epoch's model and stopping early."""

        def _train(self, train_loader, current_epoch, *args, **kwargs):
            self.criterion.reset()
            start = time.perf_counter()
            mae = super()._train(train_loader, current_epoch, *args, **kwargs)
            history.append({"epoch": current_epoch + 1, **self.criterion.summary("train"),
                            **{f"train_{k}_mae": float(v) for k, v in mae.items()},
                            "seconds": time.perf_counter() - start})
            return mae

        def _validate(self, val_loader, *args, **kwargs):
            self.criterion.reset()
            mae = super()._validate(val_loader, *args, **kwargs)
            self.last_valid = {**self.criterion.summary("valid"), **{f"val_{k}_mae": float(v) for k, v in mae.items()}}
            return mae

        def save_checkpoint(self, epoch: int, mae_error: dict, save_dir: str) -> None:
            path = workdir / "epochs" / f"epoch-{epoch + 1:03d}.pth.tar"
            torch.save({"model": self.model.as_dict()}, path)
            checkpoints.append(path)
            history[-1].update(self.last_valid)
            if stopper.update(self.last_valid["valid_loss"]):
                raise _Stop

    # chgnet prints progress; it goes to the run's log
    with open(workdir / "train.log", "w") as log, contextlib.redirect_stdout(log), one_cpu_thread(device):
        torch.manual_seed(seed)
        model = build_model(base, protocol, seed, train)
        train_data = _structure_data(train, model.graph_converter)
        if refit_offsets and protocol != "bespoke":
            model.eval()
            offsets = fit_atomref(model.composition_model, train, predict_energies(model, train_data, batch_size))
            print("refitted AtomRef (eV/atom):",
                  {int(z): round(float(offsets[z - 1]), 4) for z in sorted({int(z) for a in train for z in a.numbers})})
        if protocol == "newhead":
            model.eval()
            start = time.perf_counter()
            probe = linear_probe(model, train_data, train, energy_loss_ratio, force_loss_ratio, batch_size)
            print(f"new readout by linear probe in {time.perf_counter() - start:.1f} s; training RMSE: {probe}")
        train_loader = _loader(train_data, batch_size, True, seed)
        valid_loader = _loader(_structure_data(valid, model.graph_converter), batch_size, False, seed)
        trainer = EpochTrainer(model=model, targets="ef", optimizer="Adam", scheduler="CosLR", criterion="MSE",
                               epochs=epochs, learning_rate=lr, use_device=device, torch_seed=seed,
                               energy_loss_ratio=energy_loss_ratio, force_loss_ratio=force_loss_ratio,
                               print_freq=10**6)
        trainer.criterion = _Recorder(trainer.criterion)
        trainer.model.to(trainer.device)
        trainer._validate(valid_loader)  # epoch 0: the starting model
        history.append({"epoch": 0, "train_loss": None, **trainer.last_valid})
        torch.manual_seed(seed)  # the same random stream from here whether or not epoch 0 ran
        try:
            trainer.train(train_loader, valid_loader, None, save_dir=str(workdir / "trainer"),
                          train_composition_model=train_composition_model)
        except _Stop:
            print(f"early stop after epoch {stopper.epoch}: {patience} epochs without a lower validation loss")
    if len(history) != len(checkpoints) + 1:  # chgnet left its loop on a NaN loss
        raise RuntimeError(f"chgnet stopped after {len(checkpoints)} epochs on a NaN loss; see {workdir / 'train.log'}")
    return BackendOutput(epoch_checkpoints=checkpoints, history=history, best_epoch=stopper.best_epoch,
                         stopped_early=stopper.epoch < epochs)
