"""DIEP (package ``diep`` 2.x, PyTorch Geometric backend) adapter.

Model and energy
----------------
The released potential is a :class:`diep.apps.pes.Potential` wrapping an extensive
:class:`diep.models.DIEP` (``is_intensive=False``). Its per-atom energy comes from
``model.final_layer`` (a :class:`~diep.layers.WeightedReadOut`), whose ``gated`` module is a
two-branch gated MLP on the final node features ``x_i``::

    h_i = gated.layers[:-1](x_i)           # Linear/SiLU stack, 64 features (layers[5] output)
    s_i = gated.gates(x_i)                 # Linear/SiLU stack ending in Sigmoid, a scalar
    e_i = (w . h_i + b) * s_i              # w, b: gated.layers[6] = Linear(64, 1)
    E   = data_std * sum_i e_i + data_mean + sum_i ref[Z_i]

``ref`` are the isolated-atom r2SCAN energies held by ``Potential.element_refs`` (an
``AtomRef`` indexed by position in ``model.element_types``), ``data_mean`` is 0 for the
released model and ZBL repulsion is off.

Because of the multiplicative gate, the energy is *not* an affine function of the input of
the final ``Linear`` alone: ``e_i`` is bilinear in ``h_i`` and ``s_i``, which come from two
separate nonlinear branches. The closest honest vector from which the energy is read
*exactly linearly* folds the gate into the features::

    v_i = s_i * [h_i, 1]                   # 65 features
    E_i = v_i . (data_std * [w, b]) + ref[Z_i]

Layers
------
``"last"`` (65 columns, ``diep_fold1``)
    ``gated_hidden`` (0:64): ``s_i * h_i``, the output of ``gated.layers[5]`` (SiLU, the input
    of the final ``Linear(64, 1)``) times the gate ``gated.gates`` (Sigmoid) output;
    ``gate`` (64:65): the gate ``s_i`` itself (it multiplies the final Linear's bias).
    :meth:`DiepAdapter.readout` gives ``W[Z] = data_std * [w, b]`` for every supported element
    and ``bias[Z] = ref[Z]``.
``"backbone"`` (64 columns, ``diep_fold1``)
    ``node_feat``: the node features after the last ``model.graph_layers`` block (M3GNet-style
    convolution), i.e. ``g.node_feat`` entering ``model.final_layer``.

Both come from one batched, energy-only call of the package's own ``Potential.forward``
(forces, stresses and Hessian switched off, ``torch.no_grad``), with graphs built by the
package's ASE converter (:class:`diep.ext.ase.Atoms2Graph`) from positions wrapped into the
cell, as :class:`diep.pretrained.DIEPCalculator` does, and merged with
``torch_geometric.data.Batch``. The returned energy is that call's output.

Precision: the model runs in float32 (its own dtype). Rounding grows through the three
message-passing blocks, so rotated, translated or supercell copies agree to about 1e-5
(``last``) and 2e-5 (``backbone``) relative to the largest feature; with the same weights
in float64 (``diep.config.set_default_dtype("float", 64)`` before loading) they agree
exactly, so this is float32 noise, not a broken invariance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import paths
from ..errors import ModelUnavailable, StructureError
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, species_readout

#: files an exported DIEP model directory holds (``diep.pretrained``).
_MODEL_FILES = ("model.json", "model.pt", "state.pt")


def _is_export(path: Path) -> bool:
    return all((path / f).is_file() for f in _MODEL_FILES)


class DiepAdapter(Adapter):
    """A loaded DIEP potential (see the module docstring for the layers)."""

    default_batch_atoms = 100  # CPU: see Adapter.default_batch_atoms
    default_batch_atoms_gpu = 8000

    def __init__(self, spec: ModelSpec, device: str, potential, path: Path):
        super().__init__(spec, device, path)
        self.potential = potential
        from ase.data import atomic_numbers

        from diep.ext.ase import Atoms2Graph

        model = potential.model
        self.converter = Atoms2Graph(model.element_types, model.cutoff)
        self._z = np.array([atomic_numbers[s] for s in model.element_types], dtype=np.int64)

    @classmethod
    def bundled_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """``diep/pretrained_models/<name>`` inside the installed package (not ``$DIEP_MODEL_DIR``,
        so the registered name always means the shipped weights)."""
        import importlib.util

        found = importlib.util.find_spec(cls.family.import_name)
        path = Path(found.origin).parent / "pretrained_models" / spec.source["name"] if found and found.origin else None
        return path if path is not None and _is_export(path) else None

    @classmethod
    def find_checkpoint(cls, spec: ModelSpec) -> tuple[Path | None, str]:
        """An exported model folder (``model.json``, ``model.pt``, ``state.pt``), wheel or local.

        A ``local`` ``source.path`` is a folder, absolute or relative to the checkpoints folder.
        """
        if spec.source["kind"] == "local":
            folder = Path(spec.source["path"]).expanduser()
            folder = folder if folder.is_absolute() else paths.checkpoints_dir() / folder
            path, why = (folder, f"local export {folder}") if folder.is_dir() else super().find_checkpoint(spec)
        else:
            path, why = super().find_checkpoint(spec)
        if path is not None and not _is_export(Path(path)):
            missing = [f for f in _MODEL_FILES if not (Path(path) / f).is_file()]
            return None, f"{path} lacks {', '.join(missing)}; point source.path at an exported DIEP model folder"
        return path, why

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "DiepAdapter":
        from diep.pretrained import load_potential

        path = Path(path)
        # The package's own loader (strict state-dict load); energy only: no forces, stress, Hessian.
        pot = load_potential(path, device=device, stress=False)
        pot.calc_forces = False
        pot.calc_stresses = False
        pot.calc_hessian = False
        if pot.calc_repuls:
            raise ModelUnavailable(f"model {spec.key}: ZBL repulsion is on; its pairwise energy has no "
                                   "per-atom linear readout, so this adapter cannot re-read energies")
        if float(pot.data_mean) != 0.0:
            raise ModelUnavailable(f"model {spec.key}: data_mean={float(pot.data_mean)} is added per "
                                   "structure, not per atom, so no per-atom readout reproduces it")
        if getattr(pot.model, "is_intensive", False):
            raise ModelUnavailable(f"model {spec.key}: an intensive DIEP model has no per-atom energies")
        gated = getattr(getattr(pot.model, "final_layer", None), "gated", None)
        import torch

        if (gated is None or not isinstance(gated.layers[-1], torch.nn.Linear) or gated.layers[-1].out_features != 1
                or not isinstance(gated.gates[-1], torch.nn.Sigmoid)):
            raise ModelUnavailable(f"model {spec.key}: final_layer is not the gated per-atom readout "
                                   "(GatedMLP ending in Linear(., 1) x Sigmoid gate) this adapter reads")
        if pot.element_refs is not None and pot.element_refs.property_offset.ndim != 1:
            raise ModelUnavailable(f"model {spec.key}: state-dependent element references are not supported")
        return cls(spec, device, pot, path)

    @property
    def supported_elements(self) -> set[int]:
        return set(int(z) for z in self._z)

    def _graphs(self, structures: list):
        """Batched graph and (B, 3, 3) lattices built by the package's ASE converter."""
        import torch
        from torch_geometric.data import Batch

        graphs, lattices = [], []
        for i, atoms in enumerate(structures):
            wrapped = atoms.copy()
            wrapped.wrap()  # as diep.pretrained.DIEPCalculator; leaves non-periodic axes alone
            try:
                g, lat, _ = self.converter.get_graph(wrapped)
            except ValueError as exc:
                sid = atoms.info.get("structure_id", f"#{i}")
                raise StructureError(f"structure {sid}: {exc}") from exc
            graphs.append(g)
            lattices.append(lat.reshape(1, 3, 3))
        return Batch.from_data_list(graphs).to(self.device), torch.cat(lattices).to(self.device)

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass of ``Potential.forward`` (see :meth:`Adapter.forward`):
        values (n_atoms, 65) for ``"last"``, (n_atoms, 64) for ``"backbone"``; total energies (eV)
        of the same pass."""
        if layer not in ("last", "backbone"):
            raise ValueError(f"DIEP offers layers 'last' and 'backbone', not {layer!r}")
        import torch

        pot = self.potential
        gated = pot.model.final_layer.gated
        batch, lattice = self._graphs(structures)
        seen: dict = {}
        hooks = [
            gated.layers[-2].register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)),
            gated.gates.register_forward_hook(lambda m, a, out: seen.__setitem__("s", out)),
        ]
        try:
            with torch.no_grad():
                energy = pot(batch, lattice)[0]
        finally:
            for hook in hooks:
                hook.remove()
        energy = energy.reshape(-1).double().cpu().numpy()
        if layer == "backbone":
            values = batch.node_feat
            blocks = [Block("node_feat", 0, values.shape[1],
                            f"model.graph_layers[{pot.model.n_blocks - 1}] node features (g.node_feat "
                            "entering model.final_layer)")]
        else:
            h, s = seen["h"], seen["s"]
            values = torch.cat([s * h, s], dim=1)
            d = h.shape[1]
            blocks = [
                Block("gated_hidden", 0, d, "model.final_layer.gated.layers[-2] (SiLU, input of the final "
                      "Linear) times model.final_layer.gated.gates (Sigmoid gate)"),
                Block("gate", d, d + 1, "model.final_layer.gated.gates (Sigmoid gate)"),
            ]
        return values.detach().float().cpu().numpy(), blocks, energy

    def readout(self) -> Readout:
        """``E_i = (s_i [h_i, 1]) . (data_std [w, b]) + ref[Z_i]``, from the model's own weights."""
        pot = self.potential
        final = pot.model.final_layer.gated.layers[-1]
        std = float(pot.data_std)
        w = np.concatenate([final.weight.detach().double().cpu().numpy().reshape(-1),
                            final.bias.detach().double().cpu().numpy().reshape(-1)]) * std
        refs = 0.0
        if pot.element_refs is not None:
            refs = pot.element_refs.property_offset.detach().double().cpu().numpy()
        return species_readout(self._z, w, refs)

    def calculator(self):
        """diep's own ``DIEPCalculator`` on the same potential."""
        from diep.pretrained import DIEPCalculator

        return DIEPCalculator(potential=self.potential, stress_unit="eV/A3")

    def checkpoint_file(self) -> Path:
        """``state.pt`` (the weights) of the exported model."""
        return Path(self.path) / "state.pt"
