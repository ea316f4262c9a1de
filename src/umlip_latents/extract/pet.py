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
metatrain ``.ckpt`` (what upet downloads), found by
:func:`umlip_latents.registry.local_checkpoint`; ``loader`` entries are otherwise fetched
with upet's loader (``lab-cosmo/upet`` on Hugging Face), which needs internet.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec, local_checkpoint
from .base import Adapter, file_sha256

LAST_OUTPUT = "mtt::aux::energy_last_layer_features"
BACKBONE_OUTPUTS = ("features", "feature")  # metatomic's standard name, metatrain PET's name
TARGET = "energy"


def _checkpoint_path(spec: ModelSpec) -> str:
    """A local ``.pt``/``.ckpt`` for ``spec``, else (``loader``) upet's download of it.

    Raises
    ------
    ModelUnavailable
        When the file is not local and cannot be downloaded (offline), saying where to put it.
    """
    path = local_checkpoint(spec)
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
        from upet._models import _resolve_and_download_checkpoint

        return _resolve_and_download_checkpoint(src["name"], src.get("size"), src.get("version"))[2]
    except ImportError as exc:
        raise ModelUnavailable(f"model {spec.key}: package upet not importable ({exc}); put the file in {where}") from exc
    except Exception as exc:  # huggingface_hub raises many kinds of errors offline
        raise ModelUnavailable(
            f"model {spec.key}: upet could not download {src['filename']!r} from the Hugging Face repository "
            f"lab-cosmo/upet ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"download it where there is internet and put it in {where}"
        ) from exc


def _load_module(path: str):
    """The PET ``torch.nn.Module`` of a ``.pt`` (TorchScript) or ``.ckpt`` (eager) file."""
    if path.endswith(".ckpt"):
        from metatrain.utils.io import load_model

        model = load_model(path)
        return model, model.requested_neighbor_lists()
    from metatomic.torch import load_atomistic_model

    atomistic = load_atomistic_model(path)
    return atomistic.module, atomistic.requested_neighbor_lists()


class PetAdapter(Adapter):
    """A PET model from a metatomic ``.pt`` or metatrain ``.ckpt`` file."""

    default_batch_atoms = 1000
    default_batch_atoms_gpu = 4000

    def __init__(self, spec: ModelSpec, device: str, module, neighbor_lists, path: str):
        import torch

        super().__init__(spec, device)
        self.module = module.to(device).eval()
        self.neighbor_lists = neighbor_lists
        self.path = path
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
        self._sha256 = None

    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> "PetAdapter":
        try:
            import metatomic.torch  # noqa: F401
            import metatrain  # noqa: F401
        except ImportError as exc:
            raise ModelUnavailable(
                f"model {spec.key}: metatrain/metatomic not importable ({exc}); it runs in environment "
                f"{spec.environment!r} (`make setup`)"
            ) from exc
        path = _checkpoint_path(spec)
        module, nls = _load_module(path)
        return cls(spec, device, module, nls, path)

    @classmethod
    def availability(cls, spec: ModelSpec) -> tuple[bool, str]:
        """Whether metatrain is importable and the checkpoint is on disk (never downloads)."""
        import importlib.util

        if importlib.util.find_spec("metatrain") is None:
            return False, f"package metatrain not importable here; the model runs in environment {spec.environment!r}"
        path = local_checkpoint(spec)
        if path is not None:
            return True, f"local checkpoint {path}"
        if spec.source["kind"] == "loader":
            return False, f"upet downloads {spec.source['filename']!r} on first use (needs internet)"
        return False, f"local checkpoint {spec.source.get('path')!r} not in the checkpoints folder"

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
        zs = np.array(self.types)
        weight = np.zeros((119, len(w)))
        bias = np.zeros(119)
        weight[zs] = scale[:, None] * w[None, :]
        bias[zs] = scale * b_node + shift
        return Readout(weight=weight, bias=bias)

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

    def checkpoint_sha256(self) -> str | None:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def versions(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for p in ("metatrain", "metatomic-torch", "metatensor-torch", "upet", "torch"):
            try:
                out[p] = version(p)
            except PackageNotFoundError:
                out[p] = None
        return out


def _silu1() -> float:
    """SiLU(1) = 1 / (1 + e^-1)."""
    return 1.0 / (1.0 + np.exp(-1.0))


def build_random_pet(path: str, atomic_types: list[int], seed: int = 0, reference_energies: dict | None = None,
                     **hypers) -> str:
    """A small randomly initialised PET (metatrain defaults overridden by ``hypers``), exported to ``path``.

    ``reference_energies`` (eV per atom of each type) become the composition model's fixed
    weights so the readout's per-element shift is exercised; the scaler keeps scale 1.
    Runs in the ``pet`` environment.
    """
    import torch
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info

    torch.manual_seed(seed)
    model_hypers = get_default_hypers("pet")["model"]
    model_hypers.update(hypers)
    info = DatasetInfo(length_unit="Angstrom", atomic_types=list(atomic_types),
                       targets={TARGET: get_energy_target_info(TARGET, {"quantity": "energy", "unit": "eV"})})
    model = PET(model_hypers, info)
    if reference_energies:
        model.additive_models[0].model.fit(fixed_weights={TARGET: {int(z): float(e) for z, e in reference_energies.items()}})
        model.additive_models[0].sync_tensor_maps()
    model.eval()
    model.export().save(str(path))
    return str(path)
