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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from . import paths
from .datasets import load_dataset, structures_hash
from .families import code_digest, environment_python, get_family
from .features import Block, FeatureSet, Readout
from .registry import ModelSpec, get_spec, local_checkpoint

FORMAT_VERSION = 1


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


def _atomic_save(path: Path, save) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    os.replace(tmp, path)


def _write_shard(path: Path, fs: FeatureSet) -> None:
    tmpdir = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir()
    fs.save(tmpdir)
    os.replace(tmpdir, path)


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
    """Write a complete entry into ``folder`` (which must not exist yet)."""
    import pandas as pd

    folder.mkdir(parents=True)
    np.save(folder / "values.npy", np.ascontiguousarray(fs.values, dtype=np.float32))
    by_id = {a.info.get("structure_id"): a for a in structures}
    kept = [by_id[s] for s in fs.structure_ids]
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
    if fs.readout is not None:
        np.savez(folder / "readout.npz", weight=fs.readout.weight, bias=fs.readout.bias)
    meta = dict(meta, blocks=[b.to_dict() for b in fs.blocks], extraction=fs.meta,
                n_atoms=int(fs.n_atoms), dim=int(fs.dim), n_structures=fs.n_structures)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def read_entry(folder: str | os.PathLike, mmap: bool = True) -> FeatureSet:
    """Load a stored entry; ``values`` is memory-mapped unless ``mmap=False``."""
    import pandas as pd

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    index = pd.read_parquet(folder / "index.parquet")
    table = pd.read_parquet(folder / "structures.parquet")
    readout = None
    if (folder / "readout.npz").exists():
        r = np.load(folder / "readout.npz")
        readout = Readout(r["weight"], r["bias"])
    return FeatureSet(
        values=np.load(folder / "values.npy", mmap_mode="r" if mmap else None),
        structure_index=index["structure_index"].to_numpy(np.int64),
        species=index["Z"].to_numpy(np.int64),
        blocks=[Block(**b) for b in meta["blocks"]],
        meta=meta,
        structure_ids=table["structure_id"].tolist(),
        energy=table["model_energy"].to_numpy(np.float64),
        readout=readout,
        subsets=table["subset"].tolist(),
    )


def dataset_label(dataset: str, limit: int | None, seed: int) -> str:
    """Store folder name of a dataset selection."""
    name = Path(dataset).stem if os.sep in str(dataset) or str(dataset).endswith(".xyz") else str(dataset)
    return name if limit is None else f"{name}-n{limit}-s{seed}"


def get_features(dataset: str, model: str | ModelSpec, layer: str = "last", *, structures: list | None = None,
                 limit: int | None = None, seed: int = 0, device: str = "auto", batch_size: int | None = None,
                 on_unsupported: str = "raise", store: str | os.PathLike | None = None, shard_size: int = 250,
                 recompute: bool = False, progress=None, extract=None, workers: int | str = 1) -> FeatureSet:
    """Features of ``model`` on ``dataset`` from the store, extracting only what is missing.

    Parameters
    ----------
    dataset
        Registered dataset/collection name or extxyz path; with ``structures`` given, only a label.
    model, layer, device, batch_size, on_unsupported, workers
        As in :func:`umlip_latents.extract.extract_features`. ``workers`` is not part of the
        cache key: the features do not depend on it.
    limit, seed
        Selection passed to :func:`~umlip_latents.datasets.load_dataset`.
    shard_size
        Structures per resumable shard.
    recompute
        Ignore a stored entry with a matching key.
    progress
        Callable ``progress(n_structures, n_atoms)`` after each shard.
    extract
        Extraction function (default :func:`~umlip_latents.extract.extract_features`).
    """
    from .extract import extract_features
    from .extract.base import resolve_device

    extract = extract or extract_features
    spec = get_spec(model)
    device = resolve_device(device)
    if structures is None:
        structures = load_dataset(dataset, limit=limit, seed=seed)
    label = dataset_label(dataset, limit, seed)
    folder = entry_dir(label, spec.key, layer, store)
    sha = structures_hash(structures)
    key = cache_key(spec, layer, sha, device, labels_hash(structures))
    if folder.exists() and not recompute:
        try:
            if json.loads((folder / "meta.json").read_text()).get("cache_key") == key:
                stored = read_entry(folder)
                # an entry that skipped structures would hide the error a "raise" caller wants
                if on_unsupported != "raise" or not stored.meta.get("extraction", {}).get("skipped"):
                    return stored
        except (OSError, json.JSONDecodeError):
            pass  # an unreadable entry is recomputed below
    staging = folder.with_name(f".{layer}.staging-{key[:16]}")
    staging.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = []
    for k, lo in enumerate(range(0, max(len(structures), 1), shard_size)):
        shard = staging / f"shard-{k:05d}"
        chunk = structures[lo:lo + shard_size]
        if not shard.exists():
            _write_shard(shard, extract(spec, chunk, layer=layer, device=device, batch_size=batch_size,
                                        on_unsupported=on_unsupported, workers=workers))
        parts.append(FeatureSet.load(shard))
        if progress is not None:
            progress(len(chunk), sum(len(a) for a in chunk))
    fs = _concat(parts)
    meta = {
        "cache_key": key, "model": spec.key, "spec": spec.to_dict(), "layer": layer, "dataset": str(dataset),
        "dataset_label": label, "structures_sha256": sha, "limit": limit, "seed": seed, "device": device,
        "batch_size": batch_size, "workers": workers, "on_unsupported": on_unsupported, "shard_size": shard_size,
        "versions": {"umlip-latents": _package_version("umlip-latents"), **family_versions(spec),
                     "torch": _package_version("torch"), "numpy": np.__version__},
        "checkpoint_sha256": fs.meta.get("checkpoint_sha256"),
        "wall_seconds": time.perf_counter() - t0,
    }
    final = staging.with_name(f".{layer}.final-{key[:16]}")
    shutil.rmtree(final, ignore_errors=True)
    write_entry(final, fs, structures, meta)
    old = folder.with_name(f".{layer}.old-{key[:16]}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(final, folder)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return read_entry(folder)


def panel_features(dataset: str, models: list, layer: str = "last", *, limit: int | None = None, seed: int = 0,
                   device: str = "auto", on_unsupported: str = "skip", store=None, progress=None,
                   workers: int | str = 1) -> dict:
    """Aligned features of several models on one dataset selection, from the store.

    Structures a model cannot featurise are skipped for it (``on_unsupported="skip"``) and
    then dropped for all models by :func:`umlip_latents.features.align`, so every returned
    FeatureSet holds the same atoms in the same order.
    """
    from .features import align

    structures = load_dataset(dataset, limit=limit, seed=seed)
    out = {m: get_features(dataset, m, layer, structures=structures, limit=limit, seed=seed, device=device,
                           on_unsupported=on_unsupported, store=store, progress=progress, workers=workers)
           for m in models}
    return align(out)
