"""Batched feature extraction vs a per-structure ASE-calculator loop, on the same structures.

For each offline model: the same N structures of the default set (seeded draw), the model
loaded once for both sides, then

- baseline: the family package's own ASE calculator, ``get_potential_energy`` one structure
  at a time (what a script looping over structures does; calculators also compute forces);
- ours: :func:`umlip_latents.extract.base.run_adapter`, batched, energy-only, with features;
- ours one structure per pass (``batch_size=1``), to tell what batching adds from what the
  energy-only pass (no force backward) adds;
- ours batched with ``workers="auto"`` (one single-thread process per core, same batches), on
  a CPU with more than one core.

On a CPU most of the gain is the energy-only pass: the work is compute-bound and batching
adds little (the adapters' CPU batch sizes are small for that reason). On a GPU, batching
amortises kernel launches over many structures.

Prints one JSON object: per model the four timings, the ratios to the batched time and the
largest energy difference between the batched pass and the calculator (eV/atom). Models
living in another environment are timed in that environment (this script re-runs itself
there).

    .venv/bin/python benchmarks/extraction.py [--models chgnet-0.3.0 sevennet-0] [--n 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np


def time_model(key: str, n: int, seed: int, device: str, layer: str) -> dict:
    from umlip_latents.checks import calculator_energies
    from umlip_latents.datasets import load_dataset
    from umlip_latents.extract import load_adapter
    from umlip_latents.extract.base import run_adapter

    structures = load_dataset("default", limit=n, seed=seed)
    adapter = load_adapter(key, device)
    run_adapter(adapter, structures[:2], layer=layer)  # warm-up (lazy init, allocator)
    t0 = time.perf_counter()
    fs = run_adapter(adapter, structures, layer=layer)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_adapter(adapter, structures, layer=layer, batch_size=1)  # energy-only, one structure per pass
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    par = run_adapter(adapter, structures, layer=layer, workers="auto")
    parallel = time.perf_counter() - t0
    if not np.allclose(par.values, fs.values, rtol=0, atol=1e-4 * float(np.abs(fs.values).max())):
        raise SystemExit(f"{key}: workers={par.meta['workers']} changed the features")
    calc = adapter.calculator()
    t0 = time.perf_counter()
    loop_energy = calculator_energies(calc, structures)
    loop = time.perf_counter() - t0
    n_atoms = np.array([len(a) for a in structures])
    return {
        "model": key, "structures": len(structures), "atoms": int(n_atoms.sum()), "layer": layer,
        "device": adapter.device, "batch_atoms": fs.meta["batch_atoms"], "batched_s": round(batched, 3),
        "single_s": round(single, 3), "ase_loop_s": round(loop, 3), "speedup": round(loop / batched, 2),
        "speedup_of_batching": round(single / batched, 2),
        "workers": par.meta["workers"], "workers_s": round(parallel, 3),
        "speedup_with_workers": round(loop / parallel, 2),
        "max_energy_diff_eV_per_atom": float(np.max(np.abs(fs.energy - loop_energy) / n_atoms)),
    }


def main(argv=None) -> int:
    from umlip_latents.extract import current_environment
    from umlip_latents.families import environment_python
    from umlip_latents.registry import load_registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layer", default="last")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reg = load_registry(derived=False)
    keys = args.models or sorted(k for k, s in reg.items() if s.source["kind"] == "wheel")
    results = []
    for key in keys:
        env = reg[key].environment
        if env == current_environment() or args.inner:
            with contextlib.redirect_stdout(sys.stderr):  # packages print status lines; stdout is the JSON
                results.append(time_model(key, args.n, args.seed, args.device, args.layer))
        else:
            cmd = [str(environment_python(env)), __file__, "--inner", "--models", key, "--n", str(args.n),
                   "--seed", str(args.seed), "--device", args.device, "--layer", args.layer]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, UMLIP_LATENTS_ENV=env))
            if proc.returncode != 0:
                raise SystemExit(f"{key}: benchmark failed in environment {env}:\n{proc.stderr[-2000:]}")
            results.extend(json.loads(proc.stdout.strip().splitlines()[-1])["results"])
    from umlip_latents.provenance import run_info

    print(json.dumps({"benchmark": "extraction", "baseline": "per-structure ASE calculator loop",
                      "run": run_info(), "results": results}, indent=None if args.inner else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
