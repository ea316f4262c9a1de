"""Property checks reported by the notebooks: invariance and energy re-read errors.

The test suite proves these properties on small structures; the notebooks report the same
numbers on the study's own data so a reader sees them for every model actually used.
"""

from __future__ import annotations

import numpy as np

from .features import FeatureSet


def random_rotation(seed: int) -> np.ndarray:
    """A uniformly random proper rotation matrix (3, 3)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


#: kinds of :func:`transformed_copies` -> the invariance of the family table they test
INVARIANCE_OF = {"rotated": "rotation", "translated": "translation", "permuted": "permutation"}


def transformed_copies(structures: list, seed: int = 0) -> tuple[list, list]:
    """Rotated, translated and atom-permuted copies of each structure.

    Returns
    -------
    copies : list of ase.Atoms, length 3 * len(structures)
    maps : list of (kind, base_index, copy_index, atom_map) with ``atom_map[j]`` the base atom of copy
        atom j; ``kind`` is a key of :data:`INVARIANCE_OF`
    """
    rng = np.random.default_rng(seed)
    copies, maps = [], []
    for i, atoms in enumerate(structures):
        rot = random_rotation(seed + i)
        rotated = atoms.copy()
        rotated.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
        rotated.positions = atoms.positions @ rot.T
        translated = atoms.copy()
        translated.positions = atoms.positions + rng.normal(size=3)
        perm = rng.permutation(len(atoms))
        shuffled = atoms[perm]
        same = np.arange(len(atoms))
        for kind, a, amap in (("rotated", rotated, same), ("translated", translated, same), ("permuted", shuffled, perm)):
            a.info["structure_id"] = f"{atoms.info.get('structure_id', i)}-{kind}"
            maps.append((kind, i, len(copies), amap))
            copies.append(a)
    return copies, maps


def invariance_error(base: FeatureSet, copies: FeatureSet, maps: list, kinds=None) -> float:
    """Largest relative difference ``||copy - base|| / ||base||`` (Frobenius, per structure) over the copies
    (of the given ``kinds`` only, when given)."""
    worst = 0.0
    for kind, i, k, amap in maps:
        if kinds is not None and kind not in kinds:
            continue
        ref = base.values[base.structure_index == i].astype(np.float64)
        got = copies.values[copies.structure_index == k].astype(np.float64)
        worst = max(worst, float(np.linalg.norm(got - ref[amap]) / max(np.linalg.norm(ref), 1e-30)))
    return worst


def reread_error(fs: FeatureSet) -> float:
    """Largest |energy re-read from features - model energy| per atom (eV/atom)."""
    n = np.bincount(fs.structure_index, minlength=fs.n_structures)
    return float(np.max(np.abs(fs.reread_energy() - fs.energy) / n))


def calculator_energies(calculator, structures: list) -> np.ndarray:
    """Total energies (eV) from an ASE calculator, one structure at a time (copies are used)."""
    out = []
    for atoms in structures:
        a = atoms.copy()
        a.calc = calculator
        out.append(a.get_potential_energy())
    return np.array(out)


def isolated_atoms(structures: list, cutoff: float) -> dict[str, int]:
    """Structures holding atoms with no neighbour within ``cutoff`` (Å), periodic images included.

    Such an atom has an empty graph neighbourhood in a model whose graph cutoff is ``cutoff``
    (CHGNet's ``atom_graph_cutoff`` is 5 Å and it warns that its prediction "will likely go
    wrong" there): its features hold its species only. Returns ``{structure_id: count}``.
    """
    from ase.neighborlist import neighbor_list

    out = {}
    for i, atoms in enumerate(structures):
        first = neighbor_list("i", atoms, cutoff)
        lonely = len(atoms) - len(np.unique(first))
        if lonely:
            out[str(atoms.info.get("structure_id", i))] = int(lonely)
    return out
