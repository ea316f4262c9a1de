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
from ..registry import ModelSpec
from .base import Adapter, species_readout

TASKS = ("omat", "omol", "oc20", "odac", "omc")


def _task(spec: ModelSpec) -> str:
    task = (spec.options or {}).get("task") or spec.source.get("task")
    if not task:
        raise ModelUnavailable(f"model {spec.key}: a UMA entry needs options.task (one of {', '.join(TASKS)})")
    return str(task)


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


    def __init__(self, spec: ModelSpec, device: str, unit, path: str):
        import torch

        super().__init__(spec, device, path)
        self.task = _task(spec)
        self.unit = unit
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

    def _hook(self, name):
        def hook(module, inputs, output):
            self._captured[name] = inputs[0].detach()

        return hook

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        """fairchem's download of the registered name (needs internet and access to the gated repository)."""
        from fairchem.core.calculate.pretrained_mlip import pretrained_checkpoint_path_from_name

        return pretrained_checkpoint_path_from_name(spec.source["name"])

    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> "UmaAdapter":
        _task(spec)  # before any work: an entry without a task is a registry error
        return super().load(spec, device)

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "UmaAdapter":
        from fairchem.core.units.mlip_unit import load_predict_unit
        from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

        settings = InferenceSettings(tf32=False, activation_checkpointing=False, merge_mole=False, compile=False,
                                     external_graph_gen=False, auto_add_default_untrained_tasks=False)
        overrides = {"backbone": {"regress_forces": False, "regress_stress": False}}
        unit = load_predict_unit(path, inference_settings=settings, overrides=overrides,
                                 device="cuda" if device.startswith("cuda") else "cpu")
        return cls(spec, device, unit, path)

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
        zs = np.array(sorted(self.supported_elements))
        bias = np.full(len(zs), rmsd * b)
        if task.element_references is not None:
            bias += task.element_references.element_references.detach().double().cpu().numpy()[zs]
        return species_readout(zs, rmsd * w, bias)

    def calculator(self):
        """fairchem's ``FAIRChemCalculator`` on the same file and task (energy, forces, stress)."""
        from fairchem.core import FAIRChemCalculator
        from fairchem.core.units.mlip_unit import load_predict_unit

        unit = load_predict_unit(self.path, inference_settings="batch",
                                 device="cuda" if self.device.startswith("cuda") else "cpu")
        return FAIRChemCalculator(unit, task_name=self.task)

    def extra_versions(self) -> dict:
        return {"uma_task": self.task}
