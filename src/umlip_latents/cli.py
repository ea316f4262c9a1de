"""Command line: ``umlip-latents datasets|models|extract|matrix|worker|notebooks``.

Every expected failure (unknown model, missing or truncated checkpoint, malformed file or
geometry, unsupported element, checksum mismatch, a bad limit, seed or device, a store that
cannot be written) prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

from .errors import StoreError, UmlipLatentsError


def _datasets(args) -> int:
    from . import datasets

    reg = datasets.registry()
    if args.action == "list":
        for name, spec in sorted(reg["datasets"].items()):
            print(f"{name:26s} {spec.get('description', '')}")
        for name, spec in sorted(reg.get("collections", {}).items()):
            print(f"{name:26s} collection of {', '.join(spec['members'])}")
        return 0
    names = args.names or [n for n, s in reg["datasets"].items() if "archive" in s]
    for name in names:
        print(f"{name}: {datasets.fetch(name)}")
    return 0


def _models(args) -> int:
    if args.action == "keys":  # no availability probe: for scripts (the Makefile's offline panel)
        from .registry import load_registry

        for key, spec in sorted(load_registry(derived=args.derived).items()):
            if args.source is None or spec.source["kind"] == args.source:
                print(key)
        return 0
    from .extract import models_table
    from .registry import load_registry

    specs = load_registry(derived=args.derived)
    rows = models_table(derived=args.derived)
    width = max([24] + [len(row["key"]) for row in rows])
    for row in rows:
        flag = "yes" if row["available"] else "no "
        print(f"{row['key']:{width}s} {row['family']:9s} env={row['environment']:9s} available={flag} "
              f"file={expected_file(specs[row['key']])} {row['why']}")
    return 0


def expected_file(spec) -> str:
    """Where ``spec``'s weights are expected: the file in the checkpoints folder (``source.filename``
    or ``source.path``; an absolute path as it is), or the wheel that bundles them."""
    from pathlib import Path

    from .paths import checkpoints_dir

    src = spec.source
    if src["kind"] == "wheel":
        return f"({src.get('package', spec.family)} wheel: {src['name']})"
    name = Path(src.get("path") or src.get("filename") or f"{spec.key}.*").expanduser()
    return str(name if name.is_absolute() else checkpoints_dir() / name)


def _extract(args) -> int:
    from tqdm import tqdm

    from .datasets import load_dataset
    from .extract.base import resolve_device
    from .registry import get_spec
    from .store import get_features

    spec = get_spec(args.model)  # fail before any work on an unknown model, device or scheduler
    if args.scheduler is None:
        resolve_device(args.device)  # with a scheduler, the workers resolve it
    else:
        from .cluster import parse_scheduler

        if args.workers != 1:
            raise StoreError("--workers with --scheduler: each Dask worker runs one extraction; start more workers")
        try:
            parse_scheduler(args.scheduler)
        except ValueError as exc:
            raise StoreError(f"--scheduler {exc}") from None
    structures = load_dataset(args.dataset, limit=args.limit, seed=args.seed)
    total = sum(len(a) for a in structures)
    bar = tqdm(total=len(structures), unit="struct", desc=f"{args.model}/{args.layer}", disable=args.quiet or not sys.stderr.isatty())
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        client = None
        if args.scheduler is not None:
            from .cluster import connect

            client = stack.enter_context(connect(args.scheduler, [spec.environment]))
        stack.callback(bar.close)
        fs = get_features(args.dataset, args.model, args.layer, structures=structures, limit=args.limit,
                          seed=args.seed, device=args.device, batch_size=args.batch_size,
                          on_unsupported=args.on_unsupported, recompute=args.recompute, workers=args.workers,
                          progress=lambda n, _atoms: bar.update(n), client=client)
    dt = time.perf_counter() - t0
    skipped = len(fs.meta.get("extraction", {}).get("skipped", []))
    print(f"{args.model} {args.layer}: {fs.n_structures} structures, {fs.n_atoms} atoms (of {total}), "
          f"D={fs.dim}, {dt:.1f} s ({len(structures) / max(dt, 1e-9):.1f} structures/s), skipped {skipped} "
          f"-> {fs.meta.get('dataset_label')}")
    return 0


def _matrix(args) -> int:
    import os
    from pathlib import Path

    from .metrics import reconstruction_matrix
    from .metrics.streaming import STREAMED_METRICS, streamed_matrix

    if len(set(args.models)) != len(args.models):
        raise StoreError(f"--models names a model twice: {args.models}")
    out = Path(args.out)
    if out.suffix != ".parquet":  # before reading (and checksumming) the entries
        raise StoreError(f"--out {out}: the matrix is written as parquet; name a .parquet file")
    from .store import stored_panel

    panel = stored_panel(args.dataset, args.models, args.layer, args.limit, args.seed)
    test_size = args.test_size if args.test_size < 1 else int(args.test_size)
    common = dict(test_size=test_size, seed=args.split_seed, n_boot=args.n_boot, device=args.device)
    streamed = [m for m in args.metric if m in STREAMED_METRICS]
    in_memory = [m for m in args.metric if m not in STREAMED_METRICS]
    if args.scheduler is not None:
        from .cluster import parse_scheduler

        try:
            parse_scheduler(args.scheduler)
        except ValueError as exc:
            raise StoreError(f"--scheduler {exc}") from None
    t0 = time.perf_counter()
    tables = []
    try:
        if streamed:
            with contextlib.ExitStack() as stack:
                client = None
                if args.scheduler is not None:
                    from .cluster import connect

                    client = stack.enter_context(connect(args.scheduler, ["main"]))
                tables.append(streamed_matrix(panel, streamed, chunk_rows=args.chunk_rows, client=client,
                                              partitions=args.partitions,
                                              n_local_points=args.n_local_points, **common))
        if in_memory:  # CKA holds the features in memory
            tables.append(reconstruction_matrix(panel, in_memory, n_local_points=args.n_local_points, **common))
    except ValueError as exc:
        raise StoreError(f"matrix of {', '.join(panel)} on {args.dataset}: {exc}") from exc
    import pandas as pd

    table = pd.concat(tables, ignore_index=True)
    table.attrs = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    table.to_parquet(tmp)
    os.replace(tmp, out)
    n_atoms = next(iter(panel.values())).n_atoms
    print(f"{len(panel)} models x {len(args.metric)} metric(s) on {n_atoms} atoms ({args.layer}) in "
          f"{time.perf_counter() - t0:.1f} s -> {out}")
    return 0


def _worker(args) -> int:
    from .cluster import parse_scheduler, serve_worker
    from .families import load_families

    envs = sorted({row.environment for row in load_families().values()})
    if args.env not in envs:
        raise StoreError(f"--env {args.env!r} is not an environment of models/families.yml ({', '.join(envs)})")
    try:
        kind, _ = parse_scheduler(args.scheduler)
    except ValueError as exc:
        raise StoreError(f"--scheduler {exc}") from None
    if kind == "local":
        raise StoreError("--scheduler local:N starts its own workers; `worker` joins a running scheduler "
                         "(tcp://HOST:PORT or a scheduler .json file)")
    return serve_worker(args.scheduler, args.env, args.nworkers)


def _notebook(args) -> int:
    from pathlib import Path

    from .notebooks import NotebookProgress, run_notebook

    progress = None if args.quiet else NotebookProgress(total=len(args.notebooks), stream=sys.stderr)
    for nb in args.notebooks:
        out = Path(nb) if args.in_place else Path(args.out) / Path(nb).name
        run_notebook(nb, out, args.params, progress=progress)
        print(f"{nb} -> {out}")
    return 0


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, not {text!r}")
    return int(text)


def _fraction_or_count(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < 1 or (value >= 1 and value.is_integer())):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a whole number of atoms, not {text!r}")
    return value


def _workers(text: str) -> int | str:
    from .extract.base import resolve_workers

    value = int(text) if text.lstrip("-").isdigit() else text
    try:
        resolve_workers(value, "cpu")  # the library's own check; the device is known only later
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with bad arguments reported as one ``error:`` line (exit status 2), like other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="umlip-latents", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("datasets", help="list or fetch datasets")
    d.add_argument("action", choices=["list", "fetch"])
    d.add_argument("names", nargs="*")
    d.set_defaults(func=_datasets)
    m = sub.add_parser("models", help="list registered models, the file each expects, whether it loads here")
    m.add_argument("action", choices=["list", "keys"], help="list: with availability; keys: registry keys only")
    m.add_argument("--derived", action="store_true", help="also list the models made by fine-tuning runs")
    m.add_argument("--source", choices=["wheel", "loader", "local"], help="keys: only models of this source kind")
    m.set_defaults(func=_models)
    e = sub.add_parser("extract", help="extract features into the store")
    e.add_argument("--dataset", required=True)
    e.add_argument("--model", required=True)
    e.add_argument("--layer", default="last", choices=["last", "backbone"])
    e.add_argument("--limit", type=_positive, help="structures drawn at random (default: all)")
    e.add_argument("--seed", type=_non_negative, default=0, help="seed of the draw")
    e.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu, cuda or cuda:N")
    e.add_argument("--batch-size", type=_positive,
                   help="atoms per forward pass (default: the family's, small on a CPU, large on a GPU)")
    e.add_argument("--workers", type=_workers, default=1,
                   help="CPU processes of one thread each, or 'auto' (one per core); features do not depend on it")
    e.add_argument("--scheduler", help="extract on a Dask cluster: local:N (N workers of the model's environment "
                   "here), tcp://HOST:PORT or a scheduler .json file (workers from `umlip-latents worker`)")
    e.add_argument("--on-unsupported", default="raise", choices=["raise", "skip"])
    e.add_argument("--recompute", action="store_true")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_extract)
    x = sub.add_parser("matrix", help="GFRE/GFRD/LFRE (out of core) and CKA (in memory) of stored features")
    x.add_argument("--dataset", required=True)
    x.add_argument("--models", nargs="+", required=True)
    x.add_argument("--layer", default="last", choices=["last", "backbone"])
    x.add_argument("--limit", type=_positive, help="the dataset selection the features were extracted on")
    x.add_argument("--seed", type=_non_negative, default=0, help="seed of that selection")
    x.add_argument("--metric", nargs="+", default=["gfre"], choices=["gfre", "gfrd", "lfre", "cka"],
                   help="gfre, gfrd and lfre stream the rows off disk (lfre keeps the test rows in memory); "
                   "cka loads the features into memory")
    x.add_argument("--test-size", type=_fraction_or_count, default=0.5,
                   help="test atoms: a fraction below 1 or a count (default 0.5)")
    x.add_argument("--split-seed", type=_non_negative, default=0, help="seed of the train/test split")
    x.add_argument("--n-boot", type=_non_negative, default=0, help="re-drawn splits for 95 %% intervals")
    x.add_argument("--n-local-points", type=_positive, help="LFRE neighbours (default: min of the two dimensions)")
    x.add_argument("--chunk-rows", type=_positive, help="rows read at a time (default: about 64 MB of float64)")
    x.add_argument("--device", default="auto")
    x.add_argument("--partitions", type=_positive, default=1,
                   help="row ranges each pass over the rows is cut into; with --scheduler each is a task "
                   "(default 1: each split is one task); the same value gives the same numbers with or without")
    x.add_argument("--scheduler", help="compute on a Dask cluster: local:N, tcp://HOST:PORT or a scheduler .json "
                   "file (each split a task, or each partition of each pass with --partitions)")
    x.add_argument("--out", required=True, help="the matrix as a .parquet table (source, target, metric, value, ci)")
    x.set_defaults(func=_matrix)
    w = sub.add_parser("worker", help="run Dask workers of one environment for `extract --scheduler`")
    w.add_argument("--scheduler", required=True, help="tcp://HOST:PORT or a scheduler .json file")
    w.add_argument("--env", default="main", help="the environment the workers run in (models/families.yml)")
    w.add_argument("--nworkers", type=_positive, default=1, help="worker processes (one extraction each)")
    w.set_defaults(func=_worker)
    n = sub.add_parser("notebooks", help="run notebooks with papermill and a params/*.yml file")
    n.add_argument("notebooks", nargs="+")
    n.add_argument("--params", required=True)
    n.add_argument("--out", default="runs")
    n.add_argument("--in-place", action="store_true", help="overwrite the notebooks (to commit smoke outputs)")
    n.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (by default: one per notebook and per executed code cell)")
    n.set_defaults(func=_notebook)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, already reported)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (UmlipLatentsError, OSError) as exc:  # OSError: a full disk, a folder that cannot be written
        text = " ".join(str(exc).split())
        print(f"error: {text if len(text) <= 2000 else text[:2000] + ' ...'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished shards are kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
