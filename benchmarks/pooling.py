"""Vectorised cumulant pooling vs a per-structure loop over scipy central moments.

On the same random features (``--structures`` structures of ``--atoms`` atoms each, ``--dim``
features, float32, atoms shuffled across structures as in a real feature store):

- baseline: for each structure, ``scipy.stats.moment`` for orders 2..k, then the
  moment-cumulant recursion (what a script looping over structures does);
- ours: :func:`umlip_latents.pooling.cumulant_features`, all structures at once.

Raw cumulants (no transform) on both sides. Prints one JSON object: per order the two
timings (best of ``--repeats``), their ratio and the largest absolute difference.

    .venv/bin/python benchmarks/pooling.py [--structures 2000] [--atoms 20] [--dim 128]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats

from umlip_latents.pooling import cumulant_features, cumulants_from_central_moments
from umlip_latents.provenance import run_info


def loop_baseline(values: np.ndarray, index: np.ndarray, order: int) -> np.ndarray:
    """Per-structure scipy loop; rows grouped with one argsort so only the moments are timed."""
    n_struct, dim = index.max() + 1, values.shape[1]
    order_atoms = np.argsort(index, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(index, minlength=n_struct))))
    out = np.empty((n_struct, order * dim))
    for s in range(n_struct):
        x = values[order_atoms[bounds[s]:bounds[s + 1]]].astype(np.float64)
        out[s, :dim] = x.mean(axis=0)
        if order > 1:
            mu = {n: stats.moment(x, order=n, axis=0) for n in range(2, order + 1)}
            for n, k in cumulants_from_central_moments(mu).items():
                out[s, (n - 1) * dim:n * dim] = k
    return out


def best_time(fn, repeats: int):
    best, result = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=2000)
    parser.add_argument("--atoms", type=int, default=20)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--orders", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    index = np.repeat(np.arange(args.structures), args.atoms)
    rng.shuffle(index)
    values = rng.normal(size=(len(index), args.dim)).astype(np.float32)

    report = {"n_structures": args.structures, "atoms_per_structure": args.atoms,
              "dim": args.dim, "numpy": np.__version__, "run": run_info(), "orders": {}}
    for order in args.orders:
        fast, ours = best_time(lambda: cumulant_features(values, index, order=order,
                                                         transform=None), args.repeats)
        slow, base = best_time(lambda: loop_baseline(values, index, order), 1)
        report["orders"][str(order)] = {
            "vectorised_s": round(fast, 4),
            "scipy_loop_s": round(slow, 4),
            "speedup": round(slow / fast, 1),
            "max_abs_diff": float(np.max(np.abs(ours - base))),
            "max_abs_value": float(np.max(np.abs(base))),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
