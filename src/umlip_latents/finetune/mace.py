"""MACE back end of :func:`umlip_latents.finetune.finetune`, run with mace-torch's ``mace_run_train``.

Every protocol is one ``mace_run_train`` run (through :func:`umlip_latents.training.train_mace`)
in the run folder, in float64, with the run's ``--seed``, ``--lr``, ``--batch_size``,
``--max_num_epochs`` (the epoch cap), on our own train/valid split (``--valid_file``):

``"ff"``
    ``--foundation_model <base> --multiheads_finetuning False``: every weight trains.
``"hf"``
    as ``"ff"`` plus ``--freeze 6``: node embedding, interactions and products are frozen
    (``requires_grad`` off, learning rate 0), only the readouts train.
``"newhead"``
    ``--multiheads_finetuning True --pt_train_file <replay>``: mace builds a two-head model,
    ``pt_head`` (the base's head, trained on replayed pretraining-domain data) and
    ``Default`` (the new head, trained on the fine-tuning data). The derived models carry
    ``options.head = "Default"`` so their features are those of the new head.
    ``--force_mh_ft_lr True`` keeps the run's learning rate and leaves EMA off (mace would
    otherwise switch to lr 1e-4 with EMA for multi-head fine-tuning).
``"bespoke"``
    a model with the base's architecture (class, channels, L, cutoff, radial basis,
    interactions, correlation, readout MLP), initialised from ``--seed``, no foundation.

E0s: ``"foundation"`` for the fine-tuning protocols (the base's isolated-atom energies, so
that the fine-tuned model starts as the base), ``"average"`` for bespoke. With
``refit_offsets`` the E0s are first refitted on the training split, as mace's
``--E0s estimated`` does (the base's E0s plus the per-element least-squares correction of
its residuals): for ``ff``/``hf`` by :func:`refit_e0s`, which writes a copy of the base with
the refitted E0s that is then the ``--foundation_model`` (mace-torch 0.3.16 computes
``estimated`` E0s but then copies the foundation's ``atomic_energies`` buffer over them
whenever the shapes match, i.e. for a single-head fine-tune with
``--foundation_model_elements``, and it zeroes the E0s of the elements absent from the
training file); for ``newhead`` by ``--E0s estimated`` for the new head (the two-head buffer
is not overwritten) while the replay head keeps the base's. The
fine-tuning protocols use ``--foundation_model_elements True`` so that the fine-tuned model
keeps the base's element table (otherwise mace drops the unused elements *and* rescales the
embedding by ``sqrt(n_base / n_kept)``, which changes every feature).

Checkpoints: mace saves a checkpoint only when the validation loss improves and deletes
the previous one; ``--save_all_checkpoints --keep_checkpoints`` make it keep one per epoch
(mace numbers them from 0). Each holds a state dict; the model of epoch ``e`` is rebuilt
from mace's ``.model`` and that state dict and saved as ``epochs/epoch-{e:03d}.model``.
SWA/stage two and EMA are off, so mace's ``.model`` (its latest checkpoint) is the last
epoch's weights; the rebuild is checked against it. The run's final model is the epoch of
lowest validation loss of the new data's head (mace's log, ``results/*_train.txt``) up to
where :class:`umlip_latents.finetune.EarlyStopping` stops; the epochs after that stop are
dropped. (mace-torch 0.3.16's own ``--patience`` logs "Stopping optimization" but only acts
in distributed runs, so a serial run always trains to the cap: early stopping here gives the
run early stopping would have made, not the time it would have saved.)

Options of :func:`train`
------------------------
``replay`` (newhead)
    Pretraining-domain structures replayed on ``pt_head`` (``ase.Atoms`` with energies and
    forces; default: ``n_replay`` seeded frames of ``mptrj-random-1k`` of elements the base
    knows, at most 16 atoms each).
``n_replay`` (newhead)
    Size of the default replay sample (default 20).
``timeout``
    Seconds before ``mace_run_train`` is stopped (default none).
"""

from __future__ import annotations

import copy
import json
import re
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml

from .. import paths
from ..errors import ModelUnavailable
from ..registry import ModelSpec, validate

#: name of the new head mace creates in multi-head fine-tuning, and of the replay head
NEW_HEAD = "Default"
PT_HEAD = "pt_head"
#: ``--freeze`` level that freezes node embedding, interactions and products (readouts train)
FREEZE_HEADS_ONLY = 6
#: parameter-name prefixes frozen by ``--freeze 6``
FROZEN_PREFIXES = ("node_embedding.", "interactions.", "products.")
_NAME = "run"  # --name of every run: the model is <workdir>/run.model


def _torch():
    from ..extract.mace import import_mace

    return import_mace()


def _base_file(base: ModelSpec) -> tuple[Path | None, str]:
    """The base checkpoint on this machine (never downloaded) and why it is or is not."""
    from ..families import adapter_class

    return adapter_class("mace").find_checkpoint(base)


def check_base(base: ModelSpec) -> None:
    """Raise :class:`~umlip_latents.errors.ModelUnavailable` unless the base checkpoint is on disk.

    ``mace_run_train --foundation_model`` needs the ``.model`` file: looked up in
    ``$UMLIP_LATENTS_CHECKPOINTS`` (or the ``local`` source path) and in mace's download
    cache. Nothing is downloaded.
    """
    path, why = _base_file(base)
    if path is not None:
        return
    src = base.source
    if src["kind"] == "loader":
        raise ModelUnavailable(
            f"cannot fine-tune {base.key}: its checkpoint {src['filename']} is neither in "
            f"{paths.checkpoints_dir()} ($UMLIP_LATENTS_CHECKPOINTS) nor in mace's download cache, and "
            f"fine-tuning does not download it (mace_run_train needs the file; offline it cannot be "
            f"fetched). To fix: {why}")
    raise ModelUnavailable(f"cannot fine-tune {base.key}: {why}")


def _load(path: str | Path):
    torch = _torch()
    return torch.load(path, map_location="cpu", weights_only=False)


def _base_model(base: ModelSpec):
    check_base(base)
    return _load(_base_file(base)[0])


def supported_elements(base: ModelSpec, protocol: str) -> set[int] | None:
    """Atomic numbers of the base model's element table (``None`` for bespoke: any element)."""
    if protocol == "bespoke":
        return None
    return {int(z) for z in _base_model(base).atomic_numbers}


def versions() -> dict:
    """Versions of the packages that can change a run (mace-torch, torch, e3nn)."""
    torch = _torch()
    return {"mace-torch": metadata.version("mace-torch"), "torch": torch.__version__,
            "e3nn": metadata.version("e3nn")}


def architecture(model) -> dict:
    """Architecture hyper-parameters of a MACE model, as ``mace_run_train`` options.

    Parameters
    ----------
    model
        A ``ScaleShiftMACE`` module.

    Returns
    -------
    dict
        ``model``, ``num_channels``, ``max_L``, ``r_max``, ``num_interactions``,
        ``correlation`` (the keyword arguments of :func:`~umlip_latents.training.train_mace`)
        and ``extra``: the other options (radial basis, ``max_ell``, interaction classes,
        readout MLP, gate, distance transform, pair repulsion) as a flat argument list.
    """
    from e3nn import o3
    from mace.tools.scripts_utils import extract_config_mace_model

    kind = type(model).__name__
    if kind != "ScaleShiftMACE":  # mace's extract_config_mace_model reads only these
        raise ModelUnavailable(f"cannot copy the architecture of a {kind} model (only ScaleShiftMACE)")
    cfg = extract_config_mace_model(model)
    hidden = o3.Irreps(str(cfg["hidden_irreps"]))
    extra = ["--num_radial_basis", cfg["num_bessel"], "--num_cutoff_basis", int(cfg["num_polynomial_cutoff"]),
             "--max_ell", cfg["max_ell"], "--interaction", cfg["interaction_cls"].__name__,
             "--interaction_first", cfg["interaction_cls_first"].__name__,
             "--MLP_irreps", str(cfg["MLP_irreps"]), "--radial_MLP", str(list(cfg["radial_MLP"])),
             "--radial_type", cfg["radial_type"],
             "--distance_transform", str(cfg["distance_transform"] or "None")]
    gate = cfg.get("gate")
    extra += ["--gate", getattr(gate, "__name__", "None") if gate is not None else "None"]
    if cfg["pair_repulsion"]:
        extra.append("--pair_repulsion")
    return {"model": kind, "num_channels": hidden[0].mul, "max_L": hidden.lmax, "r_max": float(cfg["r_max"]),
            "num_interactions": int(cfg["num_interactions"]), "correlation": int(cfg["correlation"]),
            "extra": [str(a) for a in extra]}


def refit_e0s(base: ModelSpec, structures: list, path: str | Path) -> Path:
    """Write a copy of the base model with its E0s refitted to ``structures``; return its path.

    The correction is the per-element least-squares fit of the residual (DFT energy minus the
    base's prediction) to the element counts, added to the base's E0s (mace's
    ``--E0s estimated``); elements absent from ``structures`` keep theirs. Every head's E0s
    get the same correction.
    """
    from ..extract import load_adapter

    torch = _torch()
    model = _base_model(base)
    calc = load_adapter(base, device="cpu").calculator()
    zs = [int(z) for z in model.atomic_numbers]
    counts = np.zeros((len(structures), len(zs)))
    residual = np.zeros(len(structures))
    for i, atoms in enumerate(structures):
        a = atoms.copy()
        a.calc = calc
        residual[i] = float(atoms.info["energy"]) - a.get_potential_energy()
        for z in atoms.numbers:
            counts[i, zs.index(int(z))] += 1
    present = np.flatnonzero(counts.any(axis=0))
    correction = np.zeros(len(zs))
    correction[present] = np.linalg.lstsq(counts[:, present], residual, rcond=None)[0]
    buffer = model.atomic_energies_fn.atomic_energies
    with torch.no_grad():
        buffer += torch.as_tensor(correction, dtype=buffer.dtype)
    torch.save(model, path)
    return Path(path)


def default_replay(base_elements: set[int], n: int, seed: int) -> list:
    from ..datasets import load_dataset

    frames = [a for a in load_dataset("mptrj-random-1k") if len(a) <= 16 and set(a.numbers) <= base_elements]
    order = np.random.default_rng(seed).permutation(len(frames))[:n]
    return [frames[i] for i in order]


def _epoch_checkpoints(workdir: Path) -> dict[int, Path]:
    """mace's per-epoch checkpoints, by 1-based epoch (mace counts from 0)."""
    pattern = re.compile(rf"^{_NAME}_run-\d+_epoch-(\d+)\.pt$")
    found = {}
    for path in (workdir / "checkpoints").glob("*.pt"):
        m = pattern.match(path.name)
        if m:
            found[int(m.group(1)) + 1] = path
    return found


def _same_weights(a, b) -> bool:
    torch = _torch()
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rebuild_epochs(final_path: Path, workdir: Path) -> list[Path]:
    torch = _torch()
    ckpts = _epoch_checkpoints(workdir)
    epochs = max(ckpts, default=0)
    missing = [e for e in range(1, epochs + 1) if e not in ckpts]
    if missing or not epochs:
        raise RuntimeError(f"mace_run_train in {workdir} left no checkpoint for epochs {missing or [1]} "
                           f"(found {sorted(ckpts)})")
    final = _load(final_path)
    out_dir = workdir / "epochs"
    out_dir.mkdir(exist_ok=True)
    out = []
    for e in range(1, epochs + 1):
        model = copy.deepcopy(final)
        state = torch.load(ckpts[e], map_location="cpu", weights_only=False)["model"]
        model.load_state_dict(state, strict=True)
        path = out_dir / f"epoch-{e:03d}.model"
        torch.save(model, path)
        out.append(path)
        if e == epochs and not _same_weights(model, final):
            raise RuntimeError(f"{ckpts[e].name} (epoch {e}) does not hold the weights of {final_path.name}")
    return out


def read_history(workdir: str | Path, head: str = NEW_HEAD) -> list[dict]:
    """Per-epoch losses and validation errors from mace's ``results/*_train.txt``.

    Parameters
    ----------
    workdir
        Run folder of ``mace_run_train``.
    head
        Head whose validation errors fill ``valid_*``; the other heads' go to
        ``<head>_valid_*``.

    Returns
    -------
    list of dict
        One row per epoch (``epoch`` 0: mace's evaluation before any training, then 1-based):
        ``train_loss`` (mean over the epoch's batches; ``None`` at epoch 0), ``valid_loss``,
        ``valid_rmse_e_per_atom`` (meV/atom), ``valid_rmse_f`` (meV/Å).
    """
    files = sorted(Path(workdir, "results").glob("*_train.txt"))
    if not files:
        return []
    train: dict[int, list[float]] = {}
    rows: dict[int, dict] = {}
    for line in files[-1].read_text().splitlines():
        rec = json.loads(line)
        if rec.get("mode") not in ("opt", "eval"):
            continue
        e = 0 if rec.get("epoch") is None else int(rec["epoch"]) + 1
        if rec.get("mode") == "opt":
            train.setdefault(e, []).append(float(rec["loss"]))
        elif rec.get("mode") == "eval":
            prefix = "valid" if rec.get("head", NEW_HEAD) == head else f"{rec['head']}_valid"
            row = rows.setdefault(e, {"epoch": e})
            row[f"{prefix}_loss"] = float(rec["loss"])
            for k in ("rmse_e_per_atom", "rmse_f"):
                if rec.get(k) is not None:
                    row[f"{prefix}_{k}"] = 1000 * float(rec[k])
    out = []
    for e in sorted(set(rows) | set(train)):
        row = rows.get(e, {"epoch": e})
        row["train_loss"] = float(np.mean(train[e])) if e in train else None
        out.append(row)
    return out


def train(base: ModelSpec, train: list, valid: list, protocol: str, *, epochs: int, lr: float, seed: int,
          device: str, batch_size: int, workdir: str | Path, patience: int | None = None,
          refit_offsets: bool = True, **options):
    """Run one protocol with ``mace_run_train`` in ``workdir``.

    Parameters
    ----------
    base
        The base model (fine-tuning protocols start from its weights, bespoke copies its
        architecture).
    train, valid : list of ase.Atoms
        Labelled structures; ``valid`` is passed as ``--valid_file``.
    protocol : {"ff", "hf", "newhead", "bespoke"}
    epochs, lr, seed, device, batch_size
        ``--max_num_epochs``, ``--lr``, ``--seed``, ``--device`` (without index),
        ``--batch_size``.
    patience
        Epochs without a lower validation loss after which the run counts as stopped
        (``None``: never before ``epochs``; see the module docstring).
    refit_offsets
        Refit the E0s on ``train`` first (see the module docstring).
    workdir
        Run folder (exists and is empty).
    **options
        ``replay``, ``n_replay``, ``timeout`` (see the module docstring).

    Returns
    -------
    umlip_latents.finetune.BackendOutput
    """
    from ..training import train_mace, write_training_file
    from . import BackendOutput, best_epoch, check_training_data

    unknown = set(options) - {"replay", "n_replay", "timeout"}
    if unknown:
        raise ValueError(f"unknown MACE fine-tuning options {sorted(unknown)}")
    workdir = Path(workdir).resolve()
    base_path = _base_file(base)[0]
    model = _base_model(base)
    valid_file = write_training_file(valid, workdir / "valid.xyz")
    extra = ["--valid_file", valid_file, "--lr", lr, "--device", device.split(":")[0],
             "--keep_checkpoints", "--save_all_checkpoints", "--eval_interval", "1",
             "--error_table", "PerAtomRMSE", "--plot", "False"]
    hyper = {"model": type(model).__name__}  # the rest comes from the foundation model
    head = None
    if protocol == "bespoke":
        e0s = "average"
        arch = architecture(model)
        hyper = {k: arch[k] for k in ("model", "num_channels", "max_L", "r_max", "num_interactions", "correlation")}
        extra += arch["extra"]
    else:
        e0s = "estimated" if refit_offsets and protocol == "newhead" else "foundation"
        if refit_offsets and protocol in ("ff", "hf"):
            base_path = refit_e0s(base, train, workdir / "foundation-refit.model")
        extra += ["--foundation_model", base_path, "--foundation_model_elements", "True"]
        if base.options.get("head"):
            extra += ["--foundation_head", base.options["head"]]
        if protocol in ("ff", "hf"):
            extra += ["--multiheads_finetuning", "False"]
        if protocol == "hf":
            extra += ["--freeze", FREEZE_HEADS_ONLY]
        if protocol == "newhead":
            elements = {int(z) for z in model.atomic_numbers}
            replay = options.get("replay")
            if replay is None:
                replay = default_replay(elements, int(options.get("n_replay", 20)), seed)
            check_training_data(list(replay), elements, base.key)
            replay_file = write_training_file(replay, workdir / "replay.xyz")
            extra += ["--multiheads_finetuning", "True", "--pt_train_file", replay_file,
                      "--num_samples_pt", len(replay), "--subselect_pt", "random", "--force_mh_ft_lr", "True"]
            head = NEW_HEAD
    final = train_mace(list(train), workdir, seed, name=_NAME, max_epochs=epochs, batch_size=batch_size,
                       E0s=e0s, extra_args=extra, timeout=options.get("timeout"), **hyper)
    checkpoints = _rebuild_epochs(final, workdir)
    history = read_history(workdir, head=head or NEW_HEAD)
    trained = [row for row in history if row["epoch"] >= 1]
    if len(trained) != len(checkpoints):
        raise RuntimeError(f"mace_run_train in {workdir}: {len(checkpoints)} checkpoints but {len(trained)} "
                           "validated epochs in its log")
    stop, best = best_epoch([row.get("valid_loss", float("nan")) for row in trained], patience)
    checkpoints, history = checkpoints[:stop], [row for row in history if row["epoch"] <= stop]
    # the derived model is a local file with mace's own heads: drop the base's loader and head
    opts = {k: v for k, v in base.options.items() if k not in ("loader", "head")}
    if head is not None:
        opts["head"] = head
    return BackendOutput(epoch_checkpoints=checkpoints, history=history, best_epoch=best or len(checkpoints),
                         stopped_early=len(checkpoints) < epochs, options=opts)


def _layers(num_channels: int, num_interactions: int, mlp: int = 16) -> dict:
    """Registry ``layers`` text of a MACE with linear readouts and a ``mlp``-wide last readout."""
    c, n = num_channels, num_interactions
    linear = f"layer 0 ({c})" if n == 2 else f"layers 0..{n - 2} ({n - 1} x {c})"
    return {"last": f"readout inputs: 0e channels of {linear} + readout-MLP hidden of layer {n - 1} ({mlp})",
            "backbone": f"invariant node features of the {n} interaction layers ({n} x {c}), as "
                        "MACECalculator.get_descriptors"}


def pretrain_base(structures: list, *, seed: int = 0, epochs: int = 20, workdir: str | Path | None = None,
                  label: str = "MPtrj", functional: str = "PBE/PBE+U", **hyper) -> ModelSpec:
    """Train a small MACE from scratch here, as the base of offline MACE fine-tuning.

    This is *not* a foundation model: it knows only the elements of ``structures`` and is
    labelled ``"small model pretrained here (not a foundation model)"``.

    Parameters
    ----------
    structures : list of ase.Atoms
        Pretraining-domain structures with energies and forces (e.g. an MPtrj subset);
        mace holds out ``valid_fraction`` (0.1) of them for validation.
    seed, epochs
        ``--seed`` and ``--max_num_epochs``.
    workdir
        Run folder; default ``finetune_dir() / "mace-pretrain-<hash>"``, where the registry
        finds its ``models.yml`` (a folder elsewhere is not registered).
    label, functional
        Name of the data in ``training_data`` and its DFT functional.
    **hyper
        :func:`~umlip_latents.training.train_mace` options (``num_channels`` 16, ``max_L``
        1, ``r_max`` 4.5, ``num_interactions`` 2, ``correlation`` 2, ``batch_size`` 4 ...).

    Returns
    -------
    ModelSpec
        A derived spec (``derived.protocol == "pretrain"``); reused when the folder holds it.
    """
    from ..datasets import structures_hash
    from ..training import train_mace
    from . import check_training_data, derived_spec, run_key, training_labels_hash

    check_training_data(list(structures))
    hyper = {"num_channels": 16, "max_L": 1, "r_max": 4.5, "num_interactions": 2, "correlation": 2,
             "batch_size": 4, **hyper}
    data_sha = structures_hash(list(structures))
    settings = {"kind": "mace-pretrain", "data": data_sha, "labels": training_labels_hash(list(structures)), "seed": seed,
                "epochs": epochs, "hyper": hyper, "label": label, "functional": functional, "versions": versions()}
    name = f"mace-pretrain-{run_key(settings)}"
    folder = Path(workdir) if workdir else paths.finetune_dir() / name
    registry_file = folder / "models.yml"
    if registry_file.exists():
        with open(registry_file) as fh:
            return validate(yaml.safe_load(fh)[0], str(registry_file))
    model = train_mace(list(structures), folder, seed, name="pretrain", max_epochs=epochs,
                       extra_args=["--plot", "False"], **hyper)
    template = ModelSpec(key=name, family="mace", environment="main", source={"kind": "local", "path": str(model)},
                         training_data=label, functional=functional,
                         layers=_layers(hyper["num_channels"], hyper["num_interactions"]),
                         description="small MACE pretrained here (not a foundation model)")
    spec = derived_spec(template, name, model, "pretrain", data_sha, epochs, name, len(structures), label)
    with open(folder / "models.yml.tmp", "w") as fh:
        yaml.safe_dump([spec.to_dict()], fh, sort_keys=False)
    (folder / "models.yml.tmp").replace(registry_file)
    return spec
