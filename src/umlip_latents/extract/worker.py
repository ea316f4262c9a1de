"""Operations of a model family run in that family's own virtual environment: :func:`call`.

``call(env, op, payload)`` hands one request to a worker process running
``<env>/bin/python -m umlip_latents.extract.worker --serve`` and returns its answer. The ops
(:data:`OPS`) are what the main process needs of an adapter it cannot import: ``extract``
(a :class:`~umlip_latents.features.FeatureSet`), ``availability``, ``versions`` and
``supported_elements``; the main process never re-implements an adapter. A request is a
folder (``request.json``: op and payload; ``structures.npz``: exact arrays, no text
rounding), so the same operation can later be sent to a remote worker by a scheduler.

Errors: an exception raised in the environment comes back as the same class (the toolkit's
own errors) or :class:`~umlip_latents.errors.ExtractionFailed`, with the child's traceback
attached (``exc.remote_traceback``, and as a note shown under the parent's traceback).
Every request has a timeout (:func:`default_timeout`, scaled to the atoms;
``$UMLIP_LATENTS_WORKER_TIMEOUT`` or the ``timeout`` argument override it); a worker that
does not answer in time (hung, stopped) is killed and :class:`WorkerTimeout` says what timed
out and how to raise the limit.

The worker of an environment is started on first use and kept for the life of the parent
process, with the models it loaded: importing a family's package and loading a checkpoint
cost ~6 s, which a notebook calling it per shard, per probe and per layer would otherwise pay
every time. It ends when the parent exits (its stdin closes), and is replaced when it died,
timed out, raised an unexpected error, or when a variable of :func:`worker_environment_key`
changed (those choose checkpoints, folders, devices and threads).
``UMLIP_LATENTS_KEEP_WORKERS=0`` runs one process per call instead.

Request folders are named ``umlip-worker-<parent pid>-*`` in the temporary folder. Nothing is
left when the parent is killed: a kept worker is started before the request folder exists; it is
stopped by a ``quit`` line, so end of input without one means its parent died (mid-request, or
before the request reached it), and it then removes the request folders of dead parents; every
call also removes those.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from .. import paths
from ..datasets import MIN_DISTANCE
from ..errors import ERROR_CLASSES, ExtractionFailed, ModelUnavailable
from ..families import environment_python
from ..features import FeatureSet
from ..registry import ModelSpec

#: variables (exact names, and prefixes ending in ``_``) a kept worker is keyed on: a change
#: replaces it. Others (e.g. pytest's per-test ``PYTEST_CURRENT_TEST``) do not.
KEY_VARIABLES = ("UMLIP_LATENTS_", "HF_", "CUDA_", "TORCH_", "OMP_", "MKL_", "OPENBLAS_", "XDG_", "DP_",
                 "HOME", "PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "DEVICE", "DIEP_MODEL_DIR")
TIMEOUT_VAR = "UMLIP_LATENTS_WORKER_TIMEOUT"
#: request folders are ``<tmp>/umlip-worker-<pid of the parent>-<random>``
REQUEST_PREFIX = "umlip-worker-"
#: the line a parent sends its kept worker to stop it; end of input without it means the parent died
QUIT = "quit"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (an unreaped zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def remove_orphaned_requests(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the request folders (in ``root``, default the temporary folder) of parents no longer alive.

    Returns the folders removed. Folders of live processes, or of other users, are left alone.
    """
    import shutil

    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{REQUEST_PREFIX}*-*"):
        pid = path.name[len(REQUEST_PREFIX):].split("-")[0]
        try:
            if not pid.isdigit() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
        except FileNotFoundError:  # removed meanwhile by another cleaner
            continue
        if not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class WorkerTimeout(ExtractionFailed):
    """A family-environment worker did not answer within its timeout (and was stopped)."""


def default_timeout(op: str, n_atoms: int = 0) -> float:
    """Seconds a request may take: ``$UMLIP_LATENTS_WORKER_TIMEOUT``, else 300 s (start-up, model
    loading) plus 0.2 s per atom for ``extract`` (5 atoms/s, far below any family's CPU rate)."""
    value = os.environ.get(TIMEOUT_VAR)
    if value:
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{TIMEOUT_VAR}={value!r} is not a number of seconds") from None
        if seconds <= 0:
            raise ValueError(f"{TIMEOUT_VAR} must be positive, not {value!r}")
        return seconds
    return 300.0 + (0.2 * n_atoms if op == "extract" else 0.0)


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


def worker_environment_key(env: dict) -> str:
    """sha256 over the variables of :data:`KEY_VARIABLES` in ``env``."""
    def keyed(name):
        return any(name == k or (k.endswith("_") and name.startswith(k)) for k in KEY_VARIABLES)

    return hashlib.sha256(json.dumps(sorted((k, v) for k, v in env.items() if keyed(k))).encode()).hexdigest()


def _readline(fd: int, deadline: float) -> str | None:
    """One line from ``fd`` before ``deadline`` (``time.monotonic``); ``None`` on time-out, ``""`` at EOF."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        data += chunk
    return data.decode().strip()


class _Server:
    """One long-lived worker process of an environment, answering one request folder at a time."""

    def __init__(self, python: Path, env: dict):
        self.log = tempfile.TemporaryFile(mode="w+", prefix="umlip-worker-log-")
        command = [str(python), "-m", "umlip_latents.extract.worker", "--serve", str(os.getpid())]
        self.proc = subprocess.Popen(command, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.owner = os.getpid()
        self.lock = threading.Lock()

    def ask(self, folder: Path, timeout: float) -> str | None:
        """Hand over a request folder: ``"done"``, ``""`` when the process died, ``None`` on time-out.

        A worker that does not answer in time, or whose caller is interrupted, is killed: its
        late answer would answer the next request.
        """
        with self.lock:
            try:
                self.proc.stdin.write(f"{folder}\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                return ""
            try:
                answer = _readline(self.proc.stdout.fileno(), time.monotonic() + timeout)
            except BaseException:
                self.proc.kill()
                raise
            if answer != "done":
                self.proc.kill()
            return answer

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        if os.getpid() != self.owner:  # a forked child must not stop its parent's worker
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(f"{QUIT}\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


#: live workers by environment name: (key of the environment variables they started with, server)
_SERVERS: dict[str, tuple[str, _Server]] = {}
#: holds the exit hook once registered (at the first worker, not at import)
_AT_EXIT: list = []


def close_workers() -> None:
    """Stop every kept worker (they also stop when this process exits)."""
    for _, server in list(_SERVERS.values()):
        server.close()
    _SERVERS.clear()


def _server(name: str, python: Path, env: dict) -> _Server:
    key = worker_environment_key(env)
    known = _SERVERS.get(name)
    if known is not None and (known[0] != key or known[1].proc.poll() is not None):
        known[1].close()
        known = None
    if known is None:
        if not _AT_EXIT:
            _AT_EXIT.append(atexit.register(close_workers))
        known = _SERVERS[name] = (key, _Server(python, env))
    return known[1]


def live_worker(env: str):
    """The ``subprocess.Popen`` of the kept worker of ``env``, or ``None``."""
    known = _SERVERS.get(env)
    return known[1].proc if known is not None else None


def keep_workers() -> bool:
    """Whether workers of other environments are kept between calls (``UMLIP_LATENTS_KEEP_WORKERS``)."""
    return os.environ.get("UMLIP_LATENTS_KEEP_WORKERS", "1") != "0"


def _raise_remote(err: dict, env: str) -> None:
    cls = ERROR_CLASSES.get(err["type"], ExtractionFailed)
    exc = cls(f"{err['message']} [in environment {env}]")
    exc.remote_traceback = err.get("traceback", "")
    if exc.remote_traceback:
        exc.add_note(f"traceback in environment {env}:\n{exc.remote_traceback.rstrip()}")
    raise exc


def _child_environment(env: str) -> dict:
    return dict(os.environ, UMLIP_LATENTS_ENV=env, UMLIP_LATENTS_ROOT=str(paths.project_root()))


def _run(env: str, python: Path, folder: Path, timeout: float) -> tuple[str | None, int, str]:
    """Run the request in ``folder``: (answer, return code, stderr tail); answer ``None`` on time-out."""
    child_env = _child_environment(env)
    if keep_workers():
        server = _server(env, python, child_env)
        answer = server.ask(folder, timeout)
        if answer == "done":
            return answer, 0, ""
        _SERVERS.pop(env, None)
        return answer, server.proc.wait(), server.stderr()
    try:
        proc = subprocess.run([str(python), "-m", "umlip_latents.extract.worker", str(folder)],
                              capture_output=True, text=True, env=child_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, -signal.SIGKILL, ""
    return "done", proc.returncode, proc.stderr


def call(env: str, op: str, payload: dict, structures: list | None = None, timeout: float | None = None,
         what: str = ""):
    """Run operation ``op`` (one of :data:`OPS`) with ``payload`` in environment ``env``; its answer.

    ``extract`` answers a :class:`FeatureSet`, the other ops a JSON value. ``structures``
    travel as exact arrays. ``what`` names the request in errors (e.g. the model key).

    Raises
    ------
    ModelUnavailable
        When the environment does not exist.
    WorkerTimeout
        When the worker did not answer within ``timeout`` seconds (default
        :func:`default_timeout`); the worker is killed.
    ExtractionFailed, or the toolkit error raised in the environment
        With the child's traceback attached.
    """
    if op not in OPS:
        raise ValueError(f"unknown worker op {op!r}; ops: {', '.join(OPS)}")
    what = what or payload.get("spec", {}).get("key", "")
    python = environment_python(env)
    if not python.exists():
        raise ModelUnavailable(
            f"{what or op}: environment {env!r} does not exist at {python.parent.parent}; create it with "
            "`make setup` (or set UMLIP_LATENTS_ENVS)")
    n_atoms = sum(len(a) for a in structures) if structures else 0
    timeout = default_timeout(op, n_atoms) if timeout is None else float(timeout)
    remove_orphaned_requests()
    if keep_workers():
        # started before the request folder exists: a parent killed from then on has a worker
        # that removes the folder (at the end of its input), whether or not it got the request
        _server(env, python, _child_environment(env))
    with tempfile.TemporaryDirectory(prefix=f"{REQUEST_PREFIX}{os.getpid()}-") as tmp:
        tmp = Path(tmp)
        if structures is not None:
            pack_structures(structures, tmp / "structures.npz")
        (tmp / "request.json").write_text(json.dumps({"op": op, "payload": payload}))
        answer, returncode, stderr = _run(env, python, tmp, timeout)
        if answer is None:
            raise WorkerTimeout(
                f"{what}: the {env!r} worker did not answer {op!r} within {timeout:.0f} s and was stopped; if the "
                f"work is that slow, raise the limit with timeout=... or ${TIMEOUT_VAR} (seconds)")
        if (tmp / "error.json").exists():
            _raise_remote(json.loads((tmp / "error.json").read_text()), env)
        if returncode != 0 or not (tmp / "answer.json").exists():
            raise ExtractionFailed(f"{what}: worker in environment {env!r} exited with {returncode}:\n"
                                   f"{stderr.strip()[-3000:]}")
        answer = json.loads((tmp / "answer.json").read_text())
        return FeatureSet.load(tmp) if answer == {"featureset": True} else answer


def run_in_environment(spec: ModelSpec, structures: list, layer: str, device: str, batch_size: int | None,
                       on_unsupported: str, workers: int | str = 1, timeout: float | None = None,
                       min_distance: float | None = MIN_DISTANCE) -> FeatureSet:
    """Extract in ``spec.environment`` through its worker (``call(env, "extract", ...)``).

    The answer is checked again here: a NaN or infinite value never leaves this function.
    """
    payload = {"spec": spec.to_dict(), "layer": layer, "device": device, "batch_size": batch_size,
               "on_unsupported": on_unsupported, "workers": workers, "min_distance": min_distance}
    fs = call(spec.environment, "extract", payload, structures=structures, timeout=timeout)
    return fs.require_finite(f"model {spec.key} ({layer}, environment {spec.environment})")


# -- the worker side ----------------------------------------------------------------------------
def _op_extract(payload: dict, folder: Path):
    from . import extract_features

    structures = unpack_structures(folder / "structures.npz")
    # in this environment extract_features runs the adapter here, reusing loaded models
    fs = extract_features(ModelSpec(**payload["spec"]), structures, layer=payload["layer"], device=payload["device"],
                          batch_size=payload["batch_size"], on_unsupported=payload["on_unsupported"],
                          workers=payload.get("workers", 1), min_distance=payload.get("min_distance", MIN_DISTANCE))
    fs.save(folder)
    return {"featureset": True}


def _op_availability(payload: dict, folder: Path):
    from ..families import adapter_class

    spec = ModelSpec(**payload["spec"])
    ok, why = adapter_class(spec.family).availability(spec)
    return {"available": bool(ok), "why": why}


def _loaded(payload: dict):
    from . import loaded_adapter

    return loaded_adapter(ModelSpec(**payload["spec"]), payload.get("device", "cpu"))


def _op_versions(payload: dict, folder: Path):
    return _loaded(payload).versions()


def _op_supported_elements(payload: dict, folder: Path):
    return sorted(int(z) for z in _loaded(payload).supported_elements)


#: what a worker answers
OPS = {"extract": _op_extract, "availability": _op_availability, "versions": _op_versions,
       "supported_elements": _op_supported_elements}


def handle(folder: str | os.PathLike) -> int:
    """Answer one request folder: ``answer.json`` (and the result) on success, ``error.json`` on an error.

    Known errors (:data:`ERROR_CLASSES`) return 1; any other exception is written as
    ``ExtractionFailed`` (with its traceback) and raised.
    """
    folder = Path(folder)
    req = json.loads((folder / "request.json").read_text())
    try:
        answer = OPS[req["op"]](req["payload"], folder)
        (folder / "answer.json").write_text(json.dumps(answer))
    except Exception as exc:
        name = type(exc).__name__
        (folder / "error.json").write_text(json.dumps({
            "type": name if name in ERROR_CLASSES else "ExtractionFailed",
            "message": str(exc) if name in ERROR_CLASSES else f"{name}: {exc}",
            "traceback": traceback.format_exc(),
        }))
        if name not in ERROR_CLASSES:
            raise
        return 1
    return 0


def serve(parent: int | None = None) -> int:
    """Answer request folders read from stdin, one per line, with ``done`` on the original stdout.

    Anything the packages print goes to stderr, so stdout carries only the answers. An
    unexpected exception (after its ``error.json`` is written) ends the worker; the parent
    starts a new one on its next call.
    """
    import shutil

    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # the pid the parent gave, not getppid() here: a parent killed while this process was still
    # importing has already been replaced by init (and a wrapper script may stand in between)
    parent = os.getppid() if parent is None else parent
    for line in sys.stdin:
        if line.strip() == QUIT:
            return 0
        folder = Path(line.strip())
        handle(folder)
        try:
            if not _alive(parent):  # killed mid-request: nobody reads or removes the answer
                raise BrokenPipeError
            answers.write("done\n")
            answers.flush()
        except BrokenPipeError:
            if folder.name.startswith(REQUEST_PREFIX):
                shutil.rmtree(folder, ignore_errors=True)
            break
    # end of input without QUIT: the parent died, maybe before its request reached this process.
    # Its pipe closes a moment before it is reaped, so wait for that, then remove the request
    # folders of dead parents (never of a live process: a reused pid is left alone).
    deadline = time.monotonic() + 10
    while _alive(parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    remove_orphaned_requests()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        return serve(int(argv[1]) if len(argv) > 1 else None)
    return handle(argv[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
