"""The :class:`FeatureSet`: per-atom features of one model and layer on a list of structures."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import NonFiniteFeatures


@dataclass(frozen=True)
class Block:
    """Columns ``[start, stop)`` of a feature matrix and the model part they come from."""

    name: str
    start: int
    stop: int
    source: str = ""

    @property
    def width(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return {"name": self.name, "start": self.start, "stop": self.stop, "source": self.source}


@dataclass
class Readout:
    """The model's own affine map from last-layer features to per-atom energy.

    ``E_i = values[i] @ weight[Z_i] + bias[Z_i]`` (eV), with ``weight`` of shape
    ``(119, D)`` and ``bias`` of shape ``(119,)`` indexed by atomic number. The structure
    energy is the sum over its atoms. Species-dependent entries hold per-element scale,
    shift and reference energies of the model.
    """

    weight: np.ndarray
    bias: np.ndarray

    def atom_energies(self, values: np.ndarray, species: np.ndarray) -> np.ndarray:
        """Per-atom energies (float64, shape ``(n_atoms,)``)."""
        v = np.asarray(values, dtype=np.float64)
        return np.einsum("ij,ij->i", v, self.weight[species]) + self.bias[species]


@dataclass
class FeatureSet:
    """Per-atom latent features.

    Attributes
    ----------
    values : ndarray of shape (n_atoms, D), float32
    structure_index : ndarray of shape (n_atoms,), int64
        Position of each atom's structure in ``structure_ids``.
    species : ndarray of shape (n_atoms,), int64
        Atomic numbers.
    blocks : list of Block
        Named column ranges covering ``0..D``.
    meta : dict
        Model key, layer, checkpoint hash, package versions, timings ...
    structure_ids : list of str, length n_structures
    energy : ndarray of shape (n_structures,), float64, optional
        Energy predicted by the model in the same forward pass (eV).
    readout : Readout, optional
        For ``layer="last"``: the model's readout weights.
    subsets : list of str, optional
        Subset label of each structure (from the dataset; filled by the store).
    """

    values: np.ndarray
    structure_index: np.ndarray
    species: np.ndarray
    blocks: list
    meta: dict = field(default_factory=dict)
    structure_ids: list = field(default_factory=list)
    energy: np.ndarray | None = None
    readout: Readout | None = None
    subsets: list | None = None

    def __post_init__(self):
        n = len(self.values)
        if self.values.ndim != 2:
            raise ValueError(f"values must be 2-D, got shape {self.values.shape}")
        if len(self.structure_index) != n or len(self.species) != n:
            raise ValueError("values, structure_index and species must have the same length")
        if self.blocks and self.blocks[-1].stop != self.values.shape[1]:
            raise ValueError("blocks must cover every column")

    @property
    def n_atoms(self) -> int:
        return len(self.values)

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    @property
    def n_structures(self) -> int:
        return len(self.structure_ids)

    def block(self, name: str) -> np.ndarray:
        """The columns of one named block."""
        for b in self.blocks:
            if b.name == name:
                return self.values[:, b.start:b.stop]
        raise KeyError(f"no block {name!r}; blocks: {[b.name for b in self.blocks]}")

    def atom_subsets(self) -> np.ndarray:
        """Subset label of every atom (n_atoms,), from the per-structure ``subsets``."""
        if self.subsets is None:
            raise ValueError("this FeatureSet carries no subset labels")
        return np.asarray(self.subsets, dtype=object)[self.structure_index]

    def select(self, structure_ids: list) -> "FeatureSet":
        """The atoms of the given structures, in the given order."""
        pos = {sid: i for i, sid in enumerate(self.structure_ids)}
        missing = [s for s in structure_ids if s not in pos]
        if missing:
            raise KeyError(f"structures not in this FeatureSet: {missing[:5]}")
        order = np.array([pos[s] for s in structure_ids], dtype=np.int64)
        starts = np.searchsorted(self.structure_index, np.arange(self.n_structures))
        counts = np.bincount(self.structure_index, minlength=self.n_structures)
        rows = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in order]) if len(order) else \
            np.zeros(0, np.int64)
        return FeatureSet(
            values=np.asarray(self.values[rows]), structure_index=np.repeat(np.arange(len(order)), counts[order]),
            species=self.species[rows], blocks=self.blocks, meta=self.meta, structure_ids=list(structure_ids),
            energy=None if self.energy is None else self.energy[order], readout=self.readout,
            subsets=None if self.subsets is None else [self.subsets[i] for i in order],
        )

    def save(self, folder) -> None:
        """Write to ``folder`` (``result.npz``: exact arrays; ``result.json``: blocks, meta, ids); see :meth:`load`."""
        import json
        from pathlib import Path

        folder = Path(folder)
        arrays = dict(values=self.values, structure_index=self.structure_index, species=self.species,
                      energy=self.energy if self.energy is not None else np.zeros(0))
        if self.readout is not None:
            arrays.update(readout_weight=self.readout.weight, readout_bias=self.readout.bias)
        np.savez(folder / "result.npz", **arrays)
        (folder / "result.json").write_text(json.dumps({
            "blocks": [b.to_dict() for b in self.blocks], "meta": self.meta, "structure_ids": self.structure_ids,
        }))

    @classmethod
    def load(cls, folder) -> "FeatureSet":
        """Read what :meth:`save` wrote."""
        import json
        from pathlib import Path

        folder = Path(folder)
        d = np.load(folder / "result.npz")
        info = json.loads((folder / "result.json").read_text())
        readout = Readout(d["readout_weight"], d["readout_bias"]) if "readout_weight" in d else None
        return cls(values=d["values"], structure_index=d["structure_index"], species=d["species"],
                   blocks=[Block(**b) for b in info["blocks"]], meta=info["meta"],
                   structure_ids=info["structure_ids"], energy=d["energy"], readout=readout)

    def nonfinite_structures(self) -> list:
        """Ids of the structures holding a NaN or infinite feature, or a non-finite energy."""
        bad = np.zeros(self.n_structures, dtype=bool)
        rows = ~np.isfinite(np.asarray(self.values)).all(axis=1)
        bad[self.structure_index[rows]] = True
        if self.energy is not None and len(self.energy) == self.n_structures:
            bad |= ~np.isfinite(self.energy)
        return [self.structure_ids[i] for i in np.flatnonzero(bad)]

    def require_finite(self, what: str) -> "FeatureSet":
        """``self``, or :class:`~umlip_latents.errors.NonFiniteFeatures` naming ``what`` and the structures."""
        bad = self.nonfinite_structures()
        if bad:
            raise NonFiniteFeatures(
                f"{what} gave NaN or infinite features or energies for {len(bad)} structure(s) "
                f"({', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}); they are not stored. Check "
                "their geometry (atoms far closer than any bond, a broken cell) or the model's checkpoint")
        return self

    def reread_energy(self) -> np.ndarray:
        """Structure energies recomputed from the features with the model's readout weights."""
        if self.readout is None:
            raise ValueError("this FeatureSet has no readout (only layer='last' carries one)")
        per_atom = self.readout.atom_energies(self.values, self.species)
        return np.bincount(self.structure_index, weights=per_atom, minlength=self.n_structures)


def align(features: dict) -> dict:
    """Restrict every FeatureSet to the structures all of them hold, in one common order.

    Models that skipped structures (``on_unsupported="skip"``) then still compare atom by
    atom. Raises if the species of a shared structure differ between models.
    """
    keys = list(features)
    common = set(features[keys[0]].structure_ids)
    for k in keys[1:]:
        common &= set(features[k].structure_ids)
    order = [s for s in features[keys[0]].structure_ids if s in common]
    out = {k: (fs if fs.structure_ids == order else fs.select(order)) for k, fs in features.items()}
    ref = out[keys[0]].species
    for k in keys[1:]:
        if not np.array_equal(out[k].species, ref):
            raise ValueError(f"{k} and {keys[0]} disagree on the species of shared structures")
    return out
