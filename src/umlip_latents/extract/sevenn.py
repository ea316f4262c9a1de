"""SevenNet adapter (package ``sevenn``, run in the ``sevenn`` environment: it needs ``e3nn>=0.5``).

A SevenNet model is an ``AtomGraphSequential`` of named modules (NequIP-style interaction
blocks ``0_...`` to ``4_...``) followed by the readout::

    x (node scalars after 4_equivariant_gate)
      -> reduce_input_to_hidden   IrrepsLinear  (128x0e [+ modal one-hot] -> 64x0e, no bias)
      -> reduce_hidden_to_energy  IrrepsLinear  (64x0e -> 1x0e, no bias)
      -> rescale_atomic_energy    SpeciesWiseRescale / ModalWiseRescale: E_i = s_Z * y_i + t_Z
      -> reduce_total_enegy       AtomReduce (sum per structure)
      -> force_output             autograd forces/stress (removed here)

Layers
------
``"last"``
    The input of ``reduce_hidden_to_energy`` (node feature ``x`` after
    ``reduce_input_to_hidden``): 64 invariant channels (``64x0e``). The per-atom energy is
    the linear map ``reduce_hidden_to_energy`` followed by the per-species (and, for MF-0,
    per-modality) scale and shift of ``rescale_atomic_energy``; both are folded into the
    :class:`~umlip_latents.features.Readout` (``W[Z] = s_Z w``, ``b[Z] = t_Z``).
``"backbone"``
    The input of ``reduce_input_to_hidden``: the 128 invariant node channels (``128x0e``)
    leaving the last interaction block (``4_equivariant_gate``). For SevenNet-MF-0 the
    readout appends a constant modality one-hot (2 columns) inside
    ``reduce_input_to_hidden``; those columns are not part of the features.

Dimensions per registered checkpoint (last / backbone): sevennet-0 64 / 128,
sevennet-0-22may2024 64 / 128, sevennet-l3i5 64 / 128, sevennet-mf-0 64 / 128.

The pass is the model's own ``forward`` on one ``torch_geometric`` batch of the graphs
sevenn builds for its ASE calculator (``unlabeled_atoms_to_graph``, cutoff 5 A), in batch
mode, under ``torch.no_grad`` with the ``force_output`` module deleted (as sevenn's own
``deploy``/``mliap`` do) so no autograd force or stress is computed. Multi-fidelity
models get the modality the way the calculator sets it (``data_modality`` per graph,
mapped through the model's ``modal_map``); the registry's ``options.modal`` names it.

Symmetry: the SevenNet checkpoints are built with ``is_parity: False`` (SO(3), not O(3),
equivariant), so the features are invariant under proper rotations, translations,
permutations and supercells (to float32 rounding, ~1e-6 relative) but a mirror image
(det -1) can change them slightly (~1e-5 relative) and the energy by ~1e-6 eV/atom.
Graphs take every neighbour closer than the cutoff (5 A; smooth XPLOR envelope from
4.5 A for SevenNet-0/MF-0, polynomial p=6 envelope for l3i5), periodic images included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, affine_probe, species_readout

#: module whose input is the "last" layer, and the module whose input is the "backbone".
LAST_MODULE = "reduce_hidden_to_energy"
BACKBONE_MODULE = "reduce_input_to_hidden"
RESCALE_MODULE = "rescale_atomic_energy"
REDUCE_MODULE = "reduce_total_enegy"  # sic, sevenn's module name


class SevennAdapter(Adapter):
    """A SevenNet checkpoint loaded with ``sevenn.util.load_checkpoint``."""

    default_batch_atoms = 100  # CPU: see Adapter.default_batch_atoms
    default_batch_atoms_gpu = 8000

    def __init__(self, spec: ModelSpec, device: str, model, path: str, modal: str | None):
        super().__init__(spec, device, path)
        self.model = model
        self.modal = modal
        self.cutoff = float(model.cutoff)
        self.type_map = {int(z): int(i) for z, i in model.type_map.items()}

    @classmethod
    def bundled_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """sevenn's own ``pretrained_name_to_path`` (the file ships in ``pretrained_potentials``)."""
        import sevenn.util

        try:
            path = Path(sevenn.util.pretrained_name_to_path(spec.source["name"]))
        except (ValueError, OSError):  # unknown name, or a name sevenn would download
            return None
        return path if path.is_file() else None

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        import sevenn.util

        return sevenn.util.pretrained_name_to_path(spec.source["name"])

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "SevennAdapter":
        """Build the model from its checkpoint, drop its force output and set the modality.

        Raises
        ------
        ModelUnavailable
            When the modality is not one of the model's.
        """
        import sevenn.util

        cp = sevenn.util.load_checkpoint(path)
        model = cp.build_model()
        modal = spec.options.get("modal")
        if model.modal_map:
            modal = modal or cp.config.get("default_modal")
            if modal not in model.modal_map:
                raise ModelUnavailable(
                    f"model {spec.key}: options.modal must be one of {list(model.modal_map)}, got {modal!r}"
                )
        elif modal:
            raise ModelUnavailable(f"model {spec.key}: options.modal={modal!r} given but the model has no modalities")
        # energy only: no autograd force/stress (sevenn's deploy and mliap do the same)
        model.delete_module_by_key("force_output")
        model.key_grad = None
        model.set_is_batch_data(True)
        model.to(device)
        model.eval()
        return cls(spec, device, model, path, modal)

    @property
    def supported_elements(self) -> set[int]:
        return set(self.type_map)

    def _batch(self, structures: list):
        """One ``torch_geometric`` batch of sevenn graphs (as its calculator builds them)."""
        import sevenn._keys as KEY
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph
        from torch_geometric.data import Batch

        graphs = []
        for atoms in structures:
            data = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, self.cutoff, with_shift=False))
            if self.modal:
                data[KEY.DATA_MODALITY] = self.modal
            graphs.append(data)
        return Batch.from_data_list(graphs).to(self.device)

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass.

        Parameters
        ----------
        structures : list of ase.Atoms
        layer : {"last", "backbone"}

        Returns
        -------
        values : ndarray (n_atoms, 64 or 128), float32
            Input of ``reduce_hidden_to_energy`` ("last") or ``reduce_input_to_hidden``
            ("backbone"), captured by a forward pre-hook during the model's own forward.
        blocks : list of Block
        energy : ndarray (n_structures,)
            ``pred_total_energy`` of the same pass (eV).
        """
        import sevenn._keys as KEY
        import torch

        name = LAST_MODULE if layer == "last" else BACKBONE_MODULE
        module = self.model._modules[name]
        captured = {}

        def hook(mod, args):
            captured["x"] = args[0][mod.key_input].detach()

        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                out = self.model(self._batch(structures))
        finally:
            handle.remove()
        x = captured["x"]
        energy = out[KEY.PRED_TOTAL_ENERGY].detach().double().cpu().numpy().reshape(-1)
        irreps = module._irreps_in_wo_modal
        if x.shape[1] != irreps.dim:
            raise RuntimeError(f"{name} input has {x.shape[1]} columns, expected {irreps.dim} ({irreps})")
        source = f"{name}.{module.key_input} (input, {irreps})"
        block = Block("scalars" if layer == "last" else "node_scalars", 0, irreps.dim, source)
        return x.float().cpu().numpy(), [block], energy

    def readout(self) -> Readout:
        """The readout from "last" features: ``E_i = s_Z (w . h_i + b) + t_Z``.

        ``w, b`` are probed from ``reduce_hidden_to_energy``; ``s_Z, t_Z`` from
        ``rescale_atomic_energy`` run on y = 0 and y = 1 for every atom type (with the
        selected modality for MF-0); ``reduce_total_enegy``'s constant multiplies both.
        """
        import sevenn._keys as KEY
        import torch

        lin = self.model._modules[LAST_MODULE]
        rescale = self.model._modules[RESCALE_MODULE]
        param = next(self.model.parameters())
        w, b0 = affine_probe(lin.linear, lin.irreps_in.dim, param.dtype, param.device)
        # probe the rescale module itself with y = 0 and y = 1 for every atom type
        zs = sorted(self.type_map)
        types = torch.tensor([self.type_map[z] for z in zs], dtype=torch.long, device=param.device)
        res = []
        for y in (0.0, 1.0):
            data = {
                rescale.key_input: torch.full((len(zs), 1), y, dtype=param.dtype, device=param.device),
                KEY.ATOM_TYPE: types,
                KEY.BATCH: torch.zeros(len(zs), dtype=torch.long, device=param.device),
            }
            if self.modal:
                data[KEY.MODAL_TYPE] = torch.tensor([self.model.modal_map[self.modal]], device=param.device)
            with torch.no_grad():
                res.append(rescale(data)[rescale.key_output].reshape(-1).double().cpu().numpy())
        shift, scale = res[0], res[1] - res[0]
        const = float(getattr(self.model._modules[REDUCE_MODULE], "constant", 1.0))
        return species_readout(zs, const * scale[:, None] * w[None, :], const * (scale * b0 + shift))

    def calculator(self):
        """sevenn's own ``SevenNetCalculator`` on the same checkpoint file and modality.

        It builds its own copy of the model (with forces), since this adapter's model has
        ``force_output`` removed.
        """
        from sevenn.calculator import SevenNetCalculator

        return SevenNetCalculator(model=self.path, file_type="checkpoint", device=self.device, modal=self.modal)
