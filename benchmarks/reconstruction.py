"""Full GFRE and LFRE matrices: :mod:`umlip_latents.metrics` vs scikit-matter called per pair.

On the same features and the same train/test split, every model reconstructs every model
(diagonal included):

- ours: :func:`umlip_latents.metrics.reconstruction_matrix` (one factorisation per source,
  all targets at once, batched local fits);
- baseline: ``skmatter.metrics.pointwise_global_reconstruction_error`` and
  ``pointwise_local_reconstruction_error`` with their defaults, once per (source, target)
  pair, on float64 copies of the features, aggregated as skmatter does (RMS).

Prints one JSON object: per measure the two timings, their ratio and the largest absolute
and relative difference between the two matrices. skmatter's LFRE costs ~20-50 ms per test
atom and pair, so the LFRE part runs on fewer atoms (default 1000 atoms, 40 of them test
atoms; ``--lfre-atoms``, ``--lfre-test``). Both sides use the same number of BLAS/torch
threads (``--threads``, default 1: on a shared machine oversubscribed threads make both
sides erratic). Timings of the GFRE part are the best of ``--repeat`` runs of each side.

Inputs: stored features of ``--dataset`` (every model with ``--layer`` in the store; by
default the store's dataset with most registered models, e.g. the default study set after
``make book``), or with ``--synthetic`` (the default when the
store holds fewer than two models) 8 models of 64-256 dims (64, 64, 96, 128, 128, 128, 192,
256) on 3000 atoms, non-linear maps of a shared latent state plus model-specific parts,
stored as float32. With few stored atoms the test set is capped at a third of them.

    .venv/bin/python benchmarks/reconstruction.py [--synthetic | --dataset NAME] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", action="store_true", help="synthetic features (default without a store)")
    src.add_argument("--dataset", help="store dataset label (folder under the store)")
    p.add_argument("--layer", default="last")
    p.add_argument("--models", nargs="*", help="model keys to use (default: all)")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 64, 96, 128, 128, 128, 192, 256],
                   help="dimensions of the synthetic models (one model each)")
    p.add_argument("--n-atoms", type=int, default=3000, help="atoms of the GFRE part (seeded subsample)")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--lfre-atoms", type=int, default=1000, help="atoms of the LFRE part")
    p.add_argument("--lfre-test", type=int, default=40, help="test atoms of the LFRE part")
    p.add_argument("--lfre-neighbours", type=int, help="n_local_points for every pair (default min(D_s, D_t))")
    p.add_argument("--skip-lfre", action="store_true")
    p.add_argument("--repeat", type=int, default=2, help="GFRE timings: best of this many runs, both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def synthetic(n_atoms: int, seed: int, dims=(64, 64, 96, 128, 128, 128, 192, 256)) -> dict:
    """One 'model' per entry of ``dims``: non-linear maps of a shared latent state plus model-specific parts, float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n_atoms, 24))
    out = {}
    for i, dim in enumerate(dims):
        own = rng.normal(size=(n_atoms, 4))
        z = np.hstack([shared[:, : 12 + 2 * i], own])
        values = np.tanh(z @ rng.normal(size=(z.shape[1], dim)) / np.sqrt(z.shape[1]))
        out[f"model-{i}-d{dim}"] = (values + 0.02 * rng.normal(size=values.shape)).astype(np.float32)
    return out


def stored(dataset: str | None, layer: str) -> tuple[str | None, dict]:
    """Stored features at ``layer`` of the registered models of ``dataset``.

    Without ``dataset``: the store dataset holding most models of the registry (fine-tuned,
    derived models do not count, so the default study set beats a fine-tuning domain), ties
    broken by the number of atoms.
    """
    from umlip_latents import paths
    from umlip_latents.registry import load_registry
    from umlip_latents.store import read_entry

    root = paths.store_dir()
    if not root.exists():
        return dataset, {}
    registered = set(load_registry(derived=False))
    candidates = [root / dataset] if dataset else sorted(p for p in root.iterdir() if p.is_dir())
    best, best_rank = (dataset, {}), (0, 0)
    for folder in candidates:
        entries = {m.name: read_entry(m / layer) for m in sorted(folder.glob("*"))
                   if (m / layer / "meta.json").exists() and (dataset or m.name in registered)}
        rank = (len(entries), max((len(fs.values) for fs in entries.values()), default=0))
        if rank > best_rank:
            best, best_rank = (folder.name, entries), rank
    return best


def best_of(repeat: int, *fns):
    """Smallest wall time of ``repeat`` calls of each of ``fns`` and each one's last result.

    The calls alternate (one of each per round), so that a machine whose speed drifts during
    the run (a shared VM) slows both sides of a ratio alike.
    """
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(min(t), out) for t, out in zip(times, outs)]


def compare(features: dict, n_atoms: int, n_test: int, seed: int, device: str, metric: str, repeat: int = 1,
            n_local_points: int | None = None) -> dict:
    import numpy as np
    import skmatter.metrics as sk

    from umlip_latents.metrics import reconstruction_matrix, split_indices

    keys = list(features)
    n_total = len(next(iter(features.values())))
    rows = np.sort(np.random.default_rng(seed).choice(n_total, min(n_atoms, n_total), replace=False))
    feats = {k: np.asarray(v[rows]) for k, v in features.items()}
    n_test = min(n_test, len(rows) // 3)  # small stores: keep two thirds for training
    train_idx, test_idx = split_indices(len(rows), n_test, None, seed)
    as64 = {k: v.astype(np.float64) for k, v in feats.items()}

    def skm(X, Y):
        if metric == "gfre":
            e = sk.pointwise_global_reconstruction_error(X, Y, train_idx=train_idx, test_idx=test_idx)
        else:
            k = n_local_points or min(X.shape[1], Y.shape[1])
            e = sk.pointwise_local_reconstruction_error(X, Y, k, train_idx=train_idx, test_idx=test_idx)
        return np.linalg.norm(e) / np.sqrt(len(e))

    (t_ours, ours), (t_ref, ref) = best_of(
        repeat,
        lambda: reconstruction_matrix(feats, metric=metric, test_size=n_test, seed=seed, device=device,
                                      n_local_points=n_local_points),
        lambda: {(s, t): skm(as64[s], as64[t]) for s in keys for t in keys})
    mine = ours.set_index(["source", "target"]).value
    diff = np.array([abs(mine[s, t] - ref[s, t]) for s in keys for t in keys])
    scale = np.array([abs(ref[s, t]) for s in keys for t in keys])
    return {
        "measure": metric, "n_local_points": (n_local_points or "min(D_s, D_t)") if metric == "lfre" else None,
        "timing": f"best of {repeat}, alternating", "models": len(keys), "pairs": len(keys) ** 2, "atoms": int(len(rows)),
        "test_atoms": int(len(test_idx)), "dims": [int(v.shape[1]) for v in feats.values()],
        "ours_s": round(t_ours, 3), "skmatter_per_pair_s": round(t_ref, 3), "speedup": round(t_ref / t_ours, 1),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff_where_value_gt_1e-6": float((diff / scale)[scale > 1e-6].max(initial=0.0)),
        "value_range": [float(scale.min()), float(scale.max())],
    }


def main(argv=None) -> int:
    args = parse(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy/torch load their BLAS
    import numpy as np
    import torch

    from umlip_latents.extract.base import resolve_device
    from umlip_latents.metrics import reconstruction_matrix

    torch.set_num_threads(args.threads)
    label, features = (None, {}) if args.synthetic else stored(args.dataset, args.layer)
    if args.dataset and len(features) < 2:
        print(f"store dataset {args.dataset!r} holds {len(features)} model(s) at layer {args.layer!r}; need 2",
              file=sys.stderr)
        return 2
    if len(features) >= 2:
        source = {"kind": "store", "dataset": label, "layer": args.layer}
        features = {k: fs.values for k, fs in features.items()}
    else:
        source = {"kind": "synthetic", "seed": args.seed, "dims": args.dims}
        features = synthetic(max(args.n_atoms, args.lfre_atoms), args.seed, args.dims)
    if args.models:
        features = {k: features[k] for k in args.models}
    device = resolve_device(args.device)
    reconstruction_matrix({k: v[:50] for k, v in list(features.items())[:2]}, test_size=10, device=device)  # warm-up
    from umlip_latents.provenance import run_info

    report = {"input": source, "device": device, "threads": args.threads, "run": run_info(),
              "versions": {"torch": torch.__version__, "numpy": np.__version__},
              "gfre": compare(features, args.n_atoms, args.test_size, args.seed, device, "gfre", args.repeat)}
    if not args.skip_lfre:
        report["lfre"] = compare(features, args.lfre_atoms, args.lfre_test, args.seed, device, "lfre",
                                 n_local_points=args.lfre_neighbours)
    import skmatter

    report["versions"]["skmatter"] = skmatter.__version__
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
