"""PET adapter (metatrain's Point-Edge Transformer; PET-MAD and the uPET models), run in the ``pet`` environment.

A PET model (``metatrain.pet.PET``) computes, for every GNN layer ``l`` that feeds the
readout, node features ``n_i^l`` and edge features ``e_ij^l``. The energy target has a
head per layer and per kind (a 2-layer MLP, ``backend.{node,edge}_heads.energy.l``) and a
last linear layer per layer and kind (``backend.{node,edge}_last_layers.energy.l``)::

    y_i = sum_l [ W_n^l . h_n(n_i^l) + b_n^l + sum_j f_c(r_ij) (W_e^l . h_e(e_ij^l) + b_e^l) ]
    E_i = s_Z y_i + c_Z          (Scaler, then CompositionModel: per-element reference energy)

Layers
------
``"last"``
    metatrain's own output ``mtt::aux::energy_last_layer_features``: for each readout layer
    the node head output ``h_n(n_i^l)`` and the cutoff-weighted sum over neighbours
    ``sum_j f_c(r_ij) h_e(e_ij^l)`` (``2 * d_head`` columns per layer), **plus one column**
    ``C_i = sum_j f_c(r_ij)``, the cutoff-weighted neighbour count. The energy is *not*
    linear in metatrain's last-layer features alone: the edge last layers' biases ``b_e^l``
    enter as ``(sum_l b_e^l) C_i``, and ``C_i`` is not a function of those features. With the
    extra column the readout is exact (``W[Z] = s_Z [W_n^l, W_e^l ..., sum_l b_e^l]``,
    ``b[Z] = s_Z sum_l b_n^l + c_Z``). ``C_i`` comes from a second pass of a copy of the
    model whose edge heads output a constant 1 (last edge-head linear: weight 0, bias 1,
    so ``h_e = SiLU(1)``): its edge last-layer features are ``SiLU(1) C_i``.
``"backbone"``
    metatrain's output ``feature`` (metatomic's ``features`` where the model names it so):
    the node features of every readout layer and the cutoff-weighted sums of their edge
    features, concatenated (``num_readout_layers * (d_node + d_pet)`` columns).

Symmetry: PET is *not* rotationally constrained (it sees Cartesian edge vectors; rotational
invariance is only learned, by augmentation, in the published models), so features and
energy change under rotation; they are exactly invariant (to float32 rounding) under
translation, permutation and supercells. A model with ZBL repulsion (``zbl: true``) adds an
energy term that is not linear in the features; :meth:`PetAdapter.readout` refuses such a
model rather than return a readout that does not reproduce its energy.

Checkpoints: a local metatomic ``.pt`` (``mtt export`` / ``AtomisticModel.save``) or a
metatrain ``.ckpt`` (what upet downloads), bare or wrapped in metatrain's LLPR uncertainty model
(as PET-MAD v1.0.2 and the uPET releases are: the wrapper's ``model`` is the PET, whose energy
and last-layer features it passes through unchanged; :func:`unwrap`), found by
:func:`umlip_latents.registry.local_checkpoint`; ``loader`` entries are otherwise fetched
with upet's loader (``lab-cosmo/upet`` on Hugging Face), which needs internet.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, species_readout

LAST_OUTPUT = "mtt::aux::energy_last_layer_features"
BACKBONE_OUTPUTS = ("features", "feature")  # metatomic's standard name, metatrain PET's name
TARGET = "energy"


#: metatrain wrappers around a PET that pass energy and last-layer features through unchanged
#: (PET-MAD v1.0.2 and the uPET releases ship as an LLPR uncertainty model around the PET)
WRAPPERS = ("LLPRUncertaintyModel",)


def _class_name(module) -> str:
    """The Python class name of an eager module or of a TorchScript one (``original_name``)."""
    return getattr(module, "original_name", None) or type(module).__name__


def unwrap(module):
    """The PET inside :data:`WRAPPERS` (their ``model`` submodule), or ``module`` itself."""
    while _class_name(module) in WRAPPERS:
        module = module.model
    if _class_name(module) != "PET":
        raise ModelUnavailable(f"the checkpoint holds a {_class_name(module)}, not a metatrain PET "
                               f"(or a PET inside {', '.join(WRAPPERS)})")
    return module


def _load_module(path: str):
    """The PET ``torch.nn.Module`` of a ``.pt`` (TorchScript) or ``.ckpt`` (eager) file, unwrapped,
    and the neighbour lists it requests."""
    if path.endswith(".ckpt"):
        from metatrain.utils.io import load_model

        model = unwrap(load_model(path))
        return model, model.requested_neighbor_lists()
    from metatomic.torch import load_atomistic_model

    atomistic = load_atomistic_model(path)
    return unwrap(atomistic.module), atomistic.requested_neighbor_lists()


class PetAdapter(Adapter):
    """A PET model from a metatomic ``.pt`` or metatrain ``.ckpt`` file."""


    def __init__(self, spec: ModelSpec, device: str, module, neighbor_lists, path: str):
        import torch

        super().__init__(spec, device, path)
        self.module = module.to(device).eval()
        self.neighbor_lists = neighbor_lists
        self.dtype = next(p for p in module.parameters()).dtype
        self.types = [int(z) for z in module.atomic_types]
        self.n_layers = sum(1 for k in module.state_dict() if k.startswith(f"backend.node_last_layers.{TARGET}.")
                            and k.endswith(".weight"))
        outputs = list(module.outputs.keys()) if hasattr(module.outputs, "keys") else []
        self.backbone_output = next((o for o in BACKBONE_OUTPUTS if o in outputs), BACKBONE_OUTPUTS[1])
        # the probe copy for C_i: edge heads output SiLU(1) on every real edge
        self._probe = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, p in self._probe.named_parameters():
                if name.startswith(f"backend.edge_heads.{TARGET}.") and ".2." in name:
                    p.zero_()
                    if name.endswith("bias"):
                        p.fill_(1.0)

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        """upet's loader (needs internet)."""
        from upet._models import _resolve_and_download_checkpoint  # upet's only entry point for a path

        src = spec.source
        return _resolve_and_download_checkpoint(src["name"], src.get("size"), src.get("version"))[2]

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "PetAdapter":
        module, nls = _load_module(path)
        additive = [_class_name(m) for m in module.additive_models.children()]
        if len(additive) != 1:  # the composition model, and e.g. ZBL
            raise ModelUnavailable(
                f"model {spec.key}: the PET adds {', '.join(additive)} to its energy; a ZBL pair repulsion "
                "(hyper zbl: true) is not linear in the last-layer features, so no readout re-reads the "
                "energy and this adapter refuses the model")
        return cls(spec, device, module, nls, path)

    @property
    def supported_elements(self) -> set[int]:
        return set(self.types)

    def _systems(self, structures: list):
        from metatomic.torch import systems_to_torch
        from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

        systems = systems_to_torch(structures, dtype=self.dtype, device=self.device)
        return [get_system_with_neighbor_lists(s, self.neighbor_lists) for s in systems]

    def _run(self, module, systems, names: dict) -> dict:
        import torch
        from metatomic.torch import ModelOutput

        outputs = {name: ModelOutput(sample_kind=kind) for name, kind in names.items()}
        with torch.no_grad():
            return module(systems, outputs, None)

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass (plus the probe pass for ``C_i`` when ``layer="last"``).

        Returns
        -------
        values : ndarray (n_atoms, D), float32
            "last": ``mtt::aux::energy_last_layer_features`` and ``C_i``; "backbone": ``feature``.
        blocks : list of Block
        energy : ndarray (n_structures,)
            The model's total energy of the same pass (eV).
        """
        systems = self._systems(structures)
        name = LAST_OUTPUT if layer == "last" else self.backbone_output
        out = self._run(self.module, systems, {TARGET: "system", name: "atom"})
        energy = out[TARGET].block().values.detach().double().cpu().numpy().reshape(-1)
        x = out[name].block().values.detach().double().cpu().numpy()
        if layer != "last":
            return x.astype(np.float32), [Block("node_edge_features", 0, x.shape[1], f"output {name!r} (per atom)")], energy
        probe = self._run(self._probe, systems, {LAST_OUTPUT: "atom"})[LAST_OUTPUT].block().values
        d_head = x.shape[1] // (2 * self.n_layers)
        # columns per layer: [node (d_head), edge (d_head)]; every edge column of the probe is SiLU(1) C_i
        count = probe[:, d_head].detach().double().cpu().numpy() / _silu1()
        values = np.concatenate([x, count[:, None]], axis=1).astype(np.float32)
        blocks = [
            Block("last_layer_features", 0, x.shape[1],
                  f"output {LAST_OUTPUT!r} (per atom; {self.n_layers} layers x [node, edge] x {d_head})"),
            Block("neighbour_weight", x.shape[1], x.shape[1] + 1,
                  "sum_j f_c(r_ij), the cutoff-weighted neighbour count the edge biases multiply"),
        ]
        return values, blocks, energy

    def readout(self) -> Readout:
        """``E_i = s_Z (sum_l [W_n^l, W_e^l] . v_i + (sum_l b_e^l) C_i + sum_l b_n^l) + c_Z``.

        Weights and biases are read from the energy target's last layers; ``s_Z`` and ``c_Z``
        by running the model's own scaler and composition modules on one atom of each type.
        """
        state = {k: v.detach().double().cpu().numpy() for k, v in self.module.state_dict().items()}
        prefix = f"backend.{{}}_last_layers.{TARGET}.{{}}.{TARGET}___0.{{}}"
        w, b_node, b_edge = [], 0.0, 0.0
        for layer in range(self.n_layers):
            for kind in ("node", "edge"):
                w.append(state[prefix.format(kind, layer, "weight")].reshape(-1))
            b_node += float(state[prefix.format("node", layer, "bias")][0])
            b_edge += float(state[prefix.format("edge", layer, "bias")][0])
        w = np.concatenate(w + [np.array([b_edge])])
        scale, shift = self._scale_and_shift()
        return species_readout(self.types, scale[:, None] * w[None, :], scale * b_node + shift)

    def _scale_and_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-type scale ``s_Z`` (Scaler) and reference energy ``c_Z`` (CompositionModel)."""
        import torch
        from metatomic.torch import ModelOutput, System

        additive = list(self.module.additive_models.children())
        if len(additive) != 1:
            raise NotImplementedError(
                f"model {self.spec.key} has {len(additive)} additive models (ZBL?): its energy is not "
                "linear in the last-layer features"
            )
        n = len(self.types)
        system = System(
            types=torch.tensor(self.types, dtype=torch.int32, device=self.device),
            positions=torch.arange(n, dtype=self.dtype, device=self.device)[:, None].repeat(1, 3) * 100.0,
            cell=torch.zeros(3, 3, dtype=self.dtype, device=self.device),
            pbc=torch.zeros(3, dtype=torch.bool, device=self.device),
        )
        outputs = {TARGET: ModelOutput(sample_kind="atom")}
        with torch.no_grad():
            scale = self.module.scaler([system], outputs, None)[TARGET].block().values
            shift = additive[0]([system], outputs, None)[TARGET].block()
        shift_values = np.zeros(n)
        atoms = shift.samples.column("atom").cpu().numpy()
        shift_values[atoms] = shift.values.detach().double().cpu().numpy().reshape(-1)
        return scale.detach().double().cpu().numpy().reshape(-1), shift_values

    def calculator(self):
        """metatomic's ASE calculator on the same file (a ``.pt``; a ``.ckpt`` is exported first)."""
        from metatomic.torch.ase_calculator import MetatomicCalculator

        if self.path.endswith(".ckpt"):
            from metatrain.utils.io import load_model

            return MetatomicCalculator(load_model(self.path).export(), device=self.device)
        return MetatomicCalculator(self.path, device=self.device)


def _silu1() -> float:
    """SiLU(1) = 1 / (1 + e^-1)."""
    return 1.0 / (1.0 + np.exp(-1.0))
