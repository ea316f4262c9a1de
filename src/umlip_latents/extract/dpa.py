"""DPA adapter (deepmd-kit's DPA-3, PyTorch backend), run in the ``dpa`` environment.

It takes any deepmd-kit descriptor + energy-fitting model; DPA-3 is the one registered and tested.

A deepmd-kit energy model (``EnergyModel`` around a ``DPEnergyAtomicModel``) computes per
atom a descriptor ``d_i`` (for DPA-3: the node features after the last ``repflow`` layer,
followed by the type embedding when ``concat_output_tebd``) and feeds it to the fitting
network, an MLP whose last layer is linear with one output::

    h_i = MLP_hidden(d_i)                                  (fitting net up to its last layer)
    E_i = w . h_i + b + bias_atom_e[t_i] + out_bias[t_i]   (t_i: the atom's index in the model's type_map)

Layers
------
``"last"``
    ``h_i``, the last hidden activation of the energy fitting network
    (deepmd's ``atomic_feature``, what ``DeepPot.eval_fitting_last_layer`` returns). The
    readout is the fitting network's own last linear layer plus the per-type biases
    ``bias_atom_e`` (fitting) and ``out_bias`` (atomic model).
``"backbone"``
    ``d_i``, the descriptor output entering the fitting network (deepmd's ``descriptor``,
    what ``DeepPot.eval_descriptor`` returns).

Atom types: deepmd numbers types by their position in the **model's** ``type_map``
(element symbols, in training order, not sorted by atomic number). Every structure is
mapped through that list. Numbering by each structure's own sorted elements (a common
recipe in scripts around ``DeepPot``) silently gives wrong features.

Symmetry: DPA-3 sees only distances and angles, so features and energy are invariant
(to float rounding) under rotation, translation, permutation and supercells.

Forward: one energy-only pass per batch. Structures are padded to the largest one with
virtual atoms (type ``-1``, deepmd's own padding convention, masked out of every
neighbour list); the descriptor, the fitting net's hidden activation and the atomic
energy come from the same call of the atomic model (``forward_atomic`` with
``return_atomic_feature=True``), without the force/virial backward pass.

Checkpoints: a training checkpoint ``.pt`` (multi-task ones, such as DPA-3.1-3M, need the
branch: ``source.head``) or a frozen ``.pth``, both loaded through deepmd's ``DeepPot``.
Registered ``loader`` entries are the names of deepmd-kit's pretrained registry
(``deepmd.pretrained``), downloaded with sha256 verification into deepmd's cache when
online; offline, put ``source.filename`` in the checkpoints folder
(``$UMLIP_LATENTS_CHECKPOINTS``).

Compiled operators: the deepmd-kit wheel ships a custom-op library built for one torch
version (2.11 for deepmd-kit 3.2.0); this project runs torch 2.13, where that library
does not load. DPA-3 inference never calls those operators (they serve model compression
and multi-rank LAMMPS), and deepmd-kit declares them optional
(``deepmd.pt.cxx_op.ENABLE_CUSTOMIZED_OP``); when the library was built for another torch,
:func:`import_deepmd` imports deepmd with ``ENABLE_CUSTOMIZED_OP = False``.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np

from ..errors import ModelUnavailable, StructureError
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, affine_probe, species_readout

TARGET = "energy"


def import_deepmd(device: str = "cpu"):
    """Import ``deepmd.pt`` (PyTorch backend) for this torch, and return the module.

    deepmd's PyTorch backend fixes its device when ``deepmd.pt.utils.env`` is first
    imported (environment variable ``DEVICE``; ``"cpu"`` or else CUDA); it is set from
    ``device`` unless already set. When the wheel's compiled operator library was built
    for another torch version, the module ``deepmd.pt.cxx_op`` is provided with
    ``ENABLE_CUSTOMIZED_OP = False`` instead of loading that library (see the module doc).
    """
    if "deepmd.pt" in sys.modules:
        return sys.modules["deepmd.pt"]
    os.environ.setdefault("DEVICE", "cpu" if device == "cpu" else "cuda")
    import torch
    from deepmd.env import GLOBAL_CONFIG
    from packaging.version import Version

    built_for = GLOBAL_CONFIG.get("pt_version", "")
    if built_for and Version(built_for).public != Version(torch.__version__).public:
        stub = types.ModuleType("deepmd.pt.cxx_op")
        stub.ENABLE_CUSTOMIZED_OP = False
        stub.__all__ = ["ENABLE_CUSTOMIZED_OP"]
        stub.__doc__ = (f"deepmd-kit's custom operators were built for torch {built_for}, not "
                        f"{torch.__version__}: not loaded (umlip_latents.extract.dpa)")
        sys.modules["deepmd.pt.cxx_op"] = stub
    import deepmd.pt

    return deepmd.pt


def _eager(model):
    """The eager deepmd model of a TorchScript one (a frozen ``.pth``): same config, same weights."""
    import json

    import torch

    if not isinstance(model, torch.jit.ScriptModule):
        return model
    from deepmd.pt.model.model import get_model

    eager = get_model(json.loads(model.get_model_def_script()))
    eager.load_state_dict(model.state_dict())
    return eager


class DpaAdapter(Adapter):
    """A deepmd-kit energy model (DPA-3 ...) from a ``.pt`` checkpoint (one branch) or frozen ``.pth``."""


    def __init__(self, spec: ModelSpec, device: str, deep_pot, path: str):
        from ase.data import atomic_numbers

        super().__init__(spec, device, path)
        self.deep_pot = deep_pot
        self.model = _eager(deep_pot.deep_eval.dp.model["Default"]).to(device).eval()
        self.atomic_model = self.model.atomic_model
        self.type_map = list(self.model.get_type_map())
        unknown = [s for s in self.type_map if s not in atomic_numbers]
        if unknown:
            raise ModelUnavailable(f"model {spec.key}: type_map entries {unknown} are not element symbols")
        #: atomic number -> deepmd type index, from the model's own type_map
        self.type_of = np.full(119, -1, dtype=np.int64)
        for index, symbol in enumerate(self.type_map):
            self.type_of[atomic_numbers[symbol]] = index
        descriptor = self.atomic_model.descriptor
        self.dim_descriptor = int(descriptor.get_dim_out())
        concat_tebd = getattr(descriptor, "concat_output_tebd", False)
        self.dim_tebd = int(getattr(descriptor, "tebd_dim", 0)) if concat_tebd else 0

    @classmethod
    def cached_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """deepmd-kit's pretrained-model cache (``deepmd.pretrained.download.DEFAULT_CACHE_DIR``)."""
        from deepmd.pretrained.download import DEFAULT_CACHE_DIR

        path = Path(DEFAULT_CACHE_DIR) / spec.source["filename"]
        return path if path.is_file() else None

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        """deepmd's ``resolve_model_path`` (downloads with sha256 verification); never with HF_HUB_OFFLINE=1."""
        from deepmd.pretrained.download import resolve_model_path

        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelUnavailable(
                f"model {spec.key}: {spec.source['filename']!r} is not in deepmd's cache and HF_HUB_OFFLINE=1 "
                f"forbids downloading it; download it where there is internet (`dp pretrained download "
                f"{spec.source['name']}`) and put it in {cls._where(spec)}")
        return str(resolve_model_path(spec.source["name"]))

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "DpaAdapter":
        import_deepmd(device)
        from deepmd.infer import DeepPot

        head = spec.source.get("head")
        try:
            # eager (no TorchScript) so the atomic model's methods can be called directly
            deep_pot = DeepPot(path, head=head, no_jit=True, auto_batch_size=False)
        except AssertionError as exc:  # deepmd asserts a valid head for multi-task checkpoints
            raise ModelUnavailable(f"model {spec.key}: {path} with head {head!r}: {exc}") from exc
        return cls(spec, device, deep_pot, path)

    @property
    def supported_elements(self) -> set[int]:
        return set(int(z) for z in np.nonzero(self.type_of >= 0)[0])

    def atom_types(self, atoms) -> np.ndarray:
        """deepmd type indices of ``atoms``: positions of their elements in the model's ``type_map``."""
        types_ = self.type_of[np.asarray(atoms.numbers, dtype=np.int64)]
        if (types_ < 0).any():
            missing = sorted(set(atoms.numbers[types_ < 0].tolist()))
            raise ValueError(f"model {self.spec.key}: atomic number(s) {missing} not in the model's type_map")
        return types_

    def _pass(self, structures: list, periodic: bool) -> tuple[dict, np.ndarray]:
        """One padded pass of the atomic model: descriptor, hidden activation, atomic energy."""
        import torch
        from deepmd.pt.utils.nlist import extend_input_and_build_neighbor_list

        model, am = self.model, self.atomic_model
        nf, nmax = len(structures), max(len(a) for a in structures)
        coord = np.zeros((nf, nmax, 3))
        atype = np.full((nf, nmax), -1, dtype=np.int64)  # -1: deepmd's virtual (padding) atom
        box = np.zeros((nf, 3, 3))
        for k, atoms in enumerate(structures):
            coord[k, :len(atoms)] = atoms.positions
            atype[k, :len(atoms)] = self.atom_types(atoms)
            box[k] = atoms.cell.array
        real = torch.from_numpy(atype >= 0).to(self.device)
        coord_t = torch.tensor(coord, dtype=torch.float64, device=self.device)
        atype_t = torch.tensor(atype, dtype=torch.long, device=self.device)
        box_t = torch.tensor(box, dtype=torch.float64, device=self.device) if periodic else None
        with torch.no_grad():
            ext_coord, ext_atype, mapping, nlist = extend_input_and_build_neighbor_list(
                coord_t, atype_t, model.get_rcut(), model.get_sel(), mixed_types=True, box=box_t)
            ext_coord = ext_coord.view(nf, -1, 3)
            nlist = model.format_nlist(ext_coord, ext_atype, nlist)
            ext_mask = am.make_atom_mask(ext_atype)
            out = am.forward_atomic(ext_coord, torch.where(ext_mask, ext_atype, 0), nlist, mapping=mapping,
                                    return_atomic_feature=True)
            out = am.apply_out_stat({TARGET: out[TARGET], "descriptor": out["descriptor"],
                                     "atomic_feature": out["atomic_feature"]}, atype_t)
        return {k: v[real].detach().double().cpu().numpy() for k, v in out.items()}, atype

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass (one per kind of boundary: fully periodic or open).

        Returns
        -------
        values : ndarray (n_atoms, D), float32
            "last": the fitting net's last hidden activation; "backbone": the descriptor.
        blocks : list of Block
        energy : ndarray (n_structures,)
            The model's total energy of the same pass (eV).
        """
        self._check_supported()
        periodic = []
        for i, atoms in enumerate(structures):
            if atoms.pbc.any() and not atoms.pbc.all():
                sid = atoms.info.get("structure_id", f"#{i}")
                raise StructureError(f"structure {sid}: deepmd-kit takes fully periodic or open structures, "
                                     f"not pbc={atoms.pbc.tolist()}")
            periodic.append(bool(atoms.pbc.all()))
        key = "atomic_feature" if layer == "last" else "descriptor"
        n = np.array([len(a) for a in structures])
        starts = np.concatenate([[0], np.cumsum(n)])
        values = None
        energy = np.zeros(len(structures))
        for flag in (True, False):
            idx = [i for i, p in enumerate(periodic) if p == flag]
            if not idx:
                continue
            out, _ = self._pass([structures[i] for i in idx], flag)
            if values is None:
                values = np.zeros((int(n.sum()), out[key].shape[1]))
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
            values[rows] = out[key]
            sub_n = n[idx]
            energy[idx] = np.bincount(np.repeat(np.arange(len(idx)), sub_n), out[TARGET].reshape(-1),
                                      minlength=len(idx))
        dim = values.shape[1]
        if layer == "last":
            blocks = [Block("fitting_last_hidden", 0, dim,
                            "energy fitting net, activation of its last hidden layer (deepmd atomic_feature)")]
        elif self.dim_tebd:
            blocks = [Block("descriptor_node", 0, dim - self.dim_tebd, "descriptor: node features of the last layer"),
                      Block("descriptor_type_embedding", dim - self.dim_tebd, dim,
                            "descriptor: type embedding (concat_output_tebd)")]
        else:
            blocks = [Block("descriptor", 0, dim, "descriptor output entering the fitting net (deepmd descriptor)")]
        return values.astype(np.float32), blocks, energy

    def _check_supported(self) -> None:
        """Refuse models whose atomic energy is not ``w . h_i + b + bias[t_i]`` of one MLP."""
        am = self.atomic_model
        fitting = getattr(am, "fitting_net", None)
        problems = []
        if fitting is None or not hasattr(am, "descriptor"):
            problems.append(f"atomic model {type(am).__name__} is not a descriptor + fitting model (ZBL/linear mix?)")
        else:
            if not getattr(fitting, "mixed_types", False):
                problems.append("the fitting net has one network per type (mixed_types false)")
            if getattr(fitting, "remove_vaccum_contribution", None) is not None:
                problems.append("the fitting net subtracts a vacuum contribution (atom_ener)")
            if getattr(fitting, "numb_fparam", 0) or getattr(fitting, "numb_aparam", 0):
                problems.append("the fitting net takes frame/atomic parameters")
            if getattr(fitting, "var_name", TARGET) != TARGET or fitting.get_task_dim() != 1:
                problems.append("the fitting net is not a scalar energy fitting")
        if getattr(am, "pair_excl", None) is not None or getattr(am, "atom_excl", None) is not None:
            problems.append("the model excludes atom or pair types")
        if TARGET not in getattr(am, "bias_keys", [TARGET]):
            problems.append(f"the atomic model has no {TARGET!r} output bias")
        if problems:
            raise NotImplementedError(f"model {self.spec.key}: " + "; ".join(problems))

    def readout(self) -> Readout:
        """``E_i = w . h_i + b + bias_atom_e[t] + out_bias[t]`` for the element of type ``t``.

        ``w`` and ``b`` are read off the fitting network's last layer (the model's own
        module, probed with unit vectors); the per-type biases from the fitting net's
        ``bias_atom_e`` and the atomic model's ``out_bias``, placed at the atomic number of
        each ``type_map`` entry.
        """
        import torch

        self._check_supported()
        am = self.atomic_model
        net = am.fitting_net.filter_layers.networks[0]
        last = net.layers[-1]
        dim = int(am.fitting_net.neuron[-1]) if am.fitting_net.neuron else self.dim_descriptor
        dtype = next(last.parameters()).dtype
        w, b = affine_probe(lambda x: last(x).reshape(-1), dim, dtype, self.device)
        out_bias = self.model.get_out_bias()[am.bias_keys.index(TARGET), :, 0]
        per_type = am.fitting_net.bias_atom_e[:, 0].to(torch.float64) + out_bias.to(torch.float64)
        per_type = per_type.detach().cpu().numpy()
        zs = np.nonzero(self.type_of >= 0)[0]
        return species_readout(zs, w, b + per_type[self.type_of[zs]])

    def calculator(self):
        """deepmd-kit's ASE calculator on the same file and head."""
        from deepmd.calculator import DP

        return DP(self.path, head=self.spec.source.get("head"))

    def extra_versions(self) -> dict:
        return {"deepmd_custom_ops": bool(getattr(sys.modules.get("deepmd.pt.cxx_op"), "ENABLE_CUSTOMIZED_OP", False))}
