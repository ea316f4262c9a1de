"""Extraction on a local Dask cluster (umlip_latents.cluster): the entry a single process writes, byte for byte."""

from __future__ import annotations

import pytest

from umlip_latents import cluster
from umlip_latents.store import entry_dir, get_features

MODEL = "chgnet-0.3.0"  # main environment, weights in the wheel
SEVENN = "sevennet-0"  # the sevenn environment
#: every file of an entry but meta.json (which records timings)
FILES = ("values.npy", "index.parquet", "structures.parquet", "readout.npz")


@pytest.fixture(scope="module")
def client():
    with cluster.connect("local:2", ["main"]) as c:
        yield c


class _NoWorkers:
    """A client whose cluster has no workers (the scheduler's answer, emptied)."""

    def __init__(self, client):
        self.client, self.scheduler = client, client.scheduler

    def scheduler_info(self, **kw):
        return dict(self.client.scheduler_info(**kw), workers={})


def assert_same_entry(store_a, store_b, model, layer="last", label="t"):
    for name in FILES:
        a, b = entry_dir(label, model, layer, store_a) / name, entry_dir(label, model, layer, store_b) / name
        if name == "readout.npz" and layer != "last":
            continue
        assert a.read_bytes() == b.read_bytes(), f"{model}/{layer}: {name} differs"


def test_local_cluster_writes_the_single_process_entry(client, crystals, tmp_path):
    """Shards of 2 structures on 2 workers: every file equal to a run without a cluster."""
    for layer in ("last", "backbone"):
        one = get_features("t", MODEL, layer, structures=crystals, store=tmp_path / "one", shard_size=2, device="cpu")
        many = get_features("t", MODEL, layer, structures=crystals, store=tmp_path / "dask", shard_size=2,
                            client=client)
        assert_same_entry(tmp_path / "one", tmp_path / "dask", MODEL, layer)
        assert many.meta["device"] == one.meta["device"] == "cpu"  # "auto" resolved by the workers
        assert many.meta["cache_key"] == one.meta["cache_key"]
    # the entry is reused, not recomputed, by a run without the cluster
    again = get_features("t", MODEL, structures=crystals, store=tmp_path / "dask", shard_size=2, device="cpu",
                         extract=lambda *a, **k: pytest.fail("the stored entry was not reused"))
    assert again.n_atoms == one.n_atoms


def test_a_lost_worker_loses_only_its_shard(client, crystals, tmp_path):
    """A worker that dies mid-task (its process ends) has its shard run again; the entry is unchanged."""
    from umlip_latents.testing import ExitOnce

    marker = tmp_path / "died"
    get_features("t", MODEL, structures=crystals, store=tmp_path / "one", shard_size=3, device="cpu")
    get_features("t", MODEL, structures=crystals, store=tmp_path / "dask", shard_size=3, client=client,
                 extract=ExitOnce(marker))
    assert marker.exists()  # a worker did die
    assert_same_entry(tmp_path / "one", tmp_path / "dask", MODEL)


def test_a_toolkit_error_names_its_shard_and_stores_nothing(client, crystals, tmp_path):
    from ase import Atoms

    from umlip_latents.errors import UnsupportedElement

    odd = Atoms("Og2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[8, 8, 8], pbc=True)
    odd.info["structure_id"] = "oganesson-dimer"
    structures = list(crystals[:4]) + [odd]
    with pytest.raises(UnsupportedElement, match=r"structures 4\.\.5 .*oganesson-dimer"):
        get_features("t", MODEL, structures=structures, store=tmp_path, shard_size=2, client=client)
    folder = entry_dir("t", MODEL, "last", tmp_path)
    assert not folder.exists()
    # shards that finished before the failure stay for a resume; nothing half-written does
    left = [p.name for p in folder.parent.iterdir()]
    assert all(p.startswith((".last.staging-", ".last.lock")) for p in left), left
    assert not list(folder.parent.glob(".last.staging-*/*.tmp"))


def test_a_model_whose_environment_has_no_worker_is_refused(client, crystals, tmp_path):
    from umlip_latents.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match=r"no worker .* environment 'sevenn'.*umlip-latents worker "
                                               r"--scheduler tcp://.* --env sevenn"):
        get_features("t", SEVENN, structures=crystals, store=tmp_path, client=client)
    # a stored entry is served without a worker of its environment when the device is explicit
    stored = get_features("t", MODEL, structures=crystals, store=tmp_path, device="cpu")
    served = get_features("t", MODEL, structures=crystals, store=tmp_path, device="cpu", client=_NoWorkers(client))
    assert served.meta["cache_key"] == stored.meta["cache_key"]
    with pytest.raises(ModelUnavailable, match="no worker"):
        get_features("t", MODEL, structures=crystals, store=tmp_path, client=_NoWorkers(client))
    with pytest.raises(ValueError, match="start more workers"):
        get_features("t", MODEL, structures=crystals, store=tmp_path, client=client, workers=2)


@pytest.mark.parametrize("text, message", [
    ("local:0", "expected local:N"), ("local:x", "expected local:N"), ("somewhere", "expected local:N"),
    ("missing.json", "does not exist"),
])
def test_bad_scheduler_names_the_forms(text, message):
    with pytest.raises(ValueError, match=message):
        cluster.parse_scheduler(text)


def test_jobqueue_options_make_workers_of_the_environment():
    """The SLURM job script dask-jobqueue renders from jobqueue_options starts a worker of the environment."""
    from dask_jobqueue import SLURMCluster

    options = cluster.jobqueue_options("main")
    with SLURMCluster(cores=1, memory="4GB", job_extra_directives=["--gres=gpu:1"], scheduler_options={
            "dashboard_address": ":0"}, **options) as slurm:
        script = slurm.job_script()
    assert options["python"] in script and "--resources umlip-env-main=1" in script
    assert "export UMLIP_LATENTS_ENV=main" in script and "#SBATCH --gres=gpu:1" in script


@pytest.mark.envs
def test_main_and_sevenn_workers_fill_the_store_as_one_process(crystals, tmp_path):
    """The issue's criterion: a local cluster of a main-environment and a SevenNet-environment worker."""
    with cluster.connect("local:1", ["main", "sevenn"]) as client:
        envs = {e: cluster.workers_of(client, e) for e in ("main", "sevenn")}
        assert all(len(w) == 1 for w in envs.values()), envs
        for model in (MODEL, SEVENN):
            get_features("t", model, structures=crystals, store=tmp_path / "dask", shard_size=3, client=client)
    for model in (MODEL, SEVENN):
        get_features("t", model, structures=crystals, store=tmp_path / "one", shard_size=3, device="cpu")
        assert_same_entry(tmp_path / "one", tmp_path / "dask", model)


def test_worker_command_joins_a_running_scheduler(tmp_path):
    """`umlip-latents worker --scheduler FILE --env main` (the SLURM recipe's worker) joins with its resource."""
    import subprocess
    import sys
    import time

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, dashboard_address=":0", processes=True) as local, Client(local) as client:
        scheduler_file = tmp_path / "scheduler.json"
        client.write_scheduler_file(str(scheduler_file))
        proc = subprocess.Popen([sys.executable, "-m", "umlip_latents.cli", "worker", "--scheduler",
                                 str(scheduler_file), "--env", "main"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not cluster.workers_of(client, "main") and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            assert len(cluster.workers_of(client, "main")) == 1
            assert client.run(lambda: __import__("os").environ["UMLIP_LATENTS_ENV"]) == \
                {cluster.workers_of(client, "main")[0]: "main"}
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def test_streamed_matrix_splits_as_tasks(client, tmp_path):
    """Each split of streamed_matrix a task on the cluster: the values of a run without one."""
    import numpy as np

    from umlip_latents.metrics.streaming import streamed_matrix

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((500, 6))
    paths = {}
    for i, d in enumerate((4, 7, 9)):
        paths[f"m{i}"] = tmp_path / f"m{i}.npy"
        np.save(paths[f"m{i}"], (np.tanh(latent @ rng.standard_normal((6, d))) + 0.1 *
                                 rng.standard_normal((500, d))).astype(np.float32))
    kw = dict(metric=["gfre", "lfre"], test_size=100, seed=1, n_boot=3, device="cpu", chunk_rows=97)
    here, there = streamed_matrix(paths, **kw), streamed_matrix(paths, client=client, **kw)
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(there[col], here[col], rtol=1e-10, atol=1e-14)
    values = [[r["value"] for r in df.attrs["replicates"]] for df in (here, there)]
    np.testing.assert_allclose(values[1], values[0], rtol=1e-10, atol=1e-14)


def test_streamed_matrix_partitions_as_tasks(client, tmp_path):
    """partitions=3: each pass's row ranges are tasks; the values of the same partitions here."""
    import numpy as np
    from distributed import get_task_stream

    from umlip_latents.metrics.streaming import streamed_matrix

    rng = np.random.default_rng(1)
    paths = {}
    for i, d in enumerate((5, 8)):
        paths[f"m{i}"] = tmp_path / f"m{i}.npy"
        np.save(paths[f"m{i}"], rng.standard_normal((400, d)).astype(np.float32))
    kw = dict(metric=["gfre", "gfrd"], test_size=100, seed=2, n_boot=1, device="cpu", chunk_rows=50, partitions=3)
    here = streamed_matrix(paths, **kw)
    with get_task_stream(client) as stream:
        there = streamed_matrix(paths, client=client, **kw)
    np.testing.assert_allclose(there.value, here.value, rtol=1e-12, atol=1e-15)
    partials = [t for t in stream.data if str(t["key"]).startswith("_partial")]
    assert len(partials) == 2 * 3 * 3  # 2 splits x 3 passes (means, factors, errors) x 3 partitions
