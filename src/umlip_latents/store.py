"""On-disk feature store: extract once, reuse everywhere.

Layout: ``<store>/<dataset>/<model>/<layer>/`` holding

- ``values.npy``   float32 (n_atoms, D), memory-mappable;
- ``index.parquet`` one row per atom: structure_index, structure_id, atom_index, Z, subset;
- ``structures.parquet`` one row per structure: structure_id, subset, n_atoms, model energy, DFT energy;
- ``readout.npz``  (layer ``last``) the model's readout weights;
- ``meta.json``    model key and spec, checkpoint sha256, package versions, layer, blocks,
  dataset hash, parameters, timings and the cache key.

The cache key hashes every input (model spec, layer, the structures' numbers, positions, cells
and pbc, device, package versions, and the code that makes the features: the family's adapter
module and the modules every adapter shares, :func:`umlip_latents.families.code_digest`): a stored entry is reused only when the key matches, and any
change recomputes. Writes are atomic. Extraction runs in shards of ``shard_size`` structures
written to a staging folder; a run killed mid-way resumes from the finished shards and ends
byte-identical to an uninterrupted run.

What an entry holds is checked at every step, so the store never serves a wrong number:

- before any work, every structure is validated (no atoms closer than ``min_distance``, a full
  cell along periodic directions ...) and the ids are unique (absent ones are assigned);
- a NaN or infinite feature or energy is an error, never stored;
- each shard records its structure range, the structures' hash and ids: a resume (even with
  another ``shard_size`` or ``on_unsupported``) uses only shards holding exactly its own chunks;
- ``meta.json`` records the size and sha256 of every file (:mod:`umlip_latents.store_integrity`):
  a damaged entry is recomputed with a :class:`~umlip_latents.errors.StoreWarning`, or raises
  :class:`~umlip_latents.errors.EntryDamaged` naming it where it cannot be (:func:`read_entry`,
  a read-only store);
- an entry is written under an exclusive lock (``.<layer>.lock`` beside it): a second process
  waits, then reads the finished entry; what a failed or killed writer left is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from . import paths
from .datasets import MIN_DISTANCE, load_dataset, structure_ids, structures_hash, validate_structure, with_ids
from .errors import EntryDamaged, ExtractionFailed, StoreError, StoreWarning, StructureError, UmlipLatentsError, UnsupportedElement
from .families import code_digest, environment_python, get_family
from .features import Block, FeatureSet, Readout
from .registry import ModelSpec, get_spec, local_checkpoint
from .store_integrity import acquire, file_records, release, verify_files

#: 2: per-file checksums in meta.json, shards named by their structure range (format-1 entries recompute)
FORMAT_VERSION = 2


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def family_versions(spec: ModelSpec) -> dict:
    """Versions of the family's distributions (its row's ``versions``) in the environment the model
    runs in, read from that environment's metadata without importing anything."""
    wanted = {_normal(d): d for d in get_family(spec.family).versions}
    if spec.environment == "main":
        return {d: _package_version(d) for d in wanted.values()}
    site = list(environment_python(spec.environment).parent.parent.glob("lib/python*/site-packages"))
    out = dict.fromkeys(wanted.values())
    for dist in metadata.distributions(path=[str(s) for s in site]):
        name = _normal(dist.metadata["Name"] or "")
        if name in wanted:
            out[wanted[name]] = dist.version
    return out


def cache_key(spec: ModelSpec, layer: str, structures_sha: str, device: str, labels_sha: str | None = None) -> str:
    """sha256 over every input that can change the entry: the features and the labels stored beside them.

    ``labels_sha`` (:func:`labels_hash`) covers the ids, subsets and DFT labels written to the
    entry's index. ``on_unsupported`` is not part of the key: an entry that skipped nothing
    serves both kinds of caller, and :func:`get_features` never serves an entry that skipped
    structures to a caller who asked for an error.
    """
    ckpt = local_checkpoint(spec)
    payload = {
        "format": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "layer": layer,
        "structures": structures_sha,
        "labels": labels_sha,
        "device": device.split(":")[0],
        "umlip_latents": _package_version("umlip-latents"),
        "family": family_versions(spec),
        "code": code_digest(spec.family),
        "checkpoint": _file_identity(ckpt) if ckpt else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def labels_hash(structures) -> str:
    """sha256 over each structure's id, dataset, subset and DFT energy (the labels an entry stores)."""
    digest = hashlib.sha256()
    for atoms in structures:
        info = atoms.info
        labels = [info.get("structure_id"), info.get("dataset"), info.get("subset"), info.get("energy")]
        digest.update(json.dumps(labels, default=str).encode())
    return digest.hexdigest()


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def entry_dir(dataset: str, model: str, layer: str, store: str | os.PathLike | None = None) -> Path:
    """Folder of one (dataset, model, layer) entry."""
    root = Path(store) if store else paths.store_dir()
    return root / dataset / model / layer


def _shard_name(lo: int, hi: int) -> str:
    return f"shard-{lo:06d}-{hi:06d}"


def _shard_record(chunk: list, lo: int) -> dict:
    """What a shard of ``chunk`` (structures ``lo`` .. ``lo + len(chunk)`` of the call) must hold."""
    return {"start": lo, "stop": lo + len(chunk), "structures_sha256": structures_hash(chunk),
            "ids": [str(a.info["structure_id"]) for a in chunk]}


def _write_shard(path: Path, fs: FeatureSet, record: dict) -> None:
    tmpdir = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir()
    fs.save(tmpdir)
    record = dict(record, files=file_records(tmpdir, ["result.npz", "result.json"]))
    (tmpdir / "shard.json").write_text(json.dumps(record))
    shutil.rmtree(path, ignore_errors=True)  # a damaged or foreign shard of the same range
    os.replace(tmpdir, path)


def _check_holds(fs: FeatureSet, structures: list, what: str) -> None:
    """Raise :class:`ExtractionFailed` unless ``fs`` holds exactly ``structures`` less the ones it skipped, in order."""
    skipped = {str(s) for s in fs.meta.get("skipped", [])}
    kept = [a for a in structures if str(a.info["structure_id"]) not in skipped]
    if [str(s) for s in fs.structure_ids] != [str(a.info["structure_id"]) for a in kept] or \
            len(skipped) + len(kept) != len(structures):
        raise ExtractionFailed(f"{what} holds structures {fs.structure_ids[:3]}..., not the {len(kept)} given")
    counts = np.bincount(fs.structure_index, minlength=fs.n_structures) if fs.n_atoms else np.zeros(0, np.int64)
    if counts.tolist() != [len(a) for a in kept] or \
            (kept and not np.array_equal(fs.species, np.concatenate([a.numbers for a in kept]))):
        raise ExtractionFailed(f"{what}: its atoms are not those of the structures given")
    if fs.energy is None or len(fs.energy) != fs.n_structures:
        raise ExtractionFailed(f"{what}: one energy per structure is missing")


def _load_shard(path: Path, record: dict, chunk: list, on_unsupported: str) -> FeatureSet | None:
    """The finished shard at ``path`` when it holds exactly ``chunk`` as this call asks, else ``None``.

    A shard of another chunking (a resume with another ``shard_size``) or of other structures is
    never used; one that skipped structures is not used by a caller asking for an error; a
    damaged one is recomputed with a :class:`StoreWarning`.
    """
    if not path.exists():
        return None
    try:
        stored = json.loads((path / "shard.json").read_text())
        if {k: stored.get(k) for k in record} != record:
            return None
        verify_files(path, stored["files"], f"shard {path}")
        fs = FeatureSet.load(path)
        _check_holds(fs, chunk, f"shard {path}")
        fs.require_finite(f"shard {path}")
    except (OSError, ValueError, KeyError, UmlipLatentsError) as exc:
        warnings.warn(f"{exc}; recomputing it" if isinstance(exc, EntryDamaged) else
                      f"shard {path} is unusable ({type(exc).__name__}: {exc}); recomputing it", StoreWarning,
                      stacklevel=3)
        return None
    if on_unsupported == "raise" and fs.meta.get("skipped"):
        return None  # recomputed, so the caller gets the error it asked for
    return fs


def _concat(parts: list[FeatureSet]) -> FeatureSet:
    offsets = np.cumsum([0] + [p.n_structures for p in parts])
    first = parts[0]
    return FeatureSet(
        values=np.concatenate([p.values for p in parts]).astype(np.float32),
        structure_index=np.concatenate([p.structure_index + o for p, o in zip(parts, offsets)]),
        species=np.concatenate([p.species for p in parts]),
        blocks=first.blocks,
        meta=dict(first.meta, seconds=float(sum(p.meta.get("seconds") or 0 for p in parts)),
                  skipped=[s for p in parts for s in p.meta.get("skipped", [])]),
        structure_ids=[s for p in parts for s in p.structure_ids],
        energy=np.concatenate([p.energy for p in parts]),
        readout=first.readout,
    )


def write_entry(folder: Path, fs: FeatureSet, structures: list, meta: dict) -> None:
    """Write a complete entry into ``folder`` (which must not exist yet).

    ``meta.json``, written last, records the size and sha256 of every other file
    (:func:`~umlip_latents.store_integrity.file_records`) for :func:`read_entry` to check.
    """
    import pandas as pd

    folder.mkdir(parents=True)
    np.save(folder / "values.npy", np.ascontiguousarray(fs.values, dtype=np.float32))
    by_id = dict(zip(map(str, structure_ids(structures)), structures))
    kept = [by_id[str(s)] for s in fs.structure_ids]
    n_atoms = np.array([len(a) for a in kept], dtype=np.int64)
    atom_index = np.concatenate([np.arange(n) for n in n_atoms]) if len(kept) else np.zeros(0, np.int64)
    pd.DataFrame({
        "structure_index": fs.structure_index,
        "structure_id": np.repeat(np.array(fs.structure_ids, dtype=object), n_atoms),
        "atom_index": atom_index,
        "Z": fs.species,
        "subset": np.repeat(np.array([a.info.get("subset", "") for a in kept], dtype=object), n_atoms),
    }).to_parquet(folder / "index.parquet", index=False)
    pd.DataFrame({
        "structure_id": fs.structure_ids,
        "subset": [a.info.get("subset", "") for a in kept],
        "n_atoms": n_atoms,
        "model_energy": fs.energy,
        "dft_energy": [float(a.info.get("energy", np.nan)) for a in kept],
    }).to_parquet(folder / "structures.parquet", index=False)
    names = ["values.npy", "index.parquet", "structures.parquet"]
    if fs.readout is not None:
        np.savez(folder / "readout.npz", weight=fs.readout.weight, bias=fs.readout.bias)
        names.append("readout.npz")
    meta = dict(meta, blocks=[b.to_dict() for b in fs.blocks], extraction=fs.meta, n_atoms=int(fs.n_atoms),
                dim=int(fs.dim), n_structures=fs.n_structures, files=file_records(folder, names))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise EntryDamaged(f"store entry {folder}: meta.json cannot be read ({type(exc).__name__}: {exc})") from None


def read_entry(folder: str | os.PathLike, mmap: bool = True) -> FeatureSet:
    """Load a stored entry, checked against the sizes and sha256 its ``meta.json`` records.

    ``values`` is memory-mapped unless ``mmap=False``. Sizes and the ``values.npy`` header are
    checked on every read, the sha256 of each file once per process.

    Raises
    ------
    EntryDamaged
        Naming the entry and what is wrong (a file missing, truncated or changed); recompute it
        with :func:`get_features`, which does so by itself.
    """
    import pandas as pd

    folder = Path(folder)
    what = f"store entry {folder}"
    meta = _read_meta(folder)
    if not meta.get("files"):
        raise EntryDamaged(f"{what}: meta.json records no file checksums (incomplete, or written before "
                           f"format {FORMAT_VERSION})")
    verify_files(folder, meta["files"], what)
    try:
        values = np.load(folder / "values.npy", mmap_mode="r" if mmap else None)
        index = pd.read_parquet(folder / "index.parquet")
        table = pd.read_parquet(folder / "structures.parquet")
        readout = None
        if "readout.npz" in meta["files"]:
            r = np.load(folder / "readout.npz")
            readout = Readout(r["weight"], r["bias"])
        fs = FeatureSet(
            values=values,
            structure_index=index["structure_index"].to_numpy(np.int64),
            species=index["Z"].to_numpy(np.int64),
            blocks=[Block(**b) for b in meta["blocks"]],
            meta=meta,
            structure_ids=table["structure_id"].tolist(),
            energy=table["model_energy"].to_numpy(np.float64),
            readout=readout,
            subsets=table["subset"].tolist(),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EntryDamaged(f"{what}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if values.dtype != np.float32 or values.shape != (meta["n_atoms"], meta["dim"]) or \
            fs.n_structures != meta["n_structures"]:
        raise EntryDamaged(f"{what}: holds {values.shape} {values.dtype} values for {fs.n_structures} structures; "
                           f"meta.json says ({meta['n_atoms']}, {meta['dim']}) float32 for {meta['n_structures']}")
    return fs


def dataset_label(dataset: str, limit: int | None, seed: int) -> str:
    """Store folder name of a dataset selection."""
    name = Path(dataset).stem if os.sep in str(dataset) or str(dataset).endswith(".xyz") else str(dataset)
    return name if limit is None else f"{name}-n{limit}-s{seed}"


def _serve(folder: Path, key: str, on_unsupported: str) -> tuple[FeatureSet | None, str]:
    """The stored entry when its key matches and it may serve this caller; else ``(None, why it is damaged or "")``."""
    if not folder.exists():
        return None, ""
    try:
        if _read_meta(folder).get("cache_key") != key:
            return None, ""
        stored = read_entry(folder)
    except EntryDamaged as exc:
        return None, str(exc)
    # an entry that skipped structures would hide the error a "raise" caller wants
    if on_unsupported == "raise" and stored.meta.get("extraction", {}).get("skipped"):
        return None, ""
    return stored, ""


def _checked_as_strictly(stored: float | None, wanted: float | None) -> bool:
    """Whether structures validated with ``min_distance=stored`` pass a check with ``wanted``."""
    return wanted is None or (stored is not None and stored >= wanted)


def _tidy(folder: Path, layer: str, staging: Path | None = None) -> None:
    """Remove what killed or failed writers of this entry left (under its lock): half-written shards
    and entries, replaced entries, and ``staging`` when it holds no finished shard."""
    for stale in folder.parent.glob(f".{layer}.final-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.parent.glob(f".{layer}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for part in folder.parent.glob(f".{layer}.staging-*/*.tmp"):
        shutil.rmtree(part, ignore_errors=True)
    if staging is not None and staging.exists() and not any(staging.glob("shard-*")):
        shutil.rmtree(staging, ignore_errors=True)


def get_features(dataset: str, model: str | ModelSpec, layer: str = "last", *, structures: list | None = None,
                 limit: int | None = None, seed: int = 0, device: str = "auto", batch_size: int | None = None,
                 on_unsupported: str = "raise", store: str | os.PathLike | None = None, shard_size: int = 250,
                 recompute: bool = False, progress=None, extract=None, workers: int | str = 1,
                 min_distance: float | None = MIN_DISTANCE, client=None) -> FeatureSet:
    """Features of ``model`` on ``dataset`` from the store, extracting only what is missing.

    Parameters
    ----------
    dataset
        Registered dataset/collection name or extxyz path; with ``structures`` given, only a label.
    model, layer, device, batch_size, on_unsupported, workers, min_distance
        As in :func:`umlip_latents.extract.extract_features`. ``workers`` is not part of the
        cache key: the features do not depend on it.
    structures
        The structures (default: ``load_dataset(dataset, limit, seed)``). Ids must be unique; a
        structure without ``info["structure_id"]`` is named ``<label>-<position>`` (on a copy).
    limit, seed
        Selection passed to :func:`~umlip_latents.datasets.load_dataset`.
    shard_size
        Structures per resumable shard. A resume uses only the finished shards that hold
        exactly the structures of its own chunking; the rest is recomputed.
    recompute
        Ignore a stored entry with a matching key.
    progress
        Callable ``progress(n_structures, n_atoms)`` after each shard.
    extract
        Extraction function (default :func:`~umlip_latents.extract.extract_features`).
    client
        A ``distributed.Client``: the missing shards are extracted as tasks on its workers of
        the model's environment (:mod:`umlip_latents.cluster`), written here as they finish.
        ``device="auto"`` is resolved by those workers (so it needs one; an explicit device
        serves a stored entry without any); ``workers`` must be 1 (a Dask worker
        runs one extraction; start more workers instead). The entry is byte-identical to a
        run without a client.

    Raises
    ------
    StructureError
        Before any work, for a malformed structure or an id given twice.
    NonFiniteFeatures
        When the model returns NaN or infinite values (nothing is stored).
    EntryDamaged
        When the stored entry is damaged and cannot be recomputed (a read-only store); a
        damaged entry in a writable store is recomputed with a :class:`StoreWarning`.
    StoreError
        When the store cannot be written.
    """
    from .extract import extract_features
    from .extract.base import resolve_device

    spec = get_spec(model)
    if client is None:
        extract = extract or extract_features
        device = resolve_device(device)
    else:  # the device is the workers', the extraction function runs on them
        from . import cluster

        if workers != 1:
            raise ValueError(f"workers={workers!r} with a Dask client: each Dask worker runs one extraction; "
                             "start more workers instead")
        if device == "auto":  # an explicit device is checked by the workers, when a shard is missing
            device = cluster.resolve_device(client, spec.environment, device, f"model {spec.key}")
    if on_unsupported not in ("raise", "skip"):
        raise ValueError(f"on_unsupported must be 'raise' or 'skip', not {on_unsupported!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, not {shard_size!r}")
    if structures is None:
        structures = load_dataset(dataset, limit=limit, seed=seed)
    label = dataset_label(dataset, limit, seed)
    structures = with_ids(structures, label)
    if not structures:
        raise StructureError(f"dataset {label}: no structures to featurise")
    folder = entry_dir(label, spec.key, layer, store)
    sha = structures_hash(structures)
    key = cache_key(spec, layer, sha, device, labels_hash(structures))
    damage = ""
    if not recompute:
        stored, damage = _serve(folder, key, on_unsupported)
        if stored is not None and _checked_as_strictly(stored.meta.get("min_distance"), min_distance):
            return stored
    for atoms in structures:  # ~3 ms a structure: only when the entry was not made under these checks
        validate_structure(atoms, str(atoms.info["structure_id"]), min_distance=min_distance)
    what = f"{label}/{spec.key}/{layer}"
    try:
        lock = acquire(folder.with_name(f".{layer}.lock"), what)
    except StoreError as exc:
        if damage:
            raise EntryDamaged(f"{damage}; it cannot be recomputed: {exc}") from None
        raise
    try:
        if not recompute:  # another writer may have finished it while this one waited
            stored, damage = _serve(folder, key, on_unsupported)
            if stored is not None:
                return stored
            if damage:
                warnings.warn(f"{damage}; recomputing it", StoreWarning, stacklevel=2)
        staging = folder.with_name(f".{layer}.staging-{key[:16]}")
        _tidy(folder, layer)
        try:
            return _extract_entry(folder, staging, spec, layer, structures, extract, progress, shard_size,
                                  dict(device=device, batch_size=batch_size, on_unsupported=on_unsupported,
                                       workers=workers, min_distance=min_distance),
                                  {"cache_key": key, "dataset": str(dataset), "dataset_label": label,
                                   "structures_sha256": sha, "limit": limit, "seed": seed, "shard_size": shard_size},
                                  client)
        finally:
            _tidy(folder, layer, staging)
    finally:
        release(lock)


def _extract_entry(folder: Path, staging: Path, spec: ModelSpec, layer: str, structures: list, extract, progress,
                   shard_size: int, options: dict, meta: dict, client=None) -> FeatureSet:
    """Extract shard by shard into ``staging`` (reusing finished shards), then write the entry (under its lock).

    With a Dask ``client`` the missing shards run as tasks on its workers; each is checked and
    written here as it arrives, so the entry is that of a run without one.
    """
    staging.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts, missing = {}, []

    def keep(lo: int, chunk: list, fs: FeatureSet) -> None:
        parts[lo] = fs
        if progress is not None:
            progress(len(chunk), sum(len(a) for a in chunk))

    for lo in range(0, len(structures), shard_size):
        chunk = structures[lo:lo + shard_size]
        record = _shard_record(chunk, lo)
        shard = staging / _shard_name(lo, lo + len(chunk))
        fs = _load_shard(shard, record, chunk, options["on_unsupported"])
        if fs is None:
            missing.append((lo, chunk, record, shard))
        else:
            keep(lo, chunk, fs)

    def finish(i: int, fs: FeatureSet) -> None:
        lo, chunk, record, shard = missing[i]
        fs.require_finite(f"model {spec.key} ({layer})")
        _check_holds(fs, chunk, f"the extraction of structures {lo}..{lo + len(chunk)}")
        _write_shard(shard, fs, record)
        keep(lo, chunk, fs)

    if client is None:
        for i, (lo, chunk, _, _) in enumerate(missing):
            finish(i, extract(spec, chunk, layer=layer, **options))
    else:
        from .cluster import run_shards

        run_shards(client, spec, layer, [(lo, chunk) for lo, chunk, _, _ in missing], options, extract, finish,
                   f"{meta['dataset_label']}/{spec.key}/{layer}")
    fs = _concat([parts[lo] for lo in sorted(parts)])
    _check_holds(fs, structures, f"entry {folder}")
    if not fs.n_structures:
        raise UnsupportedElement(f"model {spec.key} supports none of the {len(structures)} structures "
                                 f"of {meta['dataset_label']}; nothing is stored")
    meta = dict(meta, model=spec.key, spec=spec.to_dict(), layer=layer, **options,
                versions={"umlip-latents": _package_version("umlip-latents"), **family_versions(spec),
                          "torch": _package_version("torch"), "numpy": np.__version__},
                checkpoint_sha256=fs.meta.get("checkpoint_sha256"), wall_seconds=time.perf_counter() - t0)
    key = meta["cache_key"]
    final = folder.with_name(f".{layer}.final-{key[:16]}")
    write_entry(final, fs, structures, meta)
    old = folder.with_name(f".{layer}.old-{key[:16]}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(final, folder)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return read_entry(folder)


def stored_panel(dataset: str, models: list, layer: str, limit: int | None = None, seed: int = 0) -> dict:
    """The stored entries of ``models`` on a dataset selection, checked to hold the same atoms.

    Read only, nothing is extracted (:func:`panel_features` extracts what is missing). Returns
    ``{model: FeatureSet}`` with memory-mapped values. Raises StoreError naming the
    first model without an entry (and the command that makes it) or whose atoms differ.
    """
    label = dataset_label(dataset, limit, seed)
    out, first = {}, None
    for model in models:
        key = get_spec(model).key
        folder = entry_dir(label, key, layer)
        if not (folder / "meta.json").exists():
            extra = f" --limit {limit} --seed {seed}" if limit is not None else ""
            raise StoreError(f"no stored {layer} features of {key} on {label} ({folder}): run `umlip-latents extract "
                             f"--dataset {dataset} --model {key} --layer {layer}{extra}` first")
        fs = read_entry(folder)
        if first is None:
            first = (key, fs)
        elif fs.structure_ids != first[1].structure_ids or not np.array_equal(fs.species, first[1].species):
            raise StoreError(f"stored features of {key} and {first[0]} on {label} hold different atoms "
                             f"({fs.n_structures} and {first[1].n_structures} structures, {fs.n_atoms} and "
                             f"{first[1].n_atoms} atoms; a model skipped structures with unsupported elements?): "
                             "re-extract them on the same structures")
        out[key] = fs
    return out


def panel_features(dataset: str, models: list, layer: str = "last", *, limit: int | None = None, seed: int = 0,
                   device: str = "auto", on_unsupported: str = "skip", store=None, progress=None,
                   workers: int | str = 1, client=None) -> dict:
    """Aligned features of several models on one dataset selection, from the store.

    Structures a model cannot featurise are skipped for it (``on_unsupported="skip"``) and
    then dropped for all models by :func:`umlip_latents.features.align`, so every returned
    FeatureSet holds the same atoms in the same order. ``client``: as in :func:`get_features`.
    """
    from .features import align

    structures = load_dataset(dataset, limit=limit, seed=seed)
    out = {m: get_features(dataset, m, layer, structures=structures, limit=limit, seed=seed, device=device,
                           on_unsupported=on_unsupported, store=store, progress=progress, workers=workers,
                           client=client)
           for m in models}
    return align(out)
