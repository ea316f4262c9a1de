"""ORB adapter (Orbital Materials' orb-models: ORB v2/v3 direct and conservative), run in the ``orb`` environment.

An ORB model (``DirectForcefieldRegressor`` or ``ConservativeForcefieldRegressor``) encodes
atoms with a graph network (``MoleculeGNS``) into node features ``x_i``. Its energy head is
**graph-level**: it mean-pools the node features over the structure and applies an MLP::

    h   = MLP_hidden(mean_i x_i)                 (energy head mlp up to its last Linear)
    E   = n (s (w . h + b) + m) + sum_i ref_Z(i) + E_rep
         (ScalarNormalizer s, m; per-atom average times n; LinearReferenceEnergy; ZBL pair repulsion)

There is no per-atom energy inside the model, so the per-atom energy that sums to ``E`` with
a linear read-out is ``e_i = s w . h + (E_rep / n) + s b + m + ref_Z(i)``: the same hidden
vector ``h`` for every atom of a structure, plus the structure's repulsion energy shared
equally among its atoms.

Layers
------
``"last"``
    ``h`` broadcast to each atom of its structure (``head_mlp_hidden_dim`` columns; a
    *structure-level* vector, identical for all atoms of one structure) and ``E_rep / n``
    (one column; 0 for a model without pair repulsion). Readout: ``W[Z] = [s w, 1]``,
    ``b[Z] = s b + m + ref_Z``, read from the head's own Linear, normaliser and reference
    modules.
``"backbone"``
    ``x_i``: the per-atom node features of the GNN, the input of the energy head's pooling
    (``latent_dim`` columns).

Symmetry: ORB is not rotationally constrained (edge features hold spherical harmonics of
edge vectors; invariance is learned), so features and energy change under rotation; they are
invariant under translation, permutation and supercells, except that the conservative
models of orb-models 0.5.5 aggregate the ZBL repulsion with a *mean* over atoms (the direct
models with a sum), so their ``E_rep`` and its column are intensive, not extensive.

Checkpoints: orb-models' state-dict ``.ckpt``. ``loader`` entries name an orb-models
pretrained builder (``orb_models.forcefield.pretrained.ORB_PRETRAINED_MODELS``), which
fetches its weights from the orbitalmaterials-public-models S3 bucket with ``cached_path``
(needs internet; a copy already in cached_path's cache is used offline); a file named
``source.filename`` in the checkpoints folder is used first. ``local`` entries carry the architecture in ``options`` (see
:func:`build_random_orb`) and are read with orb-models' ``load_model``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, affine_probe, species_readout

#: orb-models' architecture builders a ``local`` entry may name in ``options["architecture"]``.
ARCHITECTURES = ("orb_v3_conservative_architecture", "orb_v3_direct_architecture", "orb_v2_architecture")


def _builder(spec: ModelSpec):
    """The orb-models pretrained builder a ``loader`` entry names."""
    from orb_models.forcefield.pretrained import ORB_PRETRAINED_MODELS

    name = spec.source["name"]
    if name not in ORB_PRETRAINED_MODELS:
        raise ModelUnavailable(f"model {spec.key}: orb-models has no pretrained model {name!r}")
    return ORB_PRETRAINED_MODELS[name]


def _url(spec: ModelSpec) -> str:
    """Where orb-models' pretrained builder downloads a ``loader`` entry's weights from."""
    return inspect.signature(_builder(spec)).parameters["weights_path"].default


def _check_reachable(url: str, timeout: float = 10.0) -> None:
    """Raise ``OSError`` at once when the host of ``url`` cannot be reached."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
        pass


class OrbAdapter(Adapter):
    """An ORB model (orb-models regressor) from a state-dict checkpoint."""


    def __init__(self, spec: ModelSpec, device: str, model, path: str):
        import torch
        from orb_models.forcefield.forcefield_heads import EnergyHead

        super().__init__(spec, device, path)
        self.model = model.to(device).eval()
        heads = [h for h in model.heads.values() if isinstance(h, EnergyHead)]
        if len(heads) != 1:
            raise NotImplementedError(f"model {spec.key}: expected one EnergyHead, found {len(heads)}")
        self.head = heads[0]
        if not self.head.atom_avg:
            raise NotImplementedError(f"model {spec.key}: energy head predicts a total, not a per-atom average")
        linears = [m for m in self.head.mlp if isinstance(m, torch.nn.Linear)]
        self.last_linear = linears[-1]
        self.dtype = self.last_linear.weight.dtype

    @classmethod
    def cached_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """cached_path's copy of the builder's weights URL (orb-models' own cache)."""
        from cached_path import find_latest_cached

        cached = find_latest_cached(_url(spec))
        return Path(cached) if cached is not None else None

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        from cached_path import cached_path

        _check_reachable(_url(spec))  # cached_path retries for ~30 s before it gives up offline
        return str(cached_path(_url(spec)))

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "OrbAdapter":
        """The ORB regressor of ``spec`` in float32 (no torch.compile) from the weights at ``path``."""
        from orb_models.forcefield import pretrained

        opts = dict(device=device, precision="float32-highest", compile=False)
        if spec.source["kind"] != "local":
            return cls(spec, device, _builder(spec)(weights_path=str(path), **opts), path)
        from orb_models.forcefield.atomic_system import SystemConfig

        arch = spec.options.get("architecture")
        if arch not in ARCHITECTURES:
            raise ModelUnavailable(f"model {spec.key}: options.architecture must be one of {ARCHITECTURES}")
        model = getattr(pretrained, arch)(system_config=SystemConfig(**spec.options["system_config"]),
                                          **spec.options.get("architecture_args", {}))
        return cls(spec, device, pretrained.load_model(model, str(path), **opts), path)

    @property
    def supported_elements(self) -> set[int]:
        """Atomic numbers 1..117 (orb-models one-hot encodes Z with 118 classes)."""
        return set(range(1, 118))

    def _batch(self, structures: list):
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs
        from orb_models.forcefield.base import batch_graphs

        graphs = [ase_atoms_to_atom_graphs(a, system_config=self.model.system_config, device=self.device)
                  for a in structures]
        return batch_graphs(graphs).to(self.device)

    def _repulsion(self, batch):
        """The structure's pair-repulsion energy, as the regressor adds it (zeros without one)."""
        import torch

        if not getattr(self.model, "pair_repulsion", False):
            return torch.zeros(len(batch.n_node), dtype=self.dtype, device=self.device)
        return self.model.pair_repulsion_fn(batch)["energy"].reshape(-1)

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass through the GNN and the energy head (no gradients).

        Returns
        -------
        values : ndarray (n_atoms, D), float32
            "last": ``[h, E_rep / n]`` per atom; "backbone": ``x_i``.
        blocks : list of Block
        energy : ndarray (n_structures,)
            The model's total energy of the same pass (eV): the head's ``predict`` plus the
            pair repulsion, as the regressors compute it.
        """
        import torch
        from orb_models.forcefield import segment_ops

        batch = self._batch(structures)
        with torch.no_grad():
            x = self.model.model(batch)["node_features"]
            energy = self.head.predict(x, batch).reshape(-1) + self._repulsion(batch)
            n_node = batch.n_node
            if layer == "last":
                pooled = segment_ops.aggregate_nodes(x, n_node, reduction=self.head.node_aggregation)
                cut = max(i for i, m in enumerate(self.head.mlp) if m is self.last_linear)
                hidden = self.head.mlp[:cut](pooled).double()
                rep = (self._repulsion(batch).double() / n_node.double())[:, None]
        energy = energy.detach().double().cpu().numpy()
        if layer != "last":
            x = x.detach().cpu().numpy().astype(np.float32)
            return x, [Block("node_features", 0, x.shape[1], "GNN node features (input of the energy head's "
                                                             "mean pooling)")], energy
        values = torch.repeat_interleave(torch.cat([hidden, rep], dim=1), n_node, dim=0)
        values = values.cpu().numpy().astype(np.float32)
        d = hidden.shape[1]
        return values, [Block("graph_hidden", 0, d, "energy head's last hidden layer on the mean-pooled node "
                              "features (structure-level: the same for every atom of a structure)"),
                        Block("pair_repulsion", d, d + 1, "ZBL pair-repulsion energy of the structure / number of "
                              "atoms")], energy

    def readout(self) -> Readout:
        """``e_i = [s w, 1] . (h, E_rep / n) + s b + m + ref_Z``."""
        import torch

        s_and_m = affine_probe(lambda v: self.head.normalizer.inverse(v), 1, self.dtype, self.device)
        scale, mean = float(s_and_m[0][0]), s_and_m[1]
        w = self.last_linear.weight.detach().double().cpu().numpy().reshape(-1)
        b = float(self.last_linear.bias.detach().double().cpu()[0]) if self.last_linear.bias is not None else 0.0
        zs = np.arange(1, 118)
        with torch.no_grad():
            ref = self.head.reference(torch.tensor(zs, device=self.device),
                                      torch.ones(len(zs), dtype=torch.long, device=self.device))
        return species_readout(zs, np.concatenate([scale * w, [1.0]]), scale * b + mean + ref.detach().double().cpu().numpy())

    def calculator(self):
        """orb-models' ASE calculator on the same model."""
        from orb_models.forcefield.calculator import ORBCalculator

        return ORBCalculator(self.model, device=self.device)
