"""Datasets: registry, offline fetching with checksums, loading and validation of structures.

The registry is ``data/datasets.yml``. Its offline sources are the DFT-labelled benchmark
files inside the ``mattersim==1.2.3`` source distribution on PyPI, fetched with
``pip download`` and verified file by file with sha256, plus ASE's G2 molecules.
Any extended-XYZ path can be loaded too.

Every loaded :class:`ase.Atoms` carries ``info["dataset"]``, ``info["subset"]``,
``info["structure_id"]`` and, where the source has them, ``info["energy"]`` (DFT, eV),
``info["stress"]`` and ``arrays["forces"]`` (eV/Å).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from . import paths
from .errors import ChecksumMismatch, DatasetError, StructureError
from .families import schema_errors

# Keys of extxyz headers that identify a frame, in order of preference.
_ID_KEYS = ("mptrj_snapshot_id", "alexandria_id", "internal_id", "structure_id", "mp_id")


@lru_cache(maxsize=None)
def _registry_cached(path: str, mtime: float) -> dict:
    name = Path(path).name
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{name}: not valid YAML ({' '.join(str(exc).split())})") from None
    errors = schema_errors(doc, "datasets", name)
    if errors:
        raise DatasetError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return doc


def registry() -> dict:
    """The parsed ``data/datasets.yml`` (archives, datasets, collections).

    Validated against ``schemas/datasets.schema.json`` (where ``jsonschema`` is importable): a
    malformed file raises :class:`DatasetError` with one line naming the file, the entry and the field.
    """
    path = paths.datasets_file()
    return _registry_cached(str(path), path.stat().st_mtime)


def dataset_names() -> list[str]:
    """Names of the registered datasets and collections."""
    reg = registry()
    return sorted(reg["datasets"]) + sorted(reg.get("collections", {}))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ChecksumMismatch(
            f"{what}: sha256 of {path.name} is {got}, expected {expected}. "
            f"Delete {path} and fetch again; if it persists the upstream file changed."
        )


def _fetch_archive(name: str) -> Path:
    spec = registry()["archives"][name]
    target = paths.data_dir() / "archives" / spec["filename"]
    if target.exists():
        _verify(target, spec["sha256"], f"archive {name}")
        return target
    if spec["kind"] != "pypi-sdist":
        raise DatasetError(f"archive {name}: unknown kind {spec['kind']!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--no-binary", spec["package"], f"{spec['package']}=={spec['version']}",
            "-d", tmp, "--quiet",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / spec["filename"]
        if proc.returncode != 0 or not downloaded.exists():
            raise DatasetError(
                f"archive {name}: `{' '.join(cmd)}` failed ({proc.stderr.strip()[-400:]}). "
                f"Put {spec['filename']} (sha256 {spec['sha256']}) into {target.parent} by hand."
            )
        _verify(downloaded, spec["sha256"], f"archive {name}")
        os.replace(downloaded, target)
    return target


def fetch(name: str) -> Path:
    """Make the file of registered dataset ``name`` available locally and return its path.

    Downloads (through pip) and verifies the archive, extracts the member atomically and
    verifies its sha256. A cached file is re-verified on every call.
    """
    reg = registry()
    if name not in reg["datasets"]:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    spec = reg["datasets"][name]
    if "path" in spec:  # a file the user placed (e.g. an online-only set downloaded elsewhere)
        path = Path(spec["path"]).expanduser()
        path = path if path.is_absolute() else paths.data_dir() / path
        if not path.exists():
            raise DatasetError(f"dataset {name}: put the file at {path} (registered sha256 {spec['sha256']})")
        _verify(path, spec["sha256"], f"dataset {name}")
        return path
    if "archive" not in spec:
        raise DatasetError(f"dataset {name!r} is not a file dataset (source: {spec.get('source')})")
    target = paths.data_dir() / "datasets" / f"{name}.xyz"
    if target.exists():
        _verify(target, spec["sha256"], f"dataset {name}")
        return target
    archive = _fetch_archive(spec["archive"])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        member = tar.extractfile(spec["member"])
        if member is None:
            raise DatasetError(f"dataset {name}: {spec['member']} not found in {archive.name}")
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(member, out)
            _verify(Path(tmp), spec["sha256"], f"dataset {name}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


#: Closest approach (Å) allowed between two atoms, or an atom and a periodic image of itself. The
#: shortest bond there is, H2's, is 0.74 Å, and the closest pair in the ~5 300 DFT-labelled frames of
#: the registered datasets is 0.67 Å (an MPtrj frame under high stress). No training set of the panel
#: holds atoms 0.5 Å apart: there a model extrapolates (SevenNet-0 gives +237 eV for two atoms
#: 0.1 Å apart) and coincident atoms give NaN. So 0.5 Å rejects only broken geometry.
MIN_DISTANCE = 0.5


def closest_pair(atoms, cutoff: float) -> tuple[float, int, int, int] | None:
    """The closest pair of atoms nearer than ``cutoff`` (Å), with periodic minimum-image distances.

    Returns ``(distance, i, j, n_pairs)`` (``i == j``: an atom and its own periodic image;
    ``n_pairs``: how many pairs are nearer than ``cutoff``), or ``None`` when no pair is.
    Uses :func:`ase.neighborlist.neighbor_list`, linear in the number of atoms.
    """
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, float(cutoff), self_interaction=False)
    if not len(d):
        return None
    k = int(np.argmin(d))
    return float(d[k]), int(i[k]), int(j[k]), int(np.sum(i < j) + np.sum(i == j) // 2)


def validate_structure(atoms, where: str = "", min_distance: float | None = MIN_DISTANCE) -> None:
    """Raise :class:`StructureError` naming the structure if it cannot be featurised.

    Checks: atoms present, known atomic numbers, finite positions and cell, a cell vector of
    full rank along every periodic direction, and (unless ``min_distance`` is ``None``) no two
    atoms, nor an atom and its periodic image, closer than ``min_distance`` Å
    (:data:`MIN_DISTANCE`, minimum-image distances).
    """
    label = where or atoms.info.get("structure_id", "<unnamed>")
    if len(atoms) == 0:
        raise StructureError(f"structure {label}: has no atoms")
    if np.any(atoms.numbers <= 0) or np.any(atoms.numbers > 118):
        raise StructureError(f"structure {label}: unknown atomic numbers {sorted(set(atoms.numbers))}")
    pos = atoms.get_positions()
    if not np.all(np.isfinite(pos)):
        bad = np.unique(np.nonzero(~np.isfinite(pos))[0])
        raise StructureError(f"structure {label}: non-finite positions for atoms {bad.tolist()[:10]}")
    cell = atoms.cell.array
    if not np.all(np.isfinite(cell)):
        raise StructureError(f"structure {label}: non-finite cell")
    periodic = cell[np.asarray(atoms.pbc, dtype=bool)]
    if len(periodic) and np.linalg.det(periodic @ periodic.T) < 1e-8:
        axes = "".join("abc"[k] for k in range(3) if atoms.pbc[k])
        raise StructureError(f"structure {label}: periodic along {axes} (pbc={tuple(bool(p) for p in atoms.pbc)}) "
                             "but the cell vectors there are zero or linearly dependent; give a cell or set pbc=False")
    if min_distance is None:
        return
    pair = closest_pair(atoms, min_distance)
    if pair is not None:
        d, i, j, n = pair
        what = f"atom {i} is {d:.3f} Å from its own periodic image (the cell is too small)" if i == j else \
            f"atoms {i} and {j} ({atoms.get_chemical_symbols()[i]}, {atoms.get_chemical_symbols()[j]}) are " \
            f"{d:.3f} Å apart"
        more = f" ({n} pairs are)" if n > 1 else ""
        raise StructureError(f"structure {label}: {what}, closer than min_distance={min_distance} Å{more}; "
                             "fix the positions or remove the duplicated atom (min_distance=... sets the limit)")


def structure_ids(structures) -> list:
    """Each structure's ``info["structure_id"]`` (``"#<position>"`` when absent), checked unique.

    Raises
    ------
    StructureError
        Naming the first id given twice and both positions.
    """
    ids, seen = [], {}
    for i, atoms in enumerate(structures):
        sid = atoms.info.get("structure_id", f"#{i}")
        if str(sid) in seen:
            raise StructureError(f"structure_id {sid!r} is given twice (structures {seen[str(sid)]} and {i}); "
                                 "ids name the rows of the outputs and must be unique within one call")
        seen[str(sid)] = i
        ids.append(sid)
    return ids


def with_ids(structures, label: str) -> list:
    """``structures`` with every ``info["structure_id"]`` set, checked unique.

    A structure without one gets ``f"{label}-{position:05d}"`` (the scheme of :func:`load_dataset`),
    on a copy: the caller's atoms are left as they are.
    """
    out = []
    for i, atoms in enumerate(structures):
        if "structure_id" not in atoms.info:
            atoms = atoms.copy()
            atoms.info["structure_id"] = f"{label}-{i:05d}"
        out.append(atoms)
    structure_ids(out)
    return out


def _normalise(frames, dataset: str, subset: str) -> list:
    """Move DFT labels from ASE's calculator into info/arrays and name every frame."""
    seen: set[str] = set()
    out = []
    for i, atoms in enumerate(frames):
        calc = atoms.calc
        if calc is not None:
            results = getattr(calc, "results", {})
            if "energy" in results and "energy" not in atoms.info:
                atoms.info["energy"] = float(results["energy"])
            if "forces" in results:
                atoms.arrays["forces"] = np.asarray(results["forces"], dtype=float)
            if "stress" in results:
                atoms.info["stress"] = np.asarray(results["stress"], dtype=float)
            atoms.calc = None
        sid = next((str(atoms.info[k]) for k in _ID_KEYS if k in atoms.info), f"{dataset}-{i:05d}")
        if sid in seen:
            sid = f"{sid}#{i}"
        seen.add(sid)
        atoms.info["structure_id"] = sid
        atoms.info["dataset"] = dataset
        atoms.info["subset"] = subset
        validate_structure(atoms, f"{sid} (frame {i} of {dataset})", min_distance=None)  # distances: before a model runs
        out.append(atoms)
    return out


def read_extxyz(path: str | os.PathLike, dataset: str | None = None, subset: str | None = None) -> list:
    """Read every frame of an extended-XYZ file, validated and labelled."""
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    name = dataset or path.stem
    try:
        frames = read(path, index=":", format="extxyz")
    except Exception as exc:  # ase raises many types for malformed files
        raise StructureError(f"{path.name}: cannot be read as extended XYZ ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise StructureError(f"{path.name}: holds no structures")
    return _normalise(frames, name, subset or name)


def _select(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def load_dataset(name_or_path: str | os.PathLike, limit: int | None = None, seed: int = 0,
                 drop_single_atom: bool | None = None) -> list:
    """Load a registered dataset, collection or extended-XYZ file as a list of ``ase.Atoms``.

    Parameters
    ----------
    name_or_path
        A name from ``data/datasets.yml`` (dataset or collection) or a path to an extxyz file.
    limit
        Keep at most this many structures, drawn at random (without replacement, in file
        order) with ``seed``. For a collection the limit is split evenly between members.
    seed
        Seed of the draw.
    drop_single_atom
        Drop structures of one atom (the paper did). Defaults to the collection's setting,
        ``False`` for single datasets and files.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise DatasetError(f"limit must be a positive number of structures (or None for all), not {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, not {seed!r}")
    key = str(name_or_path)
    reg = registry()
    if key in reg.get("collections", {}):
        coll = reg["collections"][key]
        members = coll["members"]
        drop = coll.get("drop_single_atom", False) if drop_single_atom is None else drop_single_atom
        out = []
        for j, member in enumerate(members):
            part = None if limit is None else limit // len(members) + (1 if j < limit % len(members) else 0)
            if part == 0:
                continue
            out.extend(load_dataset(member, limit=part, seed=seed, drop_single_atom=drop))
        for atoms in out:
            atoms.info["dataset"] = key
        return out
    drop = bool(drop_single_atom)
    if key in reg["datasets"]:
        spec = reg["datasets"][key]
        if spec.get("source") == "ase.collections.g2":
            from ase.collections import g2

            frames = _normalise([g2[name] for name in g2.names], key, key)
        else:
            frames = read_extxyz(fetch(key), dataset=key, subset=key)
    elif Path(key).suffix in {".xyz", ".extxyz"} or Path(key).exists():
        frames = read_extxyz(key)
    else:
        raise DatasetError(f"unknown dataset {key!r}: not registered ({', '.join(dataset_names())}) and not a file")
    if drop:
        frames = [a for a in frames if len(a) > 1]
    return [frames[i] for i in _select(len(frames), limit, seed)]


def structures_hash(structures) -> str:
    """sha256 over numbers, positions, cell, pbc and (where given) total charge and spin, in order."""
    digest = hashlib.sha256()
    for atoms in structures:
        for key in ("charge", "spin"):
            if key in atoms.info:
                digest.update(f"{key}={atoms.info[key]}".encode())
        digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
        digest.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    return digest.hexdigest()
