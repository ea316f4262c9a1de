"""CHGNet adapter (``chgnet`` package, pretrained weights shipped in its wheel).

How a CHGNet energy is made (``chgnet.model.model.CHGNet._compute`` / ``forward``)
-------------------------------------------------------------------------------
Atom features (``atom_embedding``) go through ``n_conv = 4`` ``AtomConv`` layers
(``atom_conv_layers``; bond and angle updates in between), then through the optional
``readout_norm`` (a ``LayerNorm`` in 0.3.0 and r2scan, absent in 0.2.0). With
``mlp_first=True`` (all released checkpoints) the readout MLP ``mlp`` maps every atom to a
site energy, ``GraphPooling`` sums them and, the model being intensive, divides by the
number of atoms (mean pooling: energy per atom). The composition model ``AtomRef`` adds
``fc(counts / n_atoms)``, i.e. the mean over atoms of a per-element reference energy.
The total energy is ``e_per_atom * n_atoms``
(what :class:`chgnet.model.dynamics.CHGNetCalculator` reports), therefore

``E = sum_i [ mlp.layers[-1](h_i) + AtomRef.fc.weight[Z_i - 1] ]``

and the per-element reference energy folds exactly into ``Readout.bias[Z]``.

Layers
------
``last``
    Input of the final ``nn.Linear(64, 1)`` of the energy MLP (``mlp.layers[-1]``), i.e.
    the output of the MLP's last SiLU hidden layer (the dropout before it is inactive in
    eval mode). Site energy = ``W h + b`` and :meth:`ChgnetAdapter.readout` gives
    ``weight[Z] = W``, ``bias[Z] = b + AtomRef[Z]``. Dimension 64 for chgnet-0.3.0,
    chgnet-0.2.0 and chgnet-r2scan.
``backbone``
    Atom features entering ``mlp``: output of the last ``AtomConv`` layer after
    ``readout_norm`` (0.3.0, r2scan) or the raw last ``AtomConv`` output (0.2.0, which has
    no readout norm). Dimension 64 (``atom_fea_dim``) for all three checkpoints.

Both are read with forward hooks during one batched ``CHGNet.forward(graphs, task="e")``
call (energy only: no force, stress or magmom), which also gives the model's energy.
Graphs are built per structure with the model's own ``graph_converter``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, species_readout

#: vacuum (Angstrom) added beyond the atom-graph cutoff when a non-periodic axis has no cell vector
_VACUUM = 2.0


def _wheel_checkpoint(name: str) -> Path | None:
    """The checkpoint file ``chgnet/pretrained/<name>/*.pth.tar`` of the installed wheel (no import)."""
    found = importlib.util.find_spec("chgnet")
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        files = sorted((Path(root) / "pretrained" / name).glob("*.pth.tar"))
        if files:
            return files[0]
    return None


def _to_structure(atoms, cutoff: float):
    """A pymatgen ``Structure`` of ``atoms`` (numbers, positions, cell, pbc only).

    Periodic axes keep their cell vectors. When the cell is singular (e.g. a molecule with
    no cell), the missing non-periodic vectors are replaced by orthogonal ones longer
    than the structure's extent plus the cutoff; pymatgen does not image non-periodic
    axes, so this does not change the graph.
    """
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    cell = np.array(atoms.cell.array, dtype=float)
    pbc = np.array(atoms.pbc, dtype=bool)
    if abs(np.linalg.det(cell)) < 1e-8 and not pbc.all():
        pos = atoms.get_positions()
        length = float(np.ptp(pos, axis=0).max()) + cutoff + _VACUUM if len(pos) else cutoff + _VACUUM
        keep = [i for i in range(3) if pbc[i] or np.linalg.norm(cell[i]) > 1e-8]
        basis = [cell[i] / np.linalg.norm(cell[i]) for i in keep]
        for i in range(3):
            if i in keep:
                continue
            for trial in np.eye(3):  # Gram-Schmidt against the vectors kept so far
                v = trial - sum(np.dot(trial, b) * b for b in basis)
                if np.linalg.norm(v) > 1e-3:
                    break
            v = v / np.linalg.norm(v)
            basis.append(v)
            cell[i] = v * length
    clean = Atoms(numbers=atoms.numbers, positions=atoms.get_positions(), cell=cell, pbc=pbc)
    return AseAtomsAdaptor.get_structure(clean)


class ChgnetAdapter(Adapter):
    """A pretrained CHGNet loaded with ``CHGNet.load`` (wheel) or ``CHGNet.from_file`` (local)."""

    default_batch_atoms = 500  # CPU: see Adapter.default_batch_atoms
    default_batch_atoms_gpu = 8000

    def __init__(self, spec: ModelSpec, device: str, model, path: str | None):
        super().__init__(spec, device, path)
        self.model = model
        self.model.graph_converter.set_isolated_atom_response(spec.options.get("on_isolated_atoms", "warn"))

    @classmethod
    def bundled_checkpoint(cls, spec: ModelSpec) -> Path | None:
        return _wheel_checkpoint(spec.source["name"])

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "ChgnetAdapter":
        """Load with chgnet's own loader (``CHGNet.load`` for the wheel's), in eval mode, on ``device``."""
        from chgnet.model import CHGNet

        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet.__init__ prints its parameter count
            if spec.source["kind"] == "wheel":
                model = CHGNet.load(model_name=spec.source["name"], use_device=device,
                                    check_cuda_mem=False, verbose=False)
            else:
                model = CHGNet.from_file(str(path)).to(device)
        model.eval()
        if not model.mlp_first:
            raise ModelUnavailable(f"model {spec.key}: mlp_first=False (pooling before the MLP) has no per-atom readout")
        comp = model.composition_model
        if comp is not None and (not hasattr(comp, "fc") or type(comp).__name__ != "AtomRef"
                                 or comp.is_intensive != model.is_intensive):
            raise ModelUnavailable(f"model {spec.key}: composition model {type(comp).__name__} is not a per-atom AtomRef")
        return cls(spec, device, model, path)

    @property
    def supported_elements(self) -> set[int]:
        """Z = 1 .. 94 (rows of ``atom_embedding``)."""
        return set(range(1, self.model.atom_embedding.embedding.num_embeddings + 1))

    def _final_linear(self):
        import torch

        lin = self.model.mlp.layers[-1] if hasattr(self.model.mlp, "layers") else self.model.mlp[-1]
        if not isinstance(lin, torch.nn.Linear) or lin.out_features != 1:
            raise ModelUnavailable(f"model {self.spec.key}: the energy MLP does not end in a Linear(D, 1)")
        return lin

    def _sources(self, layer: str) -> str:
        if layer == "last":
            lin = self._final_linear()
            return f"CHGNet.mlp.layers[-1] input (final nn.Linear({lin.in_features}, 1) of the energy MLP)"
        norm = "readout_norm(atom_conv_layers[-1] output)" if self.model.readout_norm is not None \
            else "atom_conv_layers[-1] output (no readout_norm)"
        return f"CHGNet.mlp input: {norm}"

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """Batched ``CHGNet.forward(graphs, task="e")`` with a hook on the requested layer."""
        if layer not in ("last", "backbone"):
            raise ValueError(f"layer must be 'last' or 'backbone', not {layer!r}")
        model = self.model
        cutoff = float(model.graph_converter.atom_graph_cutoff)
        graphs = [
            model.graph_converter(_to_structure(atoms, cutoff), graph_id=str(atoms.info.get("structure_id", i)))
            .to(self.device)
            for i, atoms in enumerate(structures)
        ]
        # CHGNet skips its bond/angle layers when a *batch* holds no angle at all, so a structure
        # without angles (empty bond graph) gets other features in a batch with angles than alone
        # (its own calculator's result). Such structures run in a pass of their own.
        no_angles = [i for i, g in enumerate(graphs) if len(g.bond_graph) == 0]
        groups = [g for g in (no_angles, [i for i in range(len(graphs)) if i not in set(no_angles)]) if g]
        n_atoms = np.array([len(a) for a in structures], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(n_atoms)])
        energy = np.zeros(len(structures))
        values = None
        target = self._final_linear() if layer == "last" else model.mlp
        for group in groups:
            x, e = self._pass(model, [graphs[i] for i in group], target)
            if values is None:
                values = np.zeros((int(n_atoms.sum()), x.shape[1]), dtype=x.dtype)
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in group])
            if x.shape[0] != len(rows):
                raise RuntimeError(f"hook captured {x.shape[0]} rows for {len(rows)} atoms")
            values[rows] = x
            counts = n_atoms[group].astype(np.float64)
            energy[group] = e * counts if model.is_intensive else e
        blocks = [Block(layer, 0, values.shape[1], self._sources(layer))]
        return values, blocks, energy

    @staticmethod
    def _pass(model, graphs, target):
        """One energy-only ``CHGNet.forward`` with a pre-hook on ``target``: (inputs, energies)."""
        import torch

        captured = {}

        def grab(_module, args):
            captured["x"] = args[0].detach()

        handle = target.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                pred = model(graphs, task="e")
        finally:
            handle.remove()
        return captured["x"].cpu().numpy(), pred["e"].detach().double().cpu().numpy().reshape(-1)

    def readout(self) -> Readout:
        """``weight[Z] = W``, ``bias[Z] = b + AtomRef[Z]`` of the final Linear and composition model.

        Rows of elements the model does not support (Z = 0, Z > 94) are zero.
        """
        lin = self._final_linear()
        w = lin.weight.detach().double().cpu().numpy().reshape(-1)
        b = float(lin.bias.detach().double().cpu()) if lin.bias is not None else 0.0
        zs = np.array(sorted(self.supported_elements))
        bias = np.full(len(zs), b)
        comp = self.model.composition_model
        if comp is not None:
            ref = comp.fc.weight.detach().double().cpu().numpy().reshape(-1)
            n = min(ref.size, int(zs.max()))
            bias[:n] += ref[:n]  # zs = 1 .. max: row k is Z = k + 1
        return species_readout(zs, w, bias)

    def calculator(self):
        """chgnet's own ``CHGNetCalculator`` on the same model object."""
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "CHGNet will run on <device>"
            return CHGNetCalculator(self.model, use_device=self.device, check_cuda_mem=False)

    def extra_versions(self) -> dict:
        return {"checkpoint_version": self.model.version}
