"""Out-of-core GFRE matrix against the number of atoms: time, peak memory, equality.

Synthetic stores of ``--atoms`` (default 10^4, 10^5, 10^6) atoms x ``--models`` models x
``--dim`` features (float32 ``.npy`` files, as the feature store keeps them; correlated through
a shared 32-dimensional latent, written a chunk at a time) are reduced to the full GFRE matrix
(every model reconstructing every model, half the atoms train, half test) by
:func:`umlip_latents.metrics.streaming.streamed_matrix`, each size in a child process whose
peak resident set size (``VmHWM``) is reported. At ``--equal-at`` atoms the in-memory
engine (:func:`umlip_latents.metrics.reconstruction_matrix`, the baseline, in another child)
computes the same matrix: the report gives both times, their ratio and the largest relative
difference of the values.

The LFRE matrix (``--lfre-test`` test atoms, the rest train, k = min(D_s, D_t)) is computed at
every size too, by the streamed neighbour search and local fits, and at ``--equal-at`` by the
in-memory engine as well.

Prints one JSON object: ``results`` (one row per size: ``atoms, models, dims, seconds,
peak_rss_gb, us_per_atom``), ``equality``, and the same for LFRE (``lfre_results``,
``lfre_equality``).

    .venv/bin/python benchmarks/scaling.py [--atoms 10000 100000 1000000] [--models 8] [--dim 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATENT = 32
WRITE_ROWS = 50_000


def make_store(folder: Path, atoms: int, models: int, dim: int, seed: int) -> list[Path]:
    """``models`` float32 .npy files of (atoms, dim) rows: tanh of a shared latent's projections, plus noise."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    mix = [np.random.default_rng([seed, m]).standard_normal((LATENT, dim)).astype(np.float32) / np.float32(LATENT ** 0.5)
           for m in range(models)]
    paths = [folder / f"model-{m}.npy" for m in range(models)]
    maps = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(atoms, dim)) for p in paths]
    for lo in range(0, atoms, WRITE_ROWS):
        hi = min(lo + WRITE_ROWS, atoms)
        rng = np.random.default_rng([seed, lo])
        shared = rng.standard_normal((hi - lo, LATENT), dtype=np.float32)
        for m, out in enumerate(maps):
            out[lo:hi] = np.tanh(shared @ mix[m]) + np.float32(0.05) * rng.standard_normal((hi - lo, dim), dtype=np.float32)
    for out in maps:
        out.flush()
    del maps
    return paths


def peak_rss_gb() -> float:
    """This process's peak resident set size: ``VmHWM`` of ``/proc/self/status`` where there is one.

    Not ``ru_maxrss``: Linux carries the forking parent's peak into it across ``execve``, and
    the parent here has just written gigabytes through memory maps.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child(mode: str, paths: list[str], out: str, lfre_test: int) -> None:
    import numpy as np

    from umlip_latents.metrics import reconstruction_matrix
    from umlip_latents.metrics.streaming import streamed_matrix

    metric, test_size = ("lfre", lfre_test) if mode.endswith("lfre") else ("gfre", 0.5)
    t0 = time.perf_counter()
    if mode.startswith("streamed"):
        df = streamed_matrix({Path(p).stem: p for p in paths}, metric, test_size=test_size, seed=0, device="cpu")
    else:
        df = reconstruction_matrix({Path(p).stem: np.load(p) for p in paths}, metric, test_size=test_size, seed=0,
                                   device="cpu")
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    df.to_parquet(out)
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak}))


def run_child(mode: str, paths: list[Path], out: Path, lfre_test: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--out", str(out), "--lfre-test", str(lfre_test),
           "--paths", *map(str, paths)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--equal-at", type=int, default=100_000, help="atoms at which the in-memory engine is compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-gb", type=float, default=4.0, help="peak resident memory allowed at the largest size")
    p.add_argument("--workdir", default=None, help="where the synthetic stores go (default: a temporary folder)")
    p.add_argument("--lfre-test", type=int, default=200, help="test atoms of the LFRE matrix (0: no LFRE)")
    p.add_argument("--child", choices=["streamed", "memory", "streamed-lfre", "memory-lfre"], help=argparse.SUPPRESS)
    p.add_argument("--paths", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.paths, args.out, args.lfre_test)
        return 0

    import numpy as np
    import pandas as pd

    from umlip_latents.provenance import run_info

    work = Path(args.workdir or tempfile.mkdtemp(prefix="umlip-scaling-"))
    results, equality, lfre_results, lfre_equality = [], None, [], None
    try:
        for atoms in sorted(args.atoms):
            folder = work / f"store-{atoms}"
            t0 = time.perf_counter()
            paths = make_store(folder, atoms, args.models, args.dim, args.seed)
            made = time.perf_counter() - t0
            streamed = run_child("streamed", paths, folder / "streamed.parquet")
            results.append({"atoms": atoms, "models": args.models, "dims": args.dim,
                            "seconds": round(streamed["seconds"], 2), "peak_rss_gb": round(streamed["peak_rss_gb"], 3),
                            "us_per_atom": round(1e6 * streamed["seconds"] / atoms, 2),
                            "inputs_gb": round(atoms * args.models * args.dim * 4 / 1e9, 3),
                            "store_written_s": round(made, 1)})
            if args.lfre_test:
                lfre = run_child("streamed-lfre", paths, folder / "lfre.parquet", args.lfre_test)
                lfre_results.append({"atoms": atoms, "models": args.models, "dims": args.dim,
                                     "test_atoms": args.lfre_test, "seconds": round(lfre["seconds"], 2),
                                     "peak_rss_gb": round(lfre["peak_rss_gb"], 3),
                                     "us_per_train_atom": round(1e6 * lfre["seconds"] / (atoms - args.lfre_test), 2)})
                if atoms == args.equal_at:
                    memory = run_child("memory-lfre", paths, folder / "lfre-memory.parquet", args.lfre_test)
                    a = pd.read_parquet(folder / "lfre-memory.parquet").value.to_numpy()
                    b = pd.read_parquet(folder / "lfre.parquet").value.to_numpy()
                    off = np.abs(a) > 1e-6
                    lfre_equality = {"atoms": atoms, "test_atoms": args.lfre_test,
                                     "max_rel_diff": float(np.max(np.abs(a - b)[off] / np.abs(a)[off])),
                                     "max_abs_diff": float(np.max(np.abs(a - b))),
                                     "memory_seconds": round(memory["seconds"], 2),
                                     "memory_peak_rss_gb": round(memory["peak_rss_gb"], 3),
                                     "streamed_seconds": round(lfre["seconds"], 2)}
            if atoms == args.equal_at:
                memory = run_child("memory", paths, folder / "memory.parquet")
                a = pd.read_parquet(folder / "memory.parquet").value.to_numpy()
                b = pd.read_parquet(folder / "streamed.parquet").value.to_numpy()
                off = np.abs(a) > 1e-6
                equality = {"atoms": atoms, "max_rel_diff": float(np.max(np.abs(a - b)[off] / np.abs(a)[off])),
                            "max_abs_diff": float(np.max(np.abs(a - b))),
                            "memory_seconds": round(memory["seconds"], 2),
                            "memory_peak_rss_gb": round(memory["peak_rss_gb"], 3),
                            "streamed_seconds": round(streamed["seconds"], 2),
                            "memory_over_streamed_rss": round(memory["peak_rss_gb"] / streamed["peak_rss_gb"], 2)}
            shutil.rmtree(folder)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    budget = args.budget_gb
    largest = max(results, key=lambda r: r["atoms"])
    within = largest["peak_rss_gb"] <= budget and all(r["peak_rss_gb"] <= budget for r in lfre_results)
    print(json.dumps({"run": run_info(), "settings": {"test_size": 0.5, "metric": "gfre", "models": args.models,
                                                      "dims": args.dim, "budget_gb": budget},
                      "results": results, "equality": equality, "lfre_results": lfre_results,
                      "lfre_equality": lfre_equality, "within_budget": within}, indent=1))
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
