"""The :class:`FeatureSet`: per-atom features of one model and layer on a list of structures."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    """

    values: np.ndarray
    structure_index: np.ndarray
    species: np.ndarray
    blocks: list
    meta: dict = field(default_factory=dict)
    structure_ids: list = field(default_factory=list)
    energy: np.ndarray | None = None
    readout: Readout | None = None

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

    def reread_energy(self) -> np.ndarray:
        """Structure energies recomputed from the features with the model's readout weights."""
        if self.readout is None:
            raise ValueError("this FeatureSet has no readout (only layer='last' carries one)")
        per_atom = self.readout.atom_energies(self.values, self.species)
        return np.bincount(self.structure_index, weights=per_atom, minlength=self.n_structures)
