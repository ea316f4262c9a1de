"""Extraction on a Dask cluster: one task per (model, shard), on workers of the model's environment.

A worker tells the scheduler which environment it serves by a Dask resource,
``umlip-env-<name>`` (:func:`resource`) with quantity 1, so each worker runs one extraction at a
time (one GPU per worker), and runs with ``UMLIP_LATENTS_ENV=<name>``. :func:`worker_command`
is the command that starts such a worker from the environment's own Python,
:func:`jobqueue_options` the arguments of a ``dask_jobqueue`` cluster whose jobs are such
workers, and :func:`connect` reaches a cluster (``local:N`` starts N workers per environment on
this machine, ``tcp://HOST:PORT`` or a scheduler file joins a running one). A main-environment
worker may also advertise a family's resource: it then runs that family through the family
environment's worker process on its machine (:func:`umlip_latents.extract.worker.call`), as a
single-process run does.

The driver (:func:`umlip_latents.store.get_features` with ``client=...``) holds the entry's lock
and writes every shard itself. A task receives its structures as exact arrays and answers the
files of a :class:`~umlip_latents.features.FeatureSet` saved on the worker. The driver checks
them (finite, the atoms it sent, in order) and writes each into the entry's staging folder as it
arrives. So the workers need no shared file system, a killed driver resumes from the shards
written, and the entry is assembled by the code of a single-process run: byte-identical to it.

Failures: an error of the toolkit raised on a worker (an unsupported element, a missing
checkpoint) comes back as the same class naming the shard, and the other tasks are cancelled.
Any other exception is retried :data:`RETRIES` times. A worker lost mid-task has its task run
again elsewhere by the scheduler (Dask's ``allowed-failures``), so only that shard is recomputed.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import paths
from .errors import ERROR_CLASSES, DeviceError, ExtractionFailed, ModelUnavailable, StoreError
from .families import environment_python

#: prefix of the resource naming a worker's environment (``umlip-env-main``, ``umlip-env-sevenn`` ...)
RESOURCE_PREFIX = "umlip-env-"
#: re-runs of a task that raised something other than a toolkit error (a lost worker is Dask's
#: ``distributed.scheduler.allowed-failures``)
RETRIES = 2
#: seconds to wait for the workers of a local cluster to join
START_TIMEOUT = 180.0


def resource(env: str) -> str:
    """The Dask resource a worker of environment ``env`` advertises."""
    return f"{RESOURCE_PREFIX}{env}"


def worker_environment(env: str) -> dict:
    """Environment variables of a worker process of ``env``: this process's, with the environment named.

    Dask's statistical profiler (a stack sample every 10 ms) is off unless the variable that sets
    it is given: extraction tasks run for seconds of Python-heavy graph building, which it slows.
    """
    out = dict(os.environ, UMLIP_LATENTS_ENV=env, UMLIP_LATENTS_ROOT=str(paths.project_root()))
    out.setdefault("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False")
    return out


def worker_command(scheduler: str, env: str, name: str | None = None, local_directory: str | None = None,
                   nworkers: int = 1) -> list[str]:
    """Command that starts ``nworkers`` Dask workers of environment ``env`` joining ``scheduler``.

    ``scheduler`` is an address (``tcp://HOST:PORT``) or a scheduler file. Run it with
    :func:`worker_environment` (or ``umlip-latents worker``, which does both).
    """
    python = _python(env)
    target = ["--scheduler-file", scheduler] if scheduler.endswith(".json") else [scheduler]
    cmd = [str(python), "-m", "distributed.cli.dask_worker", *target, "--nworkers", str(nworkers),
           "--nthreads", "1", "--resources", f"{resource(env)}=1", "--no-dashboard"]
    if name:
        cmd += ["--name", name]
    if local_directory:
        cmd += ["--local-directory", local_directory]
    return cmd


def _python(env: str) -> Path:
    python = environment_python(env)
    if not python.exists():
        raise ModelUnavailable(f"environment {env!r} does not exist at {python.parent.parent}: create it with "
                               "`make setup` (or set UMLIP_LATENTS_ENVS)")
    return python


def jobqueue_options(env: str) -> dict:
    """Keyword arguments of a ``dask_jobqueue`` cluster (``SLURMCluster(**jobqueue_options("sevenn"), ...)``)
    whose jobs are workers of ``env``: its Python, its resource, its name in the job's environment."""
    return {"python": str(_python(env)), "processes": 1,
            "worker_extra_args": ["--resources", f"{resource(env)}=1"],
            "job_script_prologue": [f"export UMLIP_LATENTS_ENV={env}",
                                    f"export UMLIP_LATENTS_ROOT={paths.project_root()}"]}


def parse_scheduler(text: str) -> tuple[str, str | int]:
    """``("local", N)``, ``("address", "tcp://...")`` or ``("file", path)``; ValueError for anything else."""
    if text.startswith("local:") and text[6:].isdigit() and int(text[6:]) >= 1:
        return "local", int(text[6:])
    if "://" in text:
        return "address", text
    if text.endswith(".json"):
        if not Path(text).is_file():
            raise ValueError(f"scheduler file {text} does not exist (a Dask scheduler writes it with "
                             "`dask scheduler --scheduler-file PATH`)")
        return "file", text
    raise ValueError(f"scheduler {text!r}: expected local:N (N workers per environment on this machine), "
                     "tcp://HOST:PORT or a scheduler .json file")


@contextlib.contextmanager
def connect(scheduler: str, environments=("main",), timeout: float = 30.0):
    """A ``distributed.Client`` of ``scheduler`` (see :func:`parse_scheduler`), closed on exit.

    ``local:N`` starts a scheduler here and N workers of each of ``environments``, stopped on exit.
    """
    from distributed import Client

    kind, where = parse_scheduler(scheduler)
    if kind == "local":
        with local_cluster(where, environments) as client:
            yield client
        return
    try:
        client = Client(where, timeout=timeout) if kind == "address" else Client(scheduler_file=where, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise StoreError(f"cannot reach the Dask scheduler {scheduler} ({type(exc).__name__}: {exc})") from None
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def local_cluster(n_workers: int, environments=("main",)):
    """A scheduler in this process and ``n_workers`` worker processes per environment, started from each
    environment's Python (:func:`worker_command`); yields a connected ``distributed.Client``."""
    from distributed import Client, LocalCluster

    environments = list(dict.fromkeys(environments))
    for env in environments:  # a missing environment is refused before anything starts
        _python(env)
    with tempfile.TemporaryDirectory(prefix="umlip-dask-") as tmp, \
            LocalCluster(n_workers=0, dashboard_address=":0", processes=True, scheduler_port=0) as cluster:
        procs = []
        try:
            for env in environments:
                for i in range(n_workers):
                    log = open(Path(tmp) / f"{env}-{i}.log", "w+")
                    cmd = worker_command(cluster.scheduler_address, env, name=f"{env}-{i}", local_directory=tmp)
                    procs.append((env, log, subprocess.Popen(cmd, env=worker_environment(env), stdout=log,
                                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))
            client = Client(cluster)
            try:
                _wait_for_workers(client, procs, n_workers * len(environments))
                yield client
            finally:
                client.close()
        finally:
            for _, log, proc in procs:
                proc.terminate()
            for _, log, proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()


def _wait_for_workers(client, procs: list, n: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while len(client.scheduler_info(n_workers=-1)["workers"]) < n:
        for env, log, proc in procs:
            if proc.poll() is not None:
                log.seek(0)
                raise ModelUnavailable(f"a Dask worker of environment {env!r} exited with {proc.returncode} "
                                       f"before joining:\n{log.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise ExtractionFailed(f"{n} Dask workers did not join the local scheduler within {START_TIMEOUT:.0f} s")
        time.sleep(0.2)


def workers_of(client, env: str) -> list[str]:
    """Addresses of the cluster's workers advertising environment ``env``."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if w.get("resources", {}).get(resource(env), 0) >= 1)


def require_workers(client, env: str, what: str) -> list[str]:
    """:func:`workers_of`, or ModelUnavailable naming how to start a worker of ``env``."""
    found = workers_of(client, env)
    if not found:
        seen = sorted({r for w in client.scheduler_info(n_workers=-1)["workers"].values() for r in w.get("resources", {})})
        raise ModelUnavailable(
            f"{what}: no worker of the Dask cluster serves environment {env!r} (resource {resource(env)}; the "
            f"workers advertise {seen or 'no resource'}): start one with `umlip-latents worker --scheduler "
            f"{client.scheduler.address} --env {env}`")
    return found


def resolve_device(client, env: str, device: str, what: str) -> str:
    """``device`` as the workers of ``env`` resolve it (``auto``: their GPU when they see one); all must agree."""
    from .extract.base import resolve_device as resolve_here

    workers = require_workers(client, env, what)
    answers = client.run(resolve_here, device, workers=workers)
    kinds = sorted(set(answers.values()))
    if len(kinds) > 1:
        raise DeviceError(f"{what}: the workers of environment {env!r} resolve device {device!r} differently "
                          f"({answers}); pass one explicitly (e.g. --device cuda)")
    return kinds[0]


def _pack(structures: list) -> bytes:
    from .extract.worker import pack_structures

    buffer = io.BytesIO()
    pack_structures(structures, buffer)
    return buffer.getvalue()


def shard_task(extract, spec: dict, layer: str, packed: bytes, options: dict) -> dict:
    """Run on a worker: the features of the packed structures, as the files of a saved FeatureSet.

    A toolkit error is answered as ``{"error": ...}`` (it would fail the same way again); any
    other exception is raised, and so retried by the scheduler.
    """
    from .extract import extract_features
    from .extract.worker import unpack_structures
    from .registry import ModelSpec

    structures = unpack_structures(io.BytesIO(packed))
    try:
        fs = (extract or extract_features)(ModelSpec(**spec), structures, layer=layer, **options)
    except Exception as exc:
        name = type(exc).__name__
        if name not in ERROR_CLASSES:
            raise
        return {"error": {"type": name, "message": str(exc), "traceback": traceback.format_exc()}}
    with tempfile.TemporaryDirectory(prefix="umlip-shard-") as tmp:
        fs.save(tmp)
        return {"files": {n: (Path(tmp) / n).read_bytes() for n in ("result.npz", "result.json")},
                "worker_env": os.environ.get("UMLIP_LATENTS_ENV", "main")}


def _featureset(files: dict):
    from .features import FeatureSet

    with tempfile.TemporaryDirectory(prefix="umlip-shard-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return FeatureSet.load(tmp)


def run_shards(client, spec, layer: str, jobs: list, options: dict, extract, on_result, what: str) -> None:
    """Extract each ``(start, structures)`` of ``jobs`` as a task on the workers of ``spec.environment``.

    ``on_result(i, featureset)`` is called here, in the order the tasks finish, with the position
    of the job in ``jobs``. The first failure cancels the tasks not yet finished and is raised
    naming its shard.
    """
    from distributed import as_completed

    require_workers(client, spec.environment, what)
    if not jobs:
        return
    futures = {}
    for i, (lo, chunk) in enumerate(jobs):
        future = client.submit(shard_task, extract, spec.to_dict(), layer, _pack(chunk), options,
                               resources={resource(spec.environment): 1}, retries=RETRIES, pure=False,
                               key=f"umlip-{spec.key}-{layer}-{lo}-{os.urandom(4).hex()}")
        futures[future] = i
    try:
        for future in as_completed(list(futures)):
            i = futures[future]
            lo, chunk = jobs[i]
            where = f"{what}: shard of structures {lo}..{lo + len(chunk)} ({chunk[0].info['structure_id']} ...)"
            try:
                answer = future.result()
            except Exception as exc:  # retries spent, or the task's workers kept dying (KilledWorker)
                raise ExtractionFailed(f"{where} failed on the cluster: {type(exc).__name__}: {exc}") from exc
            future.release()
            if "error" in answer:
                err = answer["error"]
                exc = ERROR_CLASSES[err["type"]](f"{where}: {err['message']}")
                exc.add_note(f"traceback on the worker:\n{err['traceback'].rstrip()}")
                raise exc
            on_result(i, _featureset(answer["files"]))
    finally:
        client.cancel([f for f in futures if not f.done()])


def serve_worker(scheduler: str, env: str, nworkers: int = 1):
    """Become Dask workers of ``env`` joining ``scheduler`` (``umlip-latents worker``): this process is replaced
    by :func:`worker_command`, so a batch system's signals reach the workers directly."""
    cmd = worker_command(scheduler, env, nworkers=nworkers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, worker_environment(env))
