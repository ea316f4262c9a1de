"""Run an extraction inside another family's virtual environment.

The parent writes the structures (exact arrays, no text rounding) and the model spec to a
temporary folder and hands the folder to a worker process running ``<env>/bin/python -m
umlip_latents.extract.worker --serve``, then reads the result back. An error in the child
comes back as the same exception class with the child's message.

The worker of an environment is started on first use and kept for the life of the parent
process, with the models it loaded: importing a family's package and loading a checkpoint
cost ~6 s, which a notebook calling it per shard, per probe and per layer would otherwise pay
every time. It ends when the parent exits (its stdin closes), and is replaced when the
parent's environment variables change (they choose checkpoints and folders).
``UMLIP_LATENTS_KEEP_WORKERS=0`` runs one process per call instead.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
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


class _Server:
    """One long-lived worker process of an environment, answering one request folder at a time."""

    def __init__(self, python: Path, env: dict):
        self.log = tempfile.TemporaryFile(mode="w+", prefix="umlip-worker-log-")
        self.proc = subprocess.Popen([str(python), "-m", "umlip_latents.extract.worker", "--serve"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.owner = os.getpid()
        self.lock = threading.Lock()

    def ask(self, folder: Path) -> str:
        """Hand over a request folder; ``""`` when the process has died (see :meth:`stderr`)."""
        with self.lock:
            try:
                self.proc.stdin.write(f"{folder}\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                return ""
            try:
                return self.proc.stdout.readline().strip()
            except BaseException:  # interrupted mid-request: its answer would answer the next one
                self.proc.kill()
                raise

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        if os.getpid() != self.owner:  # a forked child must not stop its parent's worker
            return
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the worker's loop ends at end of input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


#: live workers by environment name: (key of the environment variables they started with, server)
_SERVERS: dict[str, tuple[str, _Server]] = {}
#: variables that change while the parent runs without changing what a worker computes
_VOLATILE = ("PYTEST_CURRENT_TEST",)
#: holds the exit hook once registered (at the first worker, not at import)
_AT_EXIT: list = []


def _close_servers() -> None:
    for _, server in list(_SERVERS.values()):
        server.close()
    _SERVERS.clear()


def _server(name: str, python: Path, env: dict) -> _Server:
    key = hashlib.sha256(json.dumps(sorted((k, v) for k, v in env.items() if k not in _VOLATILE)).encode()).hexdigest()
    known = _SERVERS.get(name)
    if known is not None and (known[0] != key or known[1].proc.poll() is not None):
        known[1].close()
        known = None
    if known is None:
        if not _AT_EXIT:
            _AT_EXIT.append(atexit.register(_close_servers))
        known = _SERVERS[name] = (key, _Server(python, env))
    return known[1]


def keep_workers() -> bool:
    """Whether workers of other environments are kept between calls (``UMLIP_LATENTS_KEEP_WORKERS``)."""
    return os.environ.get("UMLIP_LATENTS_KEEP_WORKERS", "1") != "0"


def run_in_environment(spec: ModelSpec, structures: list, layer: str, device: str, batch_size: int | None,
                       on_unsupported: str, workers: int | str = 1) -> FeatureSet:
    """Extract in ``spec.environment`` through its worker process and return its FeatureSet."""
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
        if keep_workers():
            server = _server(spec.environment, python, env)
            answer = server.ask(tmp)
            if answer != "done":  # died, or answered out of protocol: this worker is not reused
                server.proc.kill()
            returncode, stderr = (0, "") if answer == "done" else (server.proc.wait(), server.stderr())
        else:
            proc = subprocess.run([str(python), "-m", "umlip_latents.extract.worker", str(tmp)],
                                  capture_output=True, text=True, env=env)
            returncode, stderr = proc.returncode, proc.stderr
        error_file = tmp / "error.json"
        if error_file.exists():
            err = json.loads(error_file.read_text())
            cls = ERROR_CLASSES.get(err["type"], ExtractionFailed)
            raise cls(f"{err['message']} [in environment {spec.environment}]")
        if returncode != 0 or not (tmp / "result.npz").exists():
            raise ExtractionFailed(
                f"model {spec.key}: worker in environment {spec.environment!r} exited with {returncode}:\n"
                f"{stderr.strip()[-3000:]}"
            )
        return load_featureset(tmp)


def handle(folder: str | os.PathLike) -> int:
    """Answer one request folder: ``result.*`` on success, ``error.json`` on a known error.

    Known errors (:data:`ERROR_CLASSES`) return 1; any other exception is written as
    ``ExtractionFailed`` and raised.
    """
    from . import extract_features

    folder = Path(folder)
    req = json.loads((folder / "request.json").read_text())
    try:
        structures = unpack_structures(folder / "structures.npz")
        # in this environment extract_features runs the adapter here, reusing loaded models
        fs = extract_features(ModelSpec(**req["spec"]), structures, layer=req["layer"], device=req["device"],
                              batch_size=req["batch_size"], on_unsupported=req["on_unsupported"],
                              workers=req.get("workers", 1))
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


def serve() -> int:
    """Answer request folders read from stdin, one per line, with ``done`` on the original stdout.

    Anything the packages print goes to stderr, so stdout carries only the answers. An
    unexpected exception (after its ``error.json`` is written) ends the worker; the parent
    starts a new one on its next call.
    """
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        handle(line.strip())
        answers.write("done\n")
        answers.flush()
    return 0


def main(argv: list[str]) -> int:
    return serve() if argv == ["--serve"] else handle(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
