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

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec, local_checkpoint
from .base import Adapter, file_sha256

#: mattersim's own cache of downloaded checkpoints (``Potential.from_checkpoint``).
CACHE = "~/.local/mattersim/pretrained_models"
#: where mattersim downloads checkpoints from (``mattersim.utils.download_utils``).
ORIGIN = "https://raw.githubusercontent.com/microsoft/mattersim/main/pretrained_models/"


def _cache_file(spec: ModelSpec) -> Path | None:
    """mattersim's cached copy of a ``loader`` entry's checkpoint, if there is one."""
    if spec.source["kind"] != "loader":
        return None
    path = Path(os.path.expanduser(CACHE)) / spec.source["filename"]
    return path if path.is_file() else None


def _checkpoint_path(spec: ModelSpec) -> str:
    """A local ``.pth`` for ``spec``, else mattersim's cached or freshly downloaded copy.

    Raises
    ------
    ModelUnavailable
        When the file is not local and cannot be downloaded (offline), saying where to put it.
    """
    path = local_checkpoint(spec) or _cache_file(spec)
    if path is not None:
        return str(path)
    src = spec.source
    if src["kind"] != "loader":
        raise ModelUnavailable(
            f"model {spec.key}: checkpoint {src.get('path')!r} not found; put it in the checkpoints "
            "folder ($UMLIP_LATENTS_CHECKPOINTS)"
        )
    where = f"the checkpoints folder ($UMLIP_LATENTS_CHECKPOINTS) as {src['filename']!r}"
    try:
        from mattersim.utils.download_utils import download_checkpoint
    except ImportError as exc:
        raise ModelUnavailable(f"model {spec.key}: package mattersim not importable ({exc}); put the file in {where}") from exc
    cache = Path(os.path.expanduser(CACHE))
    try:
        download_checkpoint(src["filename"], save_folder=str(cache))
    except Exception as exc:  # requests raises many kinds of errors offline
        raise ModelUnavailable(
            f"model {spec.key}: mattersim could not download {src['filename']!r} from {ORIGIN} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"download it where there is internet and put it in {where}"
        ) from exc
    return str(cache / src["filename"])


class MattersimAdapter(Adapter):
    """A MatterSim (M3GNet) model from a mattersim ``.pth`` checkpoint."""

    default_batch_atoms = 1000
    default_batch_atoms_gpu = 4000

    def __init__(self, spec: ModelSpec, device: str, potential, path: str):
        super().__init__(spec, device)
        self.potential = potential
        self.model = potential.model.to(device).eval()
        self.path = path
        self.args = dict(self.model.get_model_args())
        final = self.model.final
        if len(final.g) < 2 or not hasattr(final.g[-1], "linear") or final.g[-1].linear.out_features != 1:
            raise NotImplementedError(f"model {spec.key}: readout {type(final).__name__} is not a gated MLP to one output")
        self._sha256 = None

    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> "MattersimAdapter":
        try:
            from mattersim.forcefield.potential import Potential
        except ImportError as exc:
            raise ModelUnavailable(
                f"model {spec.key}: mattersim not importable ({exc}); it runs in environment "
                f"{spec.environment!r} (`make setup`)"
            ) from exc
        path = _checkpoint_path(spec)
        potential = Potential.from_checkpoint(path, device=device, load_training_state=False)
        return cls(spec, device, potential, path)

    @classmethod
    def availability(cls, spec: ModelSpec) -> tuple[bool, str]:
        """Whether mattersim is importable and the checkpoint is on disk (never downloads)."""
        import importlib.util

        if importlib.util.find_spec("mattersim") is None:
            return False, f"package mattersim not importable here; the model runs in environment {spec.environment!r}"
        path = local_checkpoint(spec) or _cache_file(spec)
        if path is not None:
            return True, f"local checkpoint {path}"
        if spec.source["kind"] == "loader":
            return False, f"mattersim downloads {spec.source['filename']!r} on first use (needs internet)"
        return False, f"local checkpoint {spec.source.get('path')!r} not in the checkpoints folder"

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
        weight = np.zeros((119, len(w)))
        bias = np.zeros(119)
        weight[zs] = scale[zs, None] * w[None, :]
        bias[zs] = shift[zs]
        return Readout(weight=weight, bias=bias)

    def calculator(self):
        """mattersim's ASE calculator on the same weights."""
        from mattersim.forcefield.potential import MatterSimCalculator

        return MatterSimCalculator(potential=self.potential, device=self.device)

    def checkpoint_sha256(self) -> str | None:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def versions(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for p in ("mattersim", "torch", "torch-geometric", "torch-runstats", "e3nn"):
            try:
                out[p] = version(p)
            except PackageNotFoundError:
                out[p] = None
        return out


def build_random_mattersim(path: str, seed: int = 0, reference_energies: dict | None = None,
                           scales: dict | None = None, **model_args) -> str:
    """A small randomly initialised MatterSim M3GNet, saved with ``Potential.save`` to ``path``.

    ``model_args`` override M3Gnet's defaults (``num_blocks``, ``units``, ``max_l``, ``max_n``,
    ``cutoff``, ``threebody_cutoff``, ``max_z``). ``reference_energies`` and ``scales`` (per
    atomic number) become the normaliser's per-element shift and scale, so the readout's
    per-element affine map is exercised. Runs in the ``mattersim`` environment; the file is
    read back by mattersim's own ``Potential.from_checkpoint``.
    """
    import torch
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
    from mattersim.forcefield.m3gnet.scaling import AtomScaling
    from mattersim.forcefield.potential import Potential

    torch.manual_seed(seed)
    model = M3Gnet(device="cpu", **model_args)
    max_z = model.max_z
    shift = torch.zeros(max_z + 1)
    scale = torch.ones(max_z + 1)
    for z, e in (reference_energies or {}).items():
        shift[int(z)] = float(e)
    for z, s in (scales or {}).items():
        scale[int(z)] = float(s)
    model.set_normalizer(AtomScaling(init_scale=scale, init_shift=shift, max_z=max_z, device="cpu"))
    model.eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Potential(model, device="cpu").save(str(path))
    return str(path)
