"""Train (or fine-tune) small models with the families' own training scripts.

:func:`train_mace` writes a labelled extended-XYZ file and runs mace-torch's own
``mace_run_train`` console script (from the running environment) as a subprocess. Its
extra-argument passthrough serves fine-tuning too (``--foundation_model ...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: keys the training file uses for the labels; they cannot clash with ASE's calculator names.
ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"
STRESS_KEY = "REF_stress"


def write_training_file(structures: list, path: str | os.PathLike, stress: bool = False) -> Path:
    """Write ``structures`` as extended XYZ with ``REF_*`` labels.

    Energies come from ``info["energy"]`` (eV), forces from ``arrays["forces"]`` (eV/Å) and,
    with ``stress=True``, stresses from ``info["stress"]`` (eV/Å^3, Voigt, ASE sign), as
    :func:`umlip_latents.datasets.load_dataset` stores them. Other labels are dropped so
    that nothing is read back as an ASE calculator result.
    """
    from ase import Atoms
    from ase.io import write

    path = Path(path)
    frames = []
    for i, atoms in enumerate(structures):
        sid = atoms.info.get("structure_id", f"#{i}")
        if "energy" not in atoms.info:
            raise ValueError(f"structure {sid}: no info['energy'] to train on")
        out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        out.info[ENERGY_KEY] = float(atoms.info["energy"])
        out.info["structure_id"] = str(sid)
        if "forces" in atoms.arrays:
            out.arrays[FORCES_KEY] = np.asarray(atoms.arrays["forces"], dtype=float)
        if stress:
            if "stress" not in atoms.info:
                raise ValueError(f"structure {sid}: no info['stress'] but stress=True")
            out.info[STRESS_KEY] = np.asarray(atoms.info["stress"], dtype=float)
        frames.append(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, frames, format="extxyz")
    return path


def _log_tail(workdir: Path, name: str, text: str, lines: int = 40) -> str:
    logs = sorted((p for p in (workdir / "logs").glob(f"{name}*.log") if not p.name.endswith("_debug.log")),
                  key=lambda p: p.stat().st_mtime)
    if logs:
        text = logs[-1].read_text(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def train_mace(structures: list, workdir: str | os.PathLike, seed: int = 0, *, name: str = "mace",
               model: str = "ScaleShiftMACE", max_epochs: int = 20, num_channels: int = 16, max_L: int = 1,
               r_max: float = 4.5, num_interactions: int = 2, correlation: int = 2, batch_size: int = 4,
               valid_fraction: float = 0.1, E0s: str = "average", stress: bool = False,
               extra_args: list | tuple = (), timeout: float | None = None) -> Path:
    """Train a MACE model with ``mace_run_train`` on CPU in float64.

    Parameters
    ----------
    structures
        ``ase.Atoms`` with ``info["energy"]`` and ``arrays["forces"]`` (as loaded by
        :func:`umlip_latents.datasets.load_dataset`).
    workdir
        Folder for the training file, logs, checkpoints and the model (created).
    seed
        ``--seed`` of the run (data split, initialisation, shuffling).
    name
        ``--name``; the model is written to ``<workdir>/<name>.model``.
    model, max_epochs, num_channels, max_L, r_max, num_interactions, correlation, batch_size, valid_fraction, E0s
        Passed as the ``mace_run_train`` options of the same names (``--max_num_epochs``).
    stress
        Also train on stresses (``--compute_stress True``).
    extra_args
        More ``mace_run_train`` arguments, appended last (they override the ones above),
        e.g. ``["--foundation_model", path, "--lr", "0.001"]`` for fine-tuning.
    timeout
        Seconds before the run is stopped.

    The run gets ``OMP_NUM_THREADS=1`` unless the environment sets it.

    Returns
    -------
    Path
        The final ``.model`` file (the stage-two model when ``--swa``/``--stage_two`` made one).

    Raises
    ------
    RuntimeError
        When the run fails or writes no model; the message holds the tail of mace's log.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    train_file = write_training_file(structures, workdir / f"{name}_train.xyz", stress=stress)
    script = Path(sys.executable).parent / "mace_run_train"
    if not script.exists():
        raise RuntimeError(f"{script} not found: install mace-torch in this environment")
    args = [
        str(script),
        "--name", name,
        "--seed", str(seed),
        "--train_file", str(train_file),
        "--valid_fraction", str(valid_fraction),
        "--energy_key", ENERGY_KEY,
        "--forces_key", FORCES_KEY,
        "--E0s", E0s,
        "--model", model,
        "--num_channels", str(num_channels),
        "--max_L", str(max_L),
        "--r_max", str(r_max),
        "--num_interactions", str(num_interactions),
        "--correlation", str(correlation),
        "--batch_size", str(batch_size),
        "--valid_batch_size", str(batch_size),
        "--max_num_epochs", str(max_epochs),
        "--device", "cpu",
        "--default_dtype", "float64",
        "--work_dir", str(workdir),
        "--model_dir", str(workdir),
        "--log_dir", str(workdir / "logs"),
        "--checkpoints_dir", str(workdir / "checkpoints"),
        "--results_dir", str(workdir / "results"),
    ]
    if stress:
        args += ["--stress_key", STRESS_KEY, "--compute_stress", "True"]
    args += [str(a) for a in extra_args]
    # small graphs: torch threads only add synchronisation (and slow down a loaded machine several-fold)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.time()
    try:
        proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise RuntimeError(f"mace_run_train timed out after {timeout} s; log tail:\n"
                           f"{_log_tail(workdir, name, out)}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"mace_run_train failed (exit {proc.returncode}); log tail:\n"
                           f"{_log_tail(workdir, name, proc.stderr + proc.stdout)}")
    two_stage = any(str(a) in ("--swa", "--stage_two") for a in extra_args)
    candidate = workdir / (f"{name}_stagetwo.model" if two_stage else f"{name}.model")
    if candidate.is_file() and candidate.stat().st_mtime >= started:
        return candidate
    raise RuntimeError(f"mace_run_train wrote no {name}.model in {workdir}; log tail:\n"
                       f"{_log_tail(workdir, name, proc.stderr + proc.stdout)}")
