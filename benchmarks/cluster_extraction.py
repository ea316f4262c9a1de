"""Store extraction on a local Dask cluster of 2 workers against one process, on the same structures.

The same N structures of the default set (seeded draw) are extracted into empty feature stores
by :func:`umlip_latents.store.get_features`, in shards of ``--shard-size`` structures:

- baseline: one process (``workers=1``, torch's default threads), once cold (the model loaded
  in the run) and once warm (loaded before);
- one process with ``workers=2`` (two forked single-thread processes, the same batches), warm;
- a local Dask cluster (:mod:`umlip_latents.cluster`, ``local:2``): two worker processes of the
  model's environment, one shard task at a time each, once cold (each worker imports the family
  and loads the model in the run) and once warm; the cluster's start-up (scheduler, workers
  joining) is timed apart and added to the cold ratio.

Every run ends with the entry of the baseline: the report says whether all files (but
``meta.json``, which records timings) of every run are byte-identical to the cold baseline's. On a machine of 2 cores the cluster
cannot beat the forked processes; what it adds is reach (workers on other machines, in other
environments, one GPU each), and the report shows what that costs here.

Prints one JSON object: per model the seconds of each run, the ratios to the baseline and the
byte-identity of the entries.

    .venv/bin/python benchmarks/cluster_extraction.py [--models chgnet-0.3.0] [--n 120] [--shard-size 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: every file of an entry but meta.json
FILES = ("values.npy", "index.parquet", "structures.parquet", "readout.npz")


def entry_bytes(store: Path, model: str) -> dict:
    from umlip_latents.store import entry_dir

    folder = entry_dir("bench", model, "last", store)
    return {name: (folder / name).read_bytes() for name in FILES if (folder / name).exists()}


def time_model(model: str, structures: list, shard_size: int, work: Path) -> dict:
    from umlip_latents.cluster import connect
    from umlip_latents.registry import get_spec
    from umlip_latents.store import get_features

    common = dict(structures=structures, shard_size=shard_size, layer="last")
    runs = {}

    def timed(name, **kw):
        t0 = time.perf_counter()
        get_features("bench", model, store=work / name, **common, **kw)
        runs[f"{name}_s"] = time.perf_counter() - t0

    timed("one_process_cold", device="cpu")  # loads the model (in this process, or its environment's worker)
    timed("one_process", device="cpu")
    timed("one_process_2_forked", device="cpu", workers=2)
    t0 = time.perf_counter()
    with connect("local:2", [get_spec(model).environment]) as client:
        runs["cluster_start_s"] = time.perf_counter() - t0
        timed("dask_local_2_cold", client=client)  # each worker imports the family and loads the model
        timed("dask_local_2", client=client)
    base = entry_bytes(work / "one_process_cold", model)
    out = {k: round(v, 2) for k, v in runs.items()}
    out.update(
        structures=len(structures), atoms=sum(len(a) for a in structures), shards=-(-len(structures) // shard_size),
        forked_speedup=round(runs["one_process_s"] / runs["one_process_2_forked_s"], 2),
        dask_speedup=round(runs["one_process_s"] / runs["dask_local_2_s"], 2),
        dask_speedup_cold=round(runs["one_process_cold_s"] / (runs["dask_local_2_cold_s"] + runs["cluster_start_s"]), 2),
        identical=all(entry_bytes(work / name[:-2], model) == base for name in runs if name != "cluster_start_s"),
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["chgnet-0.3.0"])
    p.add_argument("--n", type=int, default=120, help="structures of the default set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=15)
    args = p.parse_args(argv)

    from umlip_latents.datasets import load_dataset
    from umlip_latents.provenance import run_info

    structures = load_dataset("default", limit=args.n, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="umlip-distributed-"))
    try:
        results = {m: time_model(m, structures, args.shard_size, work / m) for m in args.models}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"run": run_info(), "settings": {"n": args.n, "seed": args.seed, "shard_size": args.shard_size,
                                                      "dataset": "default", "layer": "last"},
                      "results": results}, indent=1))
    return 0 if all(r["identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
