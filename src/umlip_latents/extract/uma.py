"""UMA adapter (fairchem-core's Universal Models for Atoms), run in the ``uma`` environment.

A UMA model is fairchem's ``HydraModel``: an eSCN-MD backbone with mixture-of-linear-experts
(MoLE, ``eSCNMDMoeBackbone``) and, for UMA-S-1.1, one energy head shared by every task
(``DatasetSpecificSingleHeadWrapper`` around ``MLP_EFS_Head``). The *task* ("omat", "omol",
"oc20", "odac", "omc": the DFT setting of one training set) enters the backbone only: it
picks the dataset embedding that is added to every node's initial features and, with the
system's composition, charge and spin, the MoLE expert mixture. Each task has its own
energy normaliser and per-element reference energies::

    x_i   = node_embedding[i, l=0]                       (backbone output, C channels)
    h_i   = SiLU(W_2 SiLU(W_1 x_i + b_1) + b_2)           (energy head MLP, H channels)
    E_i   = r_t (w . h_i + b) + m_t / n + c_t[Z_i]         (normaliser, element references)
    E     = sum_i E_i

Layers
------
``"last"``
    ``h_i``: the input of the energy head's final ``Linear`` (the last hidden layer of the
    head MLP). The readout is exact: ``W[Z] = r_t w``, ``b[Z] = r_t b + c_t[Z]`` (a
    normaliser with a non-zero mean would add a per-structure constant;
    :meth:`UmaAdapter.readout` refuses such a task).
``"backbone"``
    ``x_i``: the invariant (l=0) channels of the backbone's final node embedding, i.e. the
    input of the energy head.

Both depend on the task: the same atoms give different features under "omat" and "omol".
Symmetry: the backbone is SO(3)-equivariant, so the l=0 features and the energy are
invariant under rotation (to float32 rounding), translation, permutation and supercells.

The task comes from ``spec.options["task"]``. Charge and spin (used by the "omol" task)
come from ``atoms.info["charge"]``/``["spin"]`` with fairchem's defaults (charge 0; spin 1
for "omol", 0 otherwise), set by the model's own ``validate_atoms_data``.

The forward pass is energy-only: the model is loaded with fairchem's official loader
(:func:`fairchem.core.units.mlip_unit.load_predict_unit`, unmerged MoLE, no compile) with
force and stress regression switched off, and run directly (fairchem's predict unit would
replace an isolated single atom by a DFT lookup table, which the features could not
reproduce).

Checkpoints: a local file found by :func:`umlip_latents.registry.local_checkpoint`
(``source.filename``, e.g. ``uma-s-1p1.pt``), else fairchem's download of the registered
name from the Hugging Face repository ``facebook/UMA``, which needs internet and an account
that accepted the UMA licence (the repository is gated).
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec, local_checkpoint
from .base import Adapter, file_sha256

TASKS = ("omat", "omol", "oc20", "odac", "omc")


def _task(spec: ModelSpec) -> str:
    task = (spec.options or {}).get("task") or spec.source.get("task")
    if not task:
        raise ModelUnavailable(f"model {spec.key}: a UMA entry needs options.task (one of {', '.join(TASKS)})")
    return str(task)


def _checkpoint_path(spec: ModelSpec) -> str:
    """A local checkpoint for ``spec``, else (``loader``) fairchem's download of it.

    Raises
    ------
    ModelUnavailable
        When the file is not local and cannot be downloaded (offline, or no access to the
        gated repository), saying where to put it.
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
        from fairchem.core.calculate.pretrained_mlip import pretrained_checkpoint_path_from_name
    except ImportError as exc:
        raise ModelUnavailable(
            f"model {spec.key}: package fairchem-core not importable ({exc}); put the file in {where}"
        ) from exc
    try:
        return pretrained_checkpoint_path_from_name(src["name"])
    except Exception as exc:  # huggingface_hub raises many kinds of errors offline / without access
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelUnavailable(
            f"model {spec.key}: fairchem could not download {src['filename']!r} from the Hugging Face "
            f"repository facebook/UMA ({type(exc).__name__}: {first}); the repository is gated: accept the "
            f"UMA licence and log in (`hf auth login`) where there is internet, or download the file and put "
            f"it in {where}"
        ) from exc


def _find_energy_head(model):
    """The one ``MLP_EFS_Head`` (or subclass) of the model, bare or inside a dataset wrapper."""
    from fairchem.core.models.uma.escn_md import MLP_EFS_Head

    heads = [m for m in model.output_heads.modules() if isinstance(m, MLP_EFS_Head)]
    if len(heads) != 1:
        raise NotImplementedError(
            f"expected one UMA energy head (MLP_EFS_Head), found {len(heads)}: "
            f"{[type(h).__name__ for h in model.output_heads.values()]}"
        )
    return heads[0]


class UmaAdapter(Adapter):
    """One task head of a UMA checkpoint (fairchem ``MLIPInferenceCheckpoint``)."""

    default_batch_atoms = 1000
    default_batch_atoms_gpu = 4000

    def __init__(self, spec: ModelSpec, device: str, unit, path: str):
        import torch

        super().__init__(spec, device)
        self.task = _task(spec)
        self.unit = unit
        self.path = path
        self.model = unit.model.module  # the HydraModel inside fairchem's EMA wrapper
        datasets = unit.dataset_to_tasks
        if self.task not in datasets:
            raise ModelUnavailable(
                f"model {spec.key}: task {self.task!r} not in the checkpoint (it has {sorted(datasets)})"
            )
        energy = [t for t in datasets[self.task] if t.property == "energy" and t.level == "system"]
        if len(energy) != 1:
            raise NotImplementedError(f"model {spec.key}: {len(energy)} energy tasks for dataset {self.task!r}")
        self.energy_task = energy[0]
        self.head = _find_energy_head(self.model)
        if self.head.reduce != "sum":
            raise NotImplementedError(f"model {spec.key}: energy head reduces with {self.head.reduce!r}, not 'sum'")
        self.final = self.head.energy_block[-1]
        if not isinstance(self.final, torch.nn.Linear):
            raise NotImplementedError(
                f"model {spec.key}: the energy head's last layer is {type(self.final).__name__}, not Linear"
            )
        self.dtype = unit.inference_settings.base_precision_dtype
        self._captured = {}
        self.head.energy_block.register_forward_hook(self._hook("backbone"))
        self.final.register_forward_hook(self._hook("last"))
        self._prepared = False
        self._sha256 = None

    def _hook(self, name):
        def hook(module, inputs, output):
            self._captured[name] = inputs[0].detach()

        return hook

    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> "UmaAdapter":
        try:
            from fairchem.core.units.mlip_unit import load_predict_unit
            from fairchem.core.units.mlip_unit.api.inference import InferenceSettings
        except ImportError as exc:
            raise ModelUnavailable(
                f"model {spec.key}: fairchem-core not importable ({exc}); it runs in environment "
                f"{spec.environment!r} (`make setup`)"
            ) from exc
        _task(spec)
        path = _checkpoint_path(spec)
        settings = InferenceSettings(tf32=False, activation_checkpointing=False, merge_mole=False, compile=False,
                                     external_graph_gen=False, auto_add_default_untrained_tasks=False)
        overrides = {"backbone": {"regress_forces": False, "regress_stress": False}}
        unit = load_predict_unit(path, inference_settings=settings, overrides=overrides,
                                 device="cuda" if device.startswith("cuda") else "cpu")
        return cls(spec, device, unit, path)

    @classmethod
    def availability(cls, spec: ModelSpec) -> tuple[bool, str]:
        """Whether fairchem-core is importable and the checkpoint is on disk (never downloads)."""
        import importlib.util

        if importlib.util.find_spec("fairchem") is None:
            return False, f"package fairchem-core not importable here; the model runs in environment {spec.environment!r}"
        path = local_checkpoint(spec)
        if path is not None:
            return True, f"local checkpoint {path}"
        if spec.source["kind"] == "loader":
            return False, (f"fairchem downloads {spec.source['filename']!r} from the gated Hugging Face repository "
                           "facebook/UMA on first use (needs internet and accepted licence)")
        return False, f"local checkpoint {spec.source.get('path')!r} not in the checkpoints folder"

    @property
    def supported_elements(self) -> set[int]:
        refs = self.energy_task.element_references
        n = self.model.backbone.max_num_elements
        if refs is not None:
            n = min(n, len(refs.element_references))
        return set(range(1, n))

    def _batch(self, structures: list):
        from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch

        data = []
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = None
            self.unit.validate_atoms_data(atoms, self.task)  # charge/spin defaults (omol: spin 1)
            data.append(AtomicData.from_ase(atoms, task_name=self.task, r_edges=False, radius=6.0,
                                            r_data_keys=["spin", "charge"], target_dtype=self.dtype))
        return atomicdata_list_to_batch(data)

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass of the task's energy output.

        Returns
        -------
        values : ndarray (n_atoms, D), float32
            "last": the energy head's last hidden layer ``h_i``; "backbone": the l=0 node
            embedding ``x_i`` entering the head.
        blocks : list of Block
        energy : ndarray (n_structures,)
            The model's total energy of the same pass (eV): normalised head output times the
            task's rmsd plus its element references.
        """
        import torch

        batch = self._batch(structures)
        if not self._prepared:  # what fairchem's predict unit does on its first call
            self.model.prepare_for_inference(batch.clone(), self.unit.inference_settings)
            self.unit.model.requires_grad_(False)
            self.unit.model.to(self.dtype)
            self.unit.move_to_device()
            self._prepared = True
        batch = batch.to(self.unit.device)
        self._captured.clear()
        with torch.no_grad():
            out = self.model(batch)
            task = self.energy_task
            e = task.normalizer.denorm(out[task.name][task.property])
            if task.element_references is not None:
                e = task.element_references.undo_refs(batch, e)
        energy = e.detach().double().cpu().numpy().reshape(-1)
        x = self._captured["last" if layer == "last" else "backbone"].double().cpu().numpy()
        if layer == "last":
            block = Block("energy_head_hidden", 0, x.shape[1],
                          f"input of the energy head's final Linear (task {self.task!r}; last hidden layer of the MLP)")
        else:
            block = Block("node_embedding_l0", 0, x.shape[1],
                          f"l=0 channels of the backbone's final node embedding (task {self.task!r}), energy head input")
        return x.astype(np.float32), [block], energy

    def readout(self) -> Readout:
        """``E_i = r_t (w . h_i + b) + c_t[Z_i]`` from the head's final Linear and the task's normaliser/references."""
        task = self.energy_task
        mean = float(task.normalizer.mean)
        if mean != 0.0:
            raise NotImplementedError(
                f"model {self.spec.key}: task {task.name!r} has normaliser mean {mean}, a per-structure constant "
                "that is not a per-atom readout"
            )
        rmsd = float(task.normalizer.rmsd)
        w = self.final.weight.detach().double().cpu().numpy().reshape(-1)
        b = float(self.final.bias.detach().double().cpu().numpy().reshape(-1)[0]) if self.final.bias is not None else 0.0
        weight = np.zeros((119, len(w)))
        bias = np.zeros(119)
        zs = np.array(sorted(self.supported_elements))
        weight[zs] = rmsd * w[None, :]
        bias[zs] = rmsd * b
        if task.element_references is not None:
            refs = task.element_references.element_references.detach().double().cpu().numpy()
            bias[zs] += refs[zs]
        return Readout(weight=weight, bias=bias)

    def calculator(self):
        """fairchem's ``FAIRChemCalculator`` on the same file and task (energy, forces, stress)."""
        from fairchem.core import FAIRChemCalculator
        from fairchem.core.units.mlip_unit import load_predict_unit

        unit = load_predict_unit(self.path, inference_settings="batch",
                                 device="cuda" if self.device.startswith("cuda") else "cpu")
        return FAIRChemCalculator(unit, task_name=self.task)

    def checkpoint_sha256(self) -> str | None:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def versions(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for p in ("fairchem-core", "e3nn", "torch"):
            try:
                out[p] = version(p)
            except PackageNotFoundError:
                out[p] = None
        out["uma_task"] = self.task
        return out


def build_random_uma(path: str, seed: int = 0, tasks: tuple = TASKS, reference_energies: dict | None = None,
                     rmsd: float = 1.423, **backbone) -> str:
    """A small randomly initialised UMA (UMA-S-1.1 layout), saved as a fairchem inference checkpoint.

    The layout is UMA-S-1.1's: ``eSCNMDMoeBackbone`` (MoLE, composition embedding, dataset
    embedding, ``model_version`` 1.1), one ``MLP_EFS_Head`` shared by the tasks through
    ``DatasetSpecificSingleHeadWrapper``, and per task an energy, forces and stress task with
    a normaliser (mean 0, ``rmsd``; 1.423 in fairchem's UMA training configs) and per-element
    references. ``backbone`` overrides the (small) defaults;
    ``reference_energies`` maps each task to ``{Z: eV}`` (other elements 0); the EMA weights
    equal the weights. The file loads with fairchem's ``load_predict_unit``.
    """
    import torch
    from fairchem.core.models.base import HydraModel
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    torch.manual_seed(seed)
    tasks = list(tasks)
    bb = dict(model="fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone", max_num_elements=100,
              sphere_channels=16, lmax=2, mmax=2, otf_graph=True, max_neighbors=300, use_pbc=True,
              use_pbc_single=True, cutoff=6.0, edge_channels=16, distance_function="gaussian",
              num_distance_basis=16, regress_forces=True, regress_stress=True, direct_forces=False,
              num_layers=2, hidden_channels=16, norm_type="rms_norm_sh", act_type="gate", ff_type="spectral",
              chg_spin_emb_type="rand_emb", cs_emb_grad=True, dataset_emb_grad=True, dataset_list=tasks,
              use_dataset_embedding=True, num_experts=4, moe_dropout=0.0, use_composition_embedding=True,
              moe_layer_type="pytorch", model_version=1.1)
    bb.update(backbone)
    heads = {"energyandforcehead": {
        "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificSingleHeadWrapper",
        "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
        "head_kwargs": {"wrap_property": False},
        "dataset_names": tasks,
    }}
    model_config = {"_target_": "fairchem.core.models.base.HydraModel", "backbone": bb, "heads": heads,
                    "pass_through_head_outputs": True, "otf_graph": True}
    cfg = {k: v for k, v in model_config.items() if k != "_target_"}
    model = HydraModel(**cfg)
    ema = torch.optim.swa_utils.AveragedModel(model)

    def norm():
        return {"_target_": "fairchem.core.modules.normalization.normalizer.Normalizer", "mean": 0.0, "rmsd": rmsd}

    tasks_config = []
    for t in tasks:
        refs = [0.0] * bb["max_num_elements"]
        for z, e in ((reference_energies or {}).get(t) or {}).items():
            refs[int(z)] = float(e)
        tasks_config.append({
            "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task", "name": f"{t}_energy", "level": "system",
            "property": "energy", "out_spec": {"dim": [1], "dtype": "float32"}, "normalizer": norm(),
            "element_references": {
                "_target_": "fairchem.core.modules.normalization.element_references.ElementReferences",
                "element_references": {"_target_": "torch.DoubleTensor", "_args_": [refs]},
            },
            "datasets": [t], "metrics": ["mae", "per_atom_mae"],
        })
        for prop, level, dim in (("forces", "atom", [3]), ("stress", "system", [1, 9])):
            tasks_config.append({
                "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task", "name": f"{t}_{prop}", "level": level,
                "property": prop, "out_spec": {"dim": dim, "dtype": "float32"}, "normalizer": norm(),
                "datasets": [t], "metrics": ["mae"],
            })
    ckpt = MLIPInferenceCheckpoint(model_config=model_config, model_state_dict=model.state_dict(),
                                   ema_state_dict=ema.state_dict(), tasks_config=tasks_config)
    torch.save(ckpt, str(path))
    return str(path)
