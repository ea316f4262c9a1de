"""A small panel's whole GFRE matrix against scikit-matter called per pair: 4 models of 48-128 dims.

The design asks the matrix to be at least 20 times as fast as scikit-matter per pair also for
a small panel, where fixed costs weigh more than for the 8-model reference panel of
``reconstruction.py``: 4 synthetic models (48, 64, 96 and 128 dims, ``reconstruction.synthetic``)
on 3000 atoms, 1000 of them test atoms, one BLAS/torch thread on both sides, each side's best of
``--repeat`` runs. Same comparison as ``reconstruction.py`` (``compare``), same differences.

Prints one JSON object: the ``gfre`` part and the design's ``target_speedup``.

    .venv/bin/python benchmarks/small_panel.py [--dims 48 64 96 128] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TARGET = 20.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[48, 64, 96, 128])
    p.add_argument("--n-atoms", type=int, default=3000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy/torch load their BLAS
    import torch

    from reconstruction import compare, synthetic
    from umlip_latents.metrics import reconstruction_matrix
    from umlip_latents.provenance import run_info

    torch.set_num_threads(args.threads)
    features = synthetic(args.n_atoms, args.seed, args.dims)
    reconstruction_matrix({k: v[:50] for k, v in list(features.items())[:2]}, test_size=10, device="cpu")  # warm-up
    report = {"input": {"kind": "synthetic", "seed": args.seed, "dims": args.dims}, "device": "cpu",
              "threads": args.threads, "run": run_info(), "target_speedup": TARGET,
              "gfre": compare(features, args.n_atoms, args.test_size, args.seed, "cpu", "gfre", args.repeat)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
