"""MatterSim adapter (Microsoft's M3GNet-architecture potentials), run in the ``mattersim`` environment.

A MatterSim model (``mattersim.forcefield.m3gnet.M3Gnet`` inside a ``Potential``) updates
node features ``x_i`` through ``num_blocks`` message-passing blocks (two- and three-body
interactions), then reads the per-atom energy with a **gated** MLP and a per-element affine
normalisation (``AtomScaling``)::

    a_i = swish(L2 swish(L1 x_i))            value branch  (final.g[:-1])
    s_i = sigmoid(L2' swish(L1' swish(L0' x_i)))   gate    (final.sigma, one output)
    y_i = (w . a_i + b) s_i                  final.g[-1] times the gate
    E_i = scale_Z y_i + shift_Z              (normalizer)

``y_i`` is a product, so the energy is not linear in ``a_i`` alone; it is linear in
``(s_i a_i, s_i)``: ``E_i = scale_Z [w, b] . (s_i a_i, s_i) + shift_Z`` exactly.

Layers
------
``"last"``
    ``s_i a_i`` (``units`` columns: the value branch's last hidden layer, gated) and ``s_i``
    (one column, the gate). The readout is ``W[Z] = scale_Z [w, b]``, ``b[Z] = shift_Z``,
    read from the model's own ``final.g[-1]`` and ``normalizer`` buffers.
``"backbone"``
    ``x_i``: the node features after the last message-passing block, the input of the
    gated readout MLP (``units`` columns).

Symmetry: M3GNet sees only distances and angles, so features and energy are invariant (to
float32 rounding) under rotation, translation, permutation and supercells.

Checkpoints: MatterSim's own ``.pth`` format (``Potential.save``; read with
``Potential.from_checkpoint``). ``loader`` entries name the files mattersim downloads
(``mattersim-v1.0.0-1M.pth``, ``-5M.pth``) from the GitHub repository microsoft/mattersim
into ``~/.local/mattersim/pretrained_models``; found first in the checkpoints folder
(:func:`umlip_latents.registry.local_checkpoint`), then in that cache, else downloaded
(needs internet).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, species_readout

#: mattersim's own cache of downloaded checkpoints (``Potential.from_checkpoint``).
CACHE = "~/.local/mattersim/pretrained_models"


class MattersimAdapter(Adapter):
    """A MatterSim (M3GNet) model from a mattersim ``.pth`` checkpoint."""


    def __init__(self, spec: ModelSpec, device: str, potential, path: str):
        super().__init__(spec, device, path)
        self.potential = potential
        self.model = potential.model.to(device).eval()
        self.args = dict(self.model.get_model_args())
        final = self.model.final
        if len(final.g) < 2 or not hasattr(final.g[-1], "linear") or final.g[-1].linear.out_features != 1:
            raise NotImplementedError(f"model {spec.key}: readout {type(final).__name__} is not a gated MLP to one output")

    @classmethod
    def cached_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """mattersim's own cache of downloaded checkpoints (:data:`CACHE`)."""
        path = Path(os.path.expanduser(CACHE)) / spec.source["filename"]
        return path if path.is_file() else None

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        from mattersim.utils.download_utils import download_checkpoint

        cache = Path(os.path.expanduser(CACHE))
        download_checkpoint(spec.source["filename"], save_folder=str(cache))
        return str(cache / spec.source["filename"])

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "MattersimAdapter":
        from mattersim.forcefield.potential import Potential

        return cls(spec, device, Potential.from_checkpoint(path, device=device, load_training_state=False), path)

    @property
    def supported_elements(self) -> set[int]:
        """Atomic numbers 1..max_z (the one-hot embedding's range)."""
        return set(range(1, int(self.args["max_z"]) + 1))

    def _input(self, structures: list) -> dict:
        """mattersim's own graph construction and batching of ``structures`` (one batch)."""
        from mattersim.datasets.utils.build import build_dataloader
        from mattersim.forcefield.potential import batch_to_dict

        loader = build_dataloader(list(structures), model_type="m3gnet", cutoff=self.args["cutoff"],
                                  threebody_cutoff=self.args["threebody_cutoff"], batch_size=len(structures),
                                  only_inference=True)
        (graph_batch,) = list(loader)
        return batch_to_dict(graph_batch, device=self.device)

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass; the readout input is caught on its way into ``final``.

        Returns
        -------
        values : ndarray (n_atoms, D), float32
            "last": ``[s_i a_i, s_i]`` (``units + 1`` columns); "backbone": ``x_i`` (``units``).
        blocks : list of Block
        energy : ndarray (n_structures,)
            The model's total energy of the same pass (eV).
        """
        import torch

        caught = {}
        hook = self.model.final.register_forward_pre_hook(lambda mod, args: caught.__setitem__("x", args[0]))
        try:
            with torch.no_grad():
                energy = self.model(self._input(structures))
                x = caught["x"]
                if layer == "last":
                    final = self.model.final
                    a = final.g[:-1](x).double()
                    s = final.sigma(x).double()
        finally:
            hook.remove()
        energy = energy.detach().double().cpu().numpy().reshape(-1)
        units = x.shape[1]
        if layer != "last":
            return (x.detach().cpu().numpy().astype(np.float32),
                    [Block("node_features", 0, units, "node features after the last message-passing block "
                           "(input of the gated readout MLP model.final)")], energy)
        values = torch.cat([s * a, s], dim=1).cpu().numpy().astype(np.float32)
        blocks = [
            Block("gated_hidden", 0, units, "s_i * a_i: last hidden layer of the readout's value branch "
                  "(final.g[:-1]) times the gate (final.sigma)"),
            Block("gate", units, units + 1, "s_i: the readout's sigmoid gate (final.sigma)"),
        ]
        return values, blocks, energy

    def readout(self) -> Readout:
        """``E_i = scale_Z ([w, b] . (s_i a_i, s_i)) + shift_Z``, from ``final.g[-1]`` and ``normalizer``."""
        linear = self.model.final.g[-1].linear
        w = linear.weight.detach().double().cpu().numpy().reshape(-1)
        b = float(linear.bias.detach().double().cpu()[0]) if linear.bias is not None else 0.0
        w = np.concatenate([w, [b]])
        scale = self.model.normalizer.scale.detach().double().cpu().numpy()
        shift = self.model.normalizer.shift.detach().double().cpu().numpy()
        zs = np.arange(1, min(len(scale), 119))
        return species_readout(zs, scale[zs, None] * w[None, :], shift[zs])

    def calculator(self):
        """mattersim's ASE calculator on the same weights."""
        from mattersim.forcefield.potential import MatterSimCalculator

        return MatterSimCalculator(potential=self.potential, device=self.device)
