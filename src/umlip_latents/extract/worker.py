"""Run an extraction inside another family's virtual environment.

The parent writes the structures (exact arrays, no text rounding) and the model spec to a
temporary folder, runs ``<env>/bin/python -m umlip_latents.extract.worker FOLDER`` and reads
the result back. An error in the child comes back as the same exception class with the
child's message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import paths
from ..errors import ERROR_CLASSES, ExtractionFailed, ModelUnavailable
from ..features import Block, FeatureSet, Readout
from ..registry import ModelSpec


def environment_python(name: str) -> Path:
    """The python executable of environment ``name`` (``main`` is the running one)."""
    if name == "main":
        root = paths.project_root() / ".venv"
    else:
        root = paths.envs_dir() / name
    return root / "bin" / "python"


def pack_structures(structures: list, path: Path) -> None:
    """Save numbers, positions, cells, pbc, ids and total charge/spin (NaN: not given) exactly (npz)."""
    n = np.array([len(a) for a in structures], dtype=np.int64)
    np.savez(
        path,
        n_atoms=n,
        numbers=np.concatenate([a.numbers for a in structures]).astype(np.int64) if structures else np.zeros(0, np.int64),
        positions=np.concatenate([a.positions for a in structures]) if structures else np.zeros((0, 3)),
        cells=np.array([a.cell.array for a in structures]).reshape(-1, 3, 3),
        pbc=np.array([a.pbc for a in structures], dtype=bool).reshape(-1, 3),
        ids=np.array([str(a.info.get("structure_id", f"#{i}")) for i, a in enumerate(structures)]),
        charge=np.array([float(a.info.get("charge", np.nan)) for a in structures], dtype=np.float64),
        spin=np.array([float(a.info.get("spin", np.nan)) for a in structures], dtype=np.float64),
    )


def unpack_structures(path: Path) -> list:
    from ase import Atoms

    d = np.load(path)
    out, start = [], 0
    for i, n in enumerate(d["n_atoms"]):
        atoms = Atoms(numbers=d["numbers"][start:start + n], positions=d["positions"][start:start + n],
                      cell=d["cells"][i], pbc=d["pbc"][i])
        atoms.info["structure_id"] = str(d["ids"][i])
        for key in ("charge", "spin"):  # only what the caller gave (models such as UMA's omol read them)
            if key in d.files and not np.isnan(d[key][i]):
                value = float(d[key][i])
                atoms.info[key] = int(value) if value.is_integer() else value
        out.append(atoms)
        start += n
    return out


def save_featureset(fs: FeatureSet, folder: Path) -> None:
    arrays = dict(values=fs.values, structure_index=fs.structure_index, species=fs.species,
                  energy=fs.energy if fs.energy is not None else np.zeros(0))
    if fs.readout is not None:
        arrays.update(readout_weight=fs.readout.weight, readout_bias=fs.readout.bias)
    np.savez(folder / "result.npz", **arrays)
    (folder / "result.json").write_text(json.dumps({
        "blocks": [b.to_dict() for b in fs.blocks], "meta": fs.meta, "structure_ids": fs.structure_ids,
    }))


def load_featureset(folder: Path) -> FeatureSet:
    d = np.load(folder / "result.npz")
    info = json.loads((folder / "result.json").read_text())
    readout = Readout(d["readout_weight"], d["readout_bias"]) if "readout_weight" in d else None
    return FeatureSet(values=d["values"], structure_index=d["structure_index"], species=d["species"],
                      blocks=[Block(**b) for b in info["blocks"]], meta=info["meta"],
                      structure_ids=info["structure_ids"], energy=d["energy"], readout=readout)


def run_in_environment(spec: ModelSpec, structures: list, layer: str, device: str, batch_size: int | None,
                       on_unsupported: str, workers: int | str = 1) -> FeatureSet:
    """Extract in ``spec.environment`` through a child process and return its FeatureSet."""
    python = environment_python(spec.environment)
    if not python.exists():
        raise ModelUnavailable(
            f"model {spec.key} runs in environment {spec.environment!r}, which does not exist at "
            f"{python.parent.parent}; create it with `make setup` (or set UMLIP_LATENTS_ENVS)"
        )
    with tempfile.TemporaryDirectory(prefix="umlip-worker-") as tmp:
        tmp = Path(tmp)
        pack_structures(structures, tmp / "structures.npz")
        (tmp / "request.json").write_text(json.dumps({
            "spec": spec.to_dict(), "layer": layer, "device": device,
            "batch_size": batch_size, "on_unsupported": on_unsupported, "workers": workers,
        }))
        env = dict(os.environ, UMLIP_LATENTS_ENV=spec.environment, UMLIP_LATENTS_ROOT=str(paths.project_root()))
        proc = subprocess.run([str(python), "-m", "umlip_latents.extract.worker", str(tmp)],
                              capture_output=True, text=True, env=env)
        error_file = tmp / "error.json"
        if error_file.exists():
            err = json.loads(error_file.read_text())
            cls = ERROR_CLASSES.get(err["type"], ExtractionFailed)
            raise cls(f"{err['message']} [in environment {spec.environment}]")
        if proc.returncode != 0 or not (tmp / "result.npz").exists():
            raise ExtractionFailed(
                f"model {spec.key}: worker in environment {spec.environment!r} exited with {proc.returncode}:\n"
                f"{proc.stderr.strip()[-3000:]}"
            )
        return load_featureset(tmp)


def main(folder: str) -> int:
    from . import load_adapter
    from .base import run_adapter

    folder = Path(folder)
    req = json.loads((folder / "request.json").read_text())
    try:
        spec = ModelSpec(**req["spec"])
        structures = unpack_structures(folder / "structures.npz")
        adapter = load_adapter(spec, req["device"])
        fs = run_adapter(adapter, structures, layer=req["layer"], batch_size=req["batch_size"],
                         on_unsupported=req["on_unsupported"], workers=req.get("workers", 1))
        save_featureset(fs, folder)
    except Exception as exc:
        name = type(exc).__name__
        (folder / "error.json").write_text(json.dumps({
            "type": name if name in ERROR_CLASSES else "ExtractionFailed",
            "message": str(exc) if name in ERROR_CLASSES else f"{name}: {exc}",
        }))
        if name not in ERROR_CLASSES:
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
