"""Fine-tune pretrained models and train bespoke ones, as derived models of the registry.

Protocols (as in arXiv:2512.05717, section "fine-tuning"):

``"ff"``  full fine-tune
    every weight of the pretrained model is trained on the new data.
``"hf"``  heads-only
    the backbone is frozen; only the readout (energy head) is trained.
``"newhead"``  new head / transfer
    MACE: multi-head fine-tuning with replay of pretraining data (``mace_run_train
    --multiheads_finetuning``; the features are those of the new head). CHGNet: a new linear
    energy readout (the layer the last-layer features are read by), set by linear probing on
    the new data, then the whole model is trained (LP-FT).
``"bespoke"``
    a model of the same architecture trained from scratch on the same data.

Every run trains with the family's own trainer (CHGNet's ``Trainer``, mace-torch's
``mace_run_train``), with the same epoch cap, early-stopping patience and seed across
protocols:

- **offsets**: with ``refit_offsets`` (the default) the per-element energy offsets are refitted
  on the training split before training, as each family's own fine-tuning recipe does when
  the new data's reference energies differ from the pretraining data's (CHGNet: its AtomRef,
  by least squares on the base's residuals; MACE: ``--E0s estimated``). Bespoke models fit
  their offsets from scratch in any case.
- **early stopping**: after every epoch the validation loss (the training objective on the
  validation split) is compared with the best so far; after ``patience`` epochs without
  improvement training stops (:class:`EarlyStopping`, the rule of ``mace_run_train
  --patience``), and at the latest after ``epochs`` epochs. The **final model is the epoch
  with the lowest validation loss**.
- **history**: one record per epoch (epoch 0: the validation errors of the starting model)
  with train and validation loss and energy/force RMSE, for learning curves.

The per-epoch checkpoints go under :func:`umlip_latents.paths.finetune_dir` with a
``models.yml`` that registers every one as a derived model (parent, protocol, data hash,
epoch): features of a fine-tuned model are extracted and cached like those of any other
model. A run is keyed by a hash of everything that can change it (patience and offset refit
included) and is reused when it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .. import paths
from ..datasets import structures_hash
from ..errors import DatasetError, UnsupportedElement
from ..families import source_digest
from ..registry import ModelSpec, get_spec, validate
from ..threads import one_cpu_thread

PROTOCOLS = ("ff", "hf", "newhead", "bespoke")
LABELS = {
    "zero-shot": "zero-shot base",
    "ff": "full fine-tune (FF)",
    "hf": "heads-only (HF)",
    "newhead": "new head (transfer)",
    "bespoke": "bespoke (from scratch)",
    "pretrain": "small model pretrained here (not a foundation model)",
}
#: short names for tables and heatmap axes
SHORT = {"ff": "FF", "hf": "HF", "newhead": "new head", "bespoke": "bespoke"}
BACKENDS = ("chgnet", "mace")
#: bump when a backend changes what a run produces, so cached runs are not reused
RUN_FORMAT = 2
#: columns of a run's history, in the units they are stored in (``None`` where a trainer does not report it)
HISTORY_COLUMNS = ("epoch", "train_loss", "valid_loss", "train_rmse_e_per_atom", "valid_rmse_e_per_atom",
                   "train_rmse_f", "valid_rmse_f")


@dataclass
class FinetuneResult:
    """One training run.

    ``epochs[i]`` is the derived model of epoch ``i + 1`` (every epoch trained, up to the
    early stop); ``final`` is the one with the lowest validation loss (epoch
    ``best_epoch``); ``stopped_early`` says whether patience ran out before the epoch cap.
    ``history`` has one record per epoch from 0 (the starting model, validation only) with
    the keys of :data:`HISTORY_COLUMNS`: ``*_loss`` the family's training objective,
    ``*_rmse_e_per_atom`` in meV/atom, ``*_rmse_f`` in meV/Å (``train_*``: running means over
    the epoch's batches; ``None`` where the trainer reports none), plus what else the trainer
    logs. :meth:`history_frame` gives it as a table.
    """

    backend: str
    protocol: str
    base: str
    final: ModelSpec
    epochs: list[ModelSpec]
    history: list[dict]
    workdir: Path
    seconds: float
    reused: bool = False
    settings: dict = field(default_factory=dict)
    best_epoch: int = 0
    stopped_early: bool = False

    def history_frame(self):
        """``history`` as a pandas DataFrame indexed by epoch (columns :data:`HISTORY_COLUMNS` first)."""
        import pandas as pd

        frame = pd.DataFrame(self.history)
        cols = [c for c in HISTORY_COLUMNS if c in frame] + [c for c in frame if c not in HISTORY_COLUMNS]
        return frame[cols].set_index("epoch").astype(float)


class EarlyStopping:
    """Validation-based early stopping: stop after ``patience`` epochs without improvement.

    An epoch improves when its value is lower than every earlier one (a NaN never does),
    the rule of ``mace_run_train --patience``. ``patience=None`` never stops.

    Examples
    --------
    >>> stop = EarlyStopping(patience=2)
    >>> [stop.update(v) for v in (3.0, 2.0, 2.5, 2.0)]
    [False, False, False, True]
    >>> stop.best_epoch, stop.best
    (2, 2.0)
    """

    def __init__(self, patience: int | None = None):
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.patience = patience
        self.best = float("inf")
        self.best_epoch = 0  # 1-based; 0 until an epoch gave a finite value
        self.epoch = 0
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record the next epoch's validation value; True when training should stop now."""
        self.epoch += 1
        if value < self.best:  # False for NaN
            self.best, self.best_epoch, self.bad_epochs = float(value), self.epoch, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience


def best_epoch(values, patience: int | None = None) -> tuple[int, int]:
    """Where :class:`EarlyStopping` stops on per-epoch ``values`` and which epoch it keeps.

    Returns
    -------
    (stop, best) : tuple of int
        1-based epoch after which training stops (``len(values)`` when patience never runs
        out) and 1-based epoch of the lowest value up to it (0 when none is finite).
    """
    stop = EarlyStopping(patience)
    for value in values:
        if stop.update(value):
            break
    return stop.epoch, stop.best_epoch


def split_structures(structures: list, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list]:
    """Split into ``train``/``valid``/``test`` by a seeded permutation.

    Every part gets at least one structure; ``structures`` must hold at least three.
    """
    n = len(structures)
    if n < 3:
        raise DatasetError(f"need at least 3 structures to split into train/valid/test, got {n}")
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f <= 0).any():
        raise ValueError(f"fractions must be three positive numbers, got {fractions}")
    f = f / f.sum()
    order = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, int(round(f[1] * n)))
    n_test = max(1, int(round(f[2] * n)))
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise DatasetError(f"{n} structures leave no training structure with fractions {tuple(f)}")
    parts = {"train": order[:n_train], "valid": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    return {k: [structures[i] for i in idx] for k, idx in parts.items()}


def within_training_elements(parts: dict[str, list]) -> tuple[dict[str, list], int]:
    """Drop validation/test structures holding an element absent from ``parts["train"]``.

    A bespoke model knows only the training split's elements (and a fine-tuned head was never
    trained on the others), so every protocol is compared on structures all of them can
    treat. Returns the new parts and the number of structures dropped.
    """
    known = {int(z) for a in parts["train"] for z in a.numbers}
    out, dropped = {"train": list(parts["train"])}, 0
    for name in ("valid", "test"):
        out[name] = [a for a in parts[name] if set(int(z) for z in a.numbers) <= known]
        dropped += len(parts[name]) - len(out[name])
    if not out["valid"] or not out["test"]:
        raise DatasetError("no validation or test structure is made only of the training split's elements; "
                           "use more structures or another seed")
    return out, dropped


def check_training_data(structures: list, supported: set[int] | None = None, model: str = "the base model",
                        forces: bool = True) -> None:
    """Raise a clear error for data that cannot be trained on; return None when it can.

    Raises
    ------
    DatasetError
        A structure has no DFT energy (``info["energy"]``), no forces (``arrays["forces"]``,
        when ``forces``), non-finite labels, or a shape mismatch; the message names it.
    UnsupportedElement
        A structure holds an element ``supported`` does not contain (the base model has no
        embedding for it); the message names element, structure and model.
    """
    from ase.data import chemical_symbols

    if not structures:
        raise DatasetError("no training structures")
    for i, atoms in enumerate(structures):
        sid = atoms.info.get("structure_id", f"#{i}")
        energy = atoms.info.get("energy")
        if energy is None:
            raise DatasetError(f"structure {sid}: no DFT energy (info['energy']); fine-tuning needs energies")
        if not np.isfinite(float(energy)):
            raise DatasetError(f"structure {sid}: energy is {energy}")
        if forces:
            f = atoms.arrays.get("forces")
            if f is None:
                raise DatasetError(f"structure {sid}: no forces (arrays['forces']); fine-tuning needs forces")
            if np.shape(f) != (len(atoms), 3) or not np.isfinite(f).all():
                raise DatasetError(f"structure {sid}: forces must be a finite ({len(atoms)}, 3) array")
        if supported is not None:
            bad = sorted(set(int(z) for z in atoms.numbers) - set(supported))
            if bad:
                names = ", ".join(chemical_symbols[z] for z in bad)
                raise UnsupportedElement(f"structure {sid} holds {names}, unknown to {model}: it has no "
                                         "embedding for it, so fine-tuning cannot start from it")


def run_key(settings: dict) -> str:
    """Short hash naming a run folder (every input that can change the run).

    Besides ``settings`` it covers the code that trains: this module, the backend's module
    (``settings["backend"]``, else ``"mace"``) and :mod:`umlip_latents.training`.
    """
    backend = settings.get("backend", "mace")
    code = source_digest((__name__, f"{__name__}.{backend}", "umlip_latents.training"))
    payload = json.dumps({"format": RUN_FORMAT, **settings, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def derived_spec(base: ModelSpec, key: str, checkpoint: Path, protocol: str, data_sha256: str, epoch: int,
                 run: str, n_train: int, label: str, options: dict | None = None) -> ModelSpec:
    """A registry entry for a checkpoint made by a run (validated like any entry).

    It cites the base model's papers; fine-tuned weights keep the base weights' licence, weights
    trained from scratch take none of theirs.
    """
    scratch = protocol in ("bespoke", "pretrain")
    if scratch:
        training = f"{n_train} structures of {label} only (trained from scratch, architecture of {base.key})"
    else:
        training = f"{base.training_data}; then {LABELS[protocol]} on {n_train} structures of {label}"
    raw = {
        "key": key,
        "family": base.family,
        "environment": base.environment,
        "source": {"kind": "local", "path": str(Path(checkpoint).resolve())},
        "training_data": training,
        "functional": base.functional,
        "layers": dict(base.layers),
        "citation": base.citation or f"none: trained here (run {run}, architecture of {base.key})",
        "licence": f"no upstream weights: trained here from scratch (run {run})" if scratch else base.licence,
        "parent": None if scratch else base.key,
        "description": f"{LABELS[protocol]} of {base.key}, epoch {epoch} (run {run})",
        "options": dict(options if options is not None else base.options),
        "derived": {"protocol": protocol, "base": base.key, "data_sha256": data_sha256, "epoch": int(epoch),
                    "run": run},
    }
    return validate(raw, f"run {run}")


def finetune(backend: str, base_model: str | ModelSpec, train: list, valid: list, protocol: str = "ff", *,
             epochs: int = 2, lr: float = 1e-3, seed: int = 0, device: str = "cpu", batch_size: int = 4,
             patience: int | None = None, refit_offsets: bool = True, data_label: str = "fine-tuning data",
             workdir: str | os.PathLike | None = None, recompute: bool = False, **options) -> FinetuneResult:
    """Train ``base_model`` on ``train`` with ``protocol`` and register the checkpoints.

    Parameters
    ----------
    backend : {"chgnet", "mace"}
        The family's trainer. Must match ``base_model``'s family.
    base_model
        Registry key or spec of the pretrained model (for ``"bespoke"``: the model whose
        architecture is trained from scratch).
    train, valid : list of ase.Atoms
        Labelled structures (``info["energy"]`` in eV, ``arrays["forces"]`` in eV/Å).
    protocol : {"ff", "hf", "newhead", "bespoke"}
    epochs, lr, seed, batch_size
        The same for every protocol of a comparison: ``epochs`` is the epoch cap (the learning
        rate schedule spans it), ``seed`` fixes initialisation (bespoke, new heads), shuffling
        and dropout.
    patience
        Stop after this many epochs without a lower validation loss (``None``: train all
        ``epochs``). The final model is the best-validation epoch either way.
    refit_offsets
        Refit the per-element energy offsets on ``train`` before fine-tuning (see the module
        docstring); bespoke models fit theirs regardless.
    data_label
        Name of the data in the derived models' ``training_data``.
    workdir
        Run folder; default ``finetune_dir() / <backend>-<protocol>-<hash>``.
    recompute
        Train again even when the run folder holds a finished run.
    **options
        Backend options (see :mod:`umlip_latents.finetune.chgnet` and ``.mace``).

    Returns
    -------
    FinetuneResult
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    EarlyStopping(patience)  # validates it
    base = get_spec(base_model)
    if base.family != backend:
        raise ValueError(f"base model {base.key} is a {base.family} model; backend {backend!r} cannot train it")
    module = _backend(backend)
    module.check_base(base)
    check_training_data(list(train) + list(valid), module.supported_elements(base, protocol), base.key)

    data_sha = structures_hash(list(train) + list(valid))
    settings = {"backend": backend, "base": base.to_dict(), "protocol": protocol, "epochs": epochs, "lr": lr,
                "seed": seed, "device": device.split(":")[0], "batch_size": batch_size, "patience": patience,
                "refit_offsets": bool(refit_offsets),
                "train": structures_hash(train), "valid": structures_hash(valid),
                "labels": training_labels_hash(list(train) + list(valid)), "options": _options_identity(options),
                "versions": module.versions()}
    run = f"{backend}-{protocol}-{run_key(settings)}"
    folder = Path(workdir) if workdir else paths.finetune_dir() / run
    manifest = folder / "run.json"
    if manifest.exists() and not recompute:
        return _result_from_manifest(manifest, reused=True)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    out = module.train(base, train, valid, protocol, epochs=epochs, lr=lr, seed=seed, device=device,
                       batch_size=batch_size, workdir=folder, patience=patience, refit_offsets=refit_offsets,
                       **options)
    seconds = time.perf_counter() - start
    trained = len(out.epoch_checkpoints)
    if not 1 <= trained <= epochs or not 1 <= out.best_epoch <= trained:
        raise RuntimeError(f"run {run}: {trained} epoch checkpoints (cap {epochs}), best epoch {out.best_epoch}")
    if trained < epochs and not out.stopped_early:
        raise RuntimeError(f"run {run}: {trained} of {epochs} epochs trained without an early stop")
    specs = [derived_spec(base, f"{run}-e{e}", path, protocol, data_sha, e, run, len(train), data_label,
                          out.options) for e, path in enumerate(out.epoch_checkpoints, start=1)]
    with open(folder / "models.yml.tmp", "w") as fh:
        yaml.safe_dump([s.to_dict() for s in specs], fh, sort_keys=False)
    os.replace(folder / "models.yml.tmp", folder / "models.yml")
    record = {"backend": backend, "protocol": protocol, "base": base.key, "run": run, "seconds": seconds,
              "best_epoch": out.best_epoch, "stopped_early": bool(out.stopped_early),
              "history": [{k: row.get(k) for k in HISTORY_COLUMNS} | row for row in out.history],
              "models": [s.key for s in specs], "settings": settings}
    with open(folder / "run.json.tmp", "w") as fh:
        json.dump(record, fh, indent=1, default=str)
    os.replace(folder / "run.json.tmp", manifest)  # written last: a run without it is unfinished
    return _result_from_manifest(manifest, reused=False)


@dataclass
class BackendOutput:
    """What a backend's ``train`` returns: one checkpoint per epoch trained and the best epoch (1-based)."""

    epoch_checkpoints: list[Path]
    history: list[dict]
    best_epoch: int
    stopped_early: bool = False
    options: dict | None = None  # registry options of the derived models (e.g. MACE head)


def _options_identity(options: dict) -> dict:
    """Backend options as they enter a run key: structure lists by content, no timeouts."""
    from ase import Atoms

    out = {}
    for k, v in options.items():
        if k == "timeout":
            continue
        if isinstance(v, (list, tuple)) and v and all(isinstance(a, Atoms) for a in v):
            v = {"structures": structures_hash(v), "labels": training_labels_hash(v)}
        out[k] = v
    return out


def training_labels_hash(structures: list) -> str:
    """sha256 over the DFT energies (and forces) a training set is fitted to."""
    digest = hashlib.sha256()
    for atoms in structures:
        digest.update(np.float64(atoms.info["energy"]).tobytes())
        if "forces" in atoms.arrays:
            digest.update(np.ascontiguousarray(atoms.arrays["forces"], dtype=np.float64).tobytes())
    return digest.hexdigest()


def _result_from_manifest(manifest: Path, reused: bool) -> FinetuneResult:
    record = json.loads(manifest.read_text())
    with open(manifest.parent / "models.yml") as fh:
        specs = [validate(raw, str(manifest.parent)) for raw in yaml.safe_load(fh)]
    best = int(record.get("best_epoch") or len(specs))
    return FinetuneResult(backend=record["backend"], protocol=record["protocol"], base=record["base"],
                          final=specs[best - 1], epochs=specs, history=record["history"], workdir=manifest.parent,
                          seconds=record["seconds"], reused=reused, settings=record["settings"], best_epoch=best,
                          stopped_early=bool(record.get("stopped_early")))


def _backend(name: str):
    if name == "chgnet":
        from . import chgnet as module
    else:
        from . import mace as module
    return module


def evaluate(model: str | ModelSpec, structures: list, device: str = "cpu") -> dict:
    """Energy and force errors of a model against the DFT labels, with its own ASE calculator.

    Returns
    -------
    dict
        ``energy_rmse`` (meV/atom), ``force_rmse`` (meV/Å), ``n_structures``, ``n_atoms``.
    """
    from ..extract import load_adapter

    adapter = load_adapter(model, device=device)
    calc = adapter.calculator()
    de, df = [], []
    with one_cpu_thread(device):
        for atoms in structures:
            a = atoms.copy()
            a.calc = calc
            de.append((a.get_potential_energy() - atoms.info["energy"]) / len(atoms))
            if "forces" in atoms.arrays:
                df.append((a.get_forces() - atoms.arrays["forces"]).ravel())
    de = np.asarray(de)
    df = np.concatenate(df) if df else np.array([np.nan])
    return {"energy_rmse": 1000 * float(np.sqrt(np.mean(de**2))), "force_rmse": 1000 * float(np.sqrt(np.mean(df**2))),
            "n_structures": len(structures), "n_atoms": int(sum(len(a) for a in structures))}
