"""Peak memory of the full GFRE matrix at the issue's scale: 200k atoms x 8 models x 512 dims.

Synthetic float32 features (as the store keeps them) of ``--models`` models with ``--dim``
features on ``--atoms`` atoms; :func:`umlip_latents.metrics.reconstruction_matrix` with
``metric="gfre"`` (every model reconstructing every model, 1000 test atoms). Runs in a child
process so that the parent's own memory is not counted; the peak resident set size of the child
(``ru_maxrss``) is reported beside the size of the inputs, and the budget (``--budget-gb``,
24 GB: the machines this study targets) is checked.

Prints one JSON object.

    .venv/bin/python benchmarks/memory.py [--atoms 200000] [--models 8] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(atoms: int, models: int, dim: int, seed: int) -> dict:
    import numpy as np

    from umlip_latents.metrics import reconstruction_matrix

    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((atoms, 32), dtype=np.float32)
    feats = {}
    for m in range(models):
        mix = rng.standard_normal((32, dim), dtype=np.float32) / np.float32(np.sqrt(32))
        x = np.tanh(shared @ mix)
        x += np.float32(0.05) * rng.standard_normal((atoms, dim), dtype=np.float32)
        feats[f"model-{m}"] = x
    inputs = sum(v.nbytes for v in feats.values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    matrix = reconstruction_matrix(feats, metric="gfre", test_size=1000, seed=seed, device="cpu")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"inputs_gb": inputs / 1e9, "rss_before_gb": before * 1024 / 1e9, "peak_rss_gb": peak * 1024 / 1e9,
            "seconds": round(seconds, 1), "pairs": len(matrix), "finite": bool(matrix.value.notna().all())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=200_000)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-gb", type=float, default=24.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.atoms, args.models, args.dim, args.seed)))
        return 0
    cmd = [sys.executable, __file__, "--child", "--atoms", str(args.atoms), "--models", str(args.models),
           "--dim", str(args.dim), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(json.dumps({"error": out.stderr.strip().splitlines()[-1:] or ["child failed"],
                          "returncode": out.returncode}))
        return 1
    result = json.loads(out.stdout.strip().splitlines()[-1])
    from umlip_latents.provenance import run_info

    result.update({"run": run_info(), "atoms": args.atoms, "models": args.models, "dim": args.dim,
                   "budget_gb": args.budget_gb, "within_budget": result["peak_rss_gb"] <= args.budget_gb})
    print(json.dumps(result, indent=1))
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
