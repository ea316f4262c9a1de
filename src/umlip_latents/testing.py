"""Small models for tests, built with each family's own classes: never imported by production code.

Two kinds of helpers:

- ``build_random_<family>(path, ...)``: a randomly initialised model of the family's own
  architecture saved in the family's own file format, run in the family's environment;
- :data:`CONTRACT_MODELS` and :func:`contract_model`: for every family of the table, the small
  model the family contract test (``tests/test_family_contract.py``) runs, built once in the
  family's environment and cached in a folder (keyed on its recipe).

A new family adds its row to :data:`CONTRACT_MODELS` (or its table row says nothing and the
contract test fails, naming the family).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from .families import environment_python, get_family
from .registry import ModelSpec

#: UMA tasks of UMA-S-1.1 (fairchem's dataset names)
UMA_TASKS = ("omat", "omol", "oc20", "odac", "omc")
#: elements of the test crystals (Si, Na, Cl, Cu, Mg, O) and a few more
_TYPES = [1, 3, 8, 11, 12, 14, 17, 29]
#: type map not sorted by atomic number (nor alphabetically): DPA must map through it
DPA_TYPE_MAP = ["O", "H", "Si", "Na", "Cl", "Cu", "Mg", "Li"]


def build_random_pet(path: str, atomic_types: list[int], seed: int = 0, reference_energies: dict | None = None,
                     scale: float | None = None, llpr: bool = False, non_conservative: bool = False,
                     **hypers) -> dict:
    """A randomly initialised PET (metatrain defaults overridden by ``hypers``), saved to ``path``.

    ``reference_energies`` (eV per atom of each type) become the composition model's fixed
    weights so the readout's per-element shift is exercised; ``scale`` the scaler's fixed
    energy scale (default 1; metatrain has one per target for a per-structure energy). With ``non_conservative``, the model also has
    the direct force and stress heads most uPET releases carry (targets
    ``non_conservative_forces`` and ``non_conservative_stress``). With ``llpr``, the PET is
    wrapped in metatrain's ``LLPRUncertaintyModel``, the layout PET-MAD v1.0.2 is released in.
    A ``.ckpt`` path gets the metatrain checkpoint (``get_checkpoint``, what upet downloads),
    any other the exported metatomic model. Runs in the ``pet`` environment.

    Returns the PET's (not the wrapper's) parameter count, readout layers and ``d_head``.
    """
    import torch
    from metatrain.llpr import LLPRUncertaintyModel
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info, get_generic_target_info

    from .extract.pet import TARGET

    torch.manual_seed(seed)
    model_hypers = get_default_hypers("pet")["model"]
    model_hypers.update(hypers)
    targets = {TARGET: get_energy_target_info(TARGET, {"quantity": "energy", "unit": "eV"})}
    if non_conservative:
        for name, quantity, unit, rank, kind in (("non_conservative_forces", "force", "eV/A", 1, "atom"),
                                                 ("non_conservative_stress", "stress", "eV/A^3", 2, "system")):
            layout = {"quantity": quantity, "unit": unit, "num_subtargets": 1,
                      "type": {"cartesian": {"rank": rank}}, "sample_kind": kind}
            targets[name] = get_generic_target_info(name, layout)
    info = DatasetInfo(length_unit="Angstrom", atomic_types=list(atomic_types), targets=targets)
    model = PET(model_hypers, info)
    if reference_energies:
        weights = {TARGET: {int(z): float(e) for z, e in reference_energies.items()}}
        model.additive_models[0].model.fit(fixed_weights=weights, targets_to_fit=[TARGET])
        model.additive_models[0].sync_tensor_maps()
    if scale is not None:
        model.scaler.model.fit(fixed_weights={TARGET: float(scale)}, targets_to_fit=[TARGET])
        model.scaler.sync_tensor_maps()
    built = {"parameters": sum(p.numel() for p in model.parameters()),
             "readout_layers": int(model.num_readout_layers), "d_head": int(model.hypers["d_head"])}
    if llpr:
        wrapper = LLPRUncertaintyModel(get_default_hypers("llpr")["model"], info)
        wrapper.set_wrapped_model(model)
        model = wrapper
    model.eval()
    if str(path).endswith(".ckpt"):
        torch.save(model.get_checkpoint(), str(path))
    else:
        model.export().save(str(path))
    return built


def build_random_uma(path: str, seed: int = 0, tasks: tuple = UMA_TASKS, reference_energies: dict | None = None,
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


def dpa3_config(type_map: list[str], seed: int = 0, n_dim: int = 16, e_dim: int = 8, a_dim: int = 8,
                nlayers: int = 2, e_rcut: float = 4.0, a_rcut: float = 3.5, e_sel: int = 40, a_sel: int = 16,
                neuron: tuple = (16, 16), precision: str = "float32", e_rcut_smth: float | None = None,
                a_rcut_smth: float | None = None, activation_function: str | None = None, dim_case_embd: int = 0,
                repflow: dict | None = None, descriptor: dict | None = None) -> dict:
    """A DPA-3 energy model's ``model`` section, in deepmd-kit's input format (before normalisation).

    The defaults are small. ``repflow`` and ``descriptor`` add or override keys of the repflow
    block and of the descriptor (e.g. DPA-3.1-3M's ``use_dynamic_sel``, ``update_style``);
    ``activation_function`` is set on both the descriptor and the fitting net; ``dim_case_embd``
    > 0 gives the fitting net a case embedding, deepmd's way of sharing one fitting net between
    the branches of a multi-task model. Smoothing radii default to the cut-offs minus 0.5 Å.
    """
    rep = {"n_dim": n_dim, "e_dim": e_dim, "a_dim": a_dim, "nlayers": nlayers,
           "e_rcut": e_rcut, "e_rcut_smth": e_rcut - 0.5 if e_rcut_smth is None else e_rcut_smth, "e_sel": e_sel,
           "a_rcut": a_rcut, "a_rcut_smth": a_rcut - 0.5 if a_rcut_smth is None else a_rcut_smth, "a_sel": a_sel,
           "axis_neuron": 4, "update_angle": True, "smooth_edge_update": True}
    rep.update(repflow or {})
    desc = {"type": "dpa3", "repflow": rep, "precision": precision, "seed": seed}
    fitting = {"neuron": list(neuron), "resnet_dt": True, "precision": precision, "seed": seed}
    if activation_function is not None:
        desc["activation_function"] = fitting["activation_function"] = activation_function
    if dim_case_embd:
        fitting["dim_case_embd"] = int(dim_case_embd)
    desc.update(descriptor or {})
    return {"type_map": list(type_map), "descriptor": desc, "fitting_net": fitting}


def build_random_dpa3(path: str, seed: int = 0, type_map: list[str] | tuple = ("H", "O"),
                      reference_energies: dict | None = None, heads: list[str] | None = None,
                      shared: bool = False, **hypers) -> str:
    """A randomly initialised DPA-3 energy model, saved as a deepmd training checkpoint ``path`` (``.pt``).

    The model comes from deepmd-kit's own config normalisation (``model_args``) and
    ``get_model``; the file is what deepmd's trainer writes (``{"model": ModelWrapper.state_dict()}``,
    model parameters in ``_extra_state``), so ``DeepPot`` loads it. ``reference_energies``
    (eV per atom, by element symbol) go into the atomic model's ``out_bias``, and a seeded
    random offset into the fitting net's ``bias_atom_e``, so the readout's per-type shift is
    exercised. ``hypers`` go to :func:`dpa3_config`.

    With ``heads``, the file is a multi-task checkpoint with one branch per head. Without
    ``shared``, each branch is a separate random model (seeds ``seed``, ``seed + 1`` ...). With
    ``shared``, the branches are laid out as DPA-3.1-3M's are, by deepmd's multi-task trainer's
    own steps: a ``shared_dict`` with one descriptor and one fitting net that every branch of
    ``model_dict`` names (``preprocess_shared_params``), the fitting net's case embedding set
    per branch (``get_model_for_wrapper``, one-hot over ``dim_case_embd`` in sorted head
    order; ``dim_case_embd`` must be given) and the parameters linked
    (``ModelWrapper.share_params``); each branch keeps its own ``bias_atom_e`` (seed
    ``seed + k``) and ``out_bias``. Runs in the ``dpa`` environment.
    """
    import copy

    import torch

    from .extract.dpa import TARGET, import_deepmd

    import_deepmd("cpu")
    from deepmd.pt.model.model import get_model
    from deepmd.pt.train.wrapper import ModelWrapper
    from deepmd.utils.argcheck import model_args

    def set_biases(model, s: int):
        am = model.atomic_model
        gen = torch.Generator().manual_seed(s)
        with torch.no_grad():
            am.fitting_net.bias_atom_e.copy_(0.1 * torch.randn(am.fitting_net.bias_atom_e.shape, generator=gen,
                                                               dtype=am.fitting_net.bias_atom_e.dtype))
            if reference_energies:
                out_bias = model.get_out_bias().clone()
                for t, symbol in enumerate(type_map):
                    out_bias[am.bias_keys.index(TARGET), t, 0] = float(reference_energies.get(symbol, 0.0))
                model.set_out_bias(out_bias)

    def one(s: int):
        raw = dpa3_config(list(type_map), seed=s, **hypers)
        params = model_args().normalize_value(copy.deepcopy(raw), trim_pattern="_*")
        model_args().check_value(params, strict=True)
        torch.manual_seed(s)
        model = get_model(copy.deepcopy(params))
        set_biases(model, s)
        return model, params

    if heads and shared:
        from deepmd.pt.train.training import get_model_for_wrapper
        from deepmd.pt.utils.multi_task import preprocess_shared_params
        from deepmd.utils.argcheck import multi_model_args

        if hypers.get("dim_case_embd", 0) < len(heads):
            raise ValueError(f"a fitting net shared by {len(heads)} heads needs dim_case_embd >= {len(heads)}")
        raw = dpa3_config(list(type_map), seed=seed, **hypers)
        config = {"shared_dict": {"type_map_all": raw["type_map"], "dpa3_descriptor": raw["descriptor"],
                                  "shared_fitting": raw["fitting_net"]},
                  "model_dict": {h: {"type_map": "type_map_all", "descriptor": "dpa3_descriptor",
                                     "fitting_net": "shared_fitting"} for h in heads}}
        config, links = preprocess_shared_params(config)
        params = multi_model_args().normalize_value(config, trim_pattern="_*")
        multi_model_args().check_value(params, strict=True)
        torch.manual_seed(seed)
        models = get_model_for_wrapper(params)
        wrapper = ModelWrapper(models, model_params=params)
        wrapper.share_params(links, model_key_prob_map={h: 1.0 / len(heads) for h in heads}, resume=True)
        for k, head in enumerate(heads):
            set_biases(wrapper.model[head], seed + k)
    elif heads:
        models, params = {}, {"model_dict": {}}
        for k, head in enumerate(heads):
            models[head], params["model_dict"][head] = one(seed + k)
        wrapper = ModelWrapper(models, model_params=params)
    else:
        model, params = one(seed)
        wrapper = ModelWrapper(model, model_params=params)
    torch.save({"model": wrapper.state_dict()}, str(path))
    return str(path)


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


def build_random_orb(path: str, seed: int = 0, architecture: str = "orb_v3_direct_architecture",
                     system_config: dict | None = None, **architecture_args) -> dict:
    """A small randomly initialised ORB (orb-models' own architecture builder), saved as a state dict.

    ``architecture_args`` override the builder's defaults (``latent_dim``, ``base_mlp_hidden_dim``,
    ``head_mlp_hidden_dim``, ``num_message_passing_steps`` ...). The energy head keeps
    orb-models' own per-element reference energies and normaliser. Returns the ``options`` a
    ``local`` registry entry needs to rebuild the architecture; the file is read back with
    orb-models' ``load_model``. Runs in the ``orb`` environment.
    """
    import torch
    from orb_models.forcefield import pretrained

    from .extract.orb import ARCHITECTURES
    from orb_models.forcefield.atomic_system import SystemConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}")
    system_config = system_config or {"radius": 6.0, "max_num_neighbors": 120}
    torch.manual_seed(seed)
    model = getattr(pretrained, architecture)(system_config=SystemConfig(**system_config), **architecture_args)
    model.eval()
    torch.save(model.state_dict(), str(path))
    return {"architecture": architecture, "architecture_args": architecture_args, "system_config": system_config}


#: per family: how the contract test gets a small real or random model of it. ``wheel``: a
#: registered model whose weights ship in a wheel; ``build``: a builder of this module, its
#: keyword arguments and the file name; ``mace``: the MACE trained by ``tests/conftest.py``.
CONTRACT_MODELS = {
    "chgnet": {"wheel": "chgnet-0.3.0"},
    "diep": {"wheel": "diep"},
    "sevenn": {"wheel": "sevennet-0"},
    "mace": {"fixture": "trained_mace"},
    "pet": {"build": "build_random_pet", "file": "test-pet.pt",
            "args": dict(seed=0, atomic_types=_TYPES, reference_energies={z: -1.0 - 0.5 * i for i, z in enumerate(_TYPES)},
                         d_pet=16, d_head=16, d_node=32, d_feedforward=32, num_heads=2, num_attention_layers=1,
                         num_gnn_layers=2)},
    "uma": {"build": "build_random_uma", "file": "test-uma.pt", "options": {"task": "omat"},
            "args": dict(seed=0, reference_energies={"omat": {z: -1.0 - 0.5 * i for i, z in enumerate(_TYPES)}},
                         sphere_channels=16, hidden_channels=16, edge_channels=16, num_distance_basis=16,
                         num_layers=2, num_experts=4, lmax=2, mmax=2, cutoff=6.0, rmsd=1.423)},
    "dpa": {"build": "build_random_dpa3", "file": "test-dpa.pt",
            "args": dict(seed=0, type_map=DPA_TYPE_MAP,
                         reference_energies={s: -1.0 - 0.5 * i for i, s in enumerate(DPA_TYPE_MAP)},
                         n_dim=16, e_dim=8, a_dim=8, nlayers=2, neuron=[16, 16], e_sel=40, a_sel=24)},
    "mattersim": {"build": "build_random_mattersim", "file": "test-mattersim.pth",
                  "args": dict(seed=0, reference_energies={z: -1.0 - 0.5 * i for i, z in enumerate(_TYPES)},
                               scales={z: 0.5 + 0.25 * i for i, z in enumerate(_TYPES)},
                               num_blocks=2, units=16, max_l=2, max_n=3, cutoff=5.0, threebody_cutoff=4.0)},
    "orb": {"build": "build_random_orb", "file": "test-orb.ckpt", "options_from_builder": True,
            "args": dict(seed=0, architecture="orb_v3_direct_architecture", latent_dim=16, base_mlp_hidden_dim=32,
                         base_mlp_depth=1, head_mlp_hidden_dim=16, head_mlp_depth=1, num_message_passing_steps=2)},
}

_BUILD_SCRIPT = """
import json, sys
from umlip_latents import testing
args = json.loads(sys.argv[3])
for key in ("reference_energies", "scales"):  # JSON made the atomic numbers strings
    if isinstance(args.get(key), dict) and all(str(k).isdigit() for k in args[key]):
        args[key] = {int(k): v for k, v in args[key].items()}
out = getattr(testing, sys.argv[1])(sys.argv[2], **args)
print(json.dumps(out if isinstance(out, dict) else None))
"""


def build_in_environment(family: str, builder: str, path, args: dict) -> dict | None:
    """Run ``builder(path, **args)`` of this module in family ``family``'s environment; what it returned."""
    env = get_family(family).environment
    child = dict(os.environ, UMLIP_LATENTS_ENV=env, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([str(environment_python(env)), "-c", _BUILD_SCRIPT, builder, str(path), json.dumps(args)],
                          capture_output=True, text=True, env=child)
    if proc.returncode != 0:
        raise RuntimeError(f"{builder} failed in environment {env!r}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def contract_model(family: str, cache_dir) -> ModelSpec:
    """The small model of :data:`CONTRACT_MODELS` for ``family`` (built and cached for ``build`` rows).

    Raises ``KeyError`` for ``wheel`` and ``fixture`` rows, which the tests resolve themselves.
    """
    row = CONTRACT_MODELS[family]
    if "build" not in row:
        raise KeyError(f"{family}: not built here ({row})")
    key = hashlib.sha256(json.dumps([row["build"], row["args"]], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{family}-{key}" / row["file"]
    options_file = path.with_suffix(".options.json")
    if not (path.exists() and options_file.exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        returned = build_in_environment(family, row["build"], path, row["args"])
        options = returned if row.get("options_from_builder") else row.get("options", {})
        options_file.write_text(json.dumps(options))
    fam = get_family(family)
    return ModelSpec(key=f"test-{family}", family=family, environment=fam.environment,
                     source={"kind": "local", "path": str(path)},
                     training_data="none (random weights, built in the test session)", functional="none",
                     layers={"last": fam.last, "backbone": fam.backbone},
                     description=f"small random {family} model for tests; not a foundation model",
                     options=json.loads(options_file.read_text()))


class ExitOnce:
    """An extraction function that ends its process the first time it runs (a worker lost mid-task),
    then extracts as :func:`~umlip_latents.extract.extract_features`: ``marker`` records that it did."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __call__(self, spec, structures, **options):
        from .extract import extract_features

        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return extract_features(spec, structures, **options)
