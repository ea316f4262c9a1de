"""DPA-3.1-3M in its released layout: a random multi-task DPA-3 of the released sizes, placed as a user would.

The registered DPA entries (``models/dpa.yml``) are branches of one multi-task checkpoint,
``DPA-3.1-3M.pt``, which cannot be downloaded here. This module builds a random model in that
checkpoint's layout with deepmd-kit's own classes and multi-task machinery
(:func:`umlip_latents.testing.build_random_dpa3` with ``shared=True``): one DPA-3 descriptor
and ONE energy fitting net in a ``shared_dict``, named by every branch, the fitting net told
the branches apart by its case embedding (``dim_case_embd``), each branch with its own
per-type biases. There is one branch per registry entry (their ``source.head`` names); the
released model has 31 branches (``dim_case_embd`` 31), of which these are five, each with its
one-hot case index in sorted head order as deepmd's trainer sets it. The file is placed as
``$UMLIP_LATENTS_CHECKPOINTS/DPA-3.1-3M.pt`` (the entries' ``source.filename``), and a frozen
TorchScript model of one branch (deepmd's ``freeze``, what ``dp --pt freeze`` runs) as
``$UMLIP_LATENTS_CHECKPOINTS/<key>.pth`` in a folder of its own; both are read through
:func:`umlip_latents.extract.extract_features` with the registry's own entries.

Released hyperparameters and where they come from:

- matbench-discovery ``models/deepmd/dpa-3.1-3m-ft.yml`` (the DPA-3.1-3M fine-tune's entry):
  16 layers, ``n_dim`` 128, ``e_dim`` 64, ``a_dim`` 32, ``e_rcut`` 6 Å, ``a_rcut`` 4 Å and
  3 268 838 parameters. The model built here has 3 268 689 trainable parameters; the 149 more
  are 118 + 31, the size of the per-type ``out_bias`` and of the case embedding, which seem
  to have been counted too.
- deepmd-kit ``examples/water/dpa3/input_torch.json`` (the DPA-3 example of the same widths):
  ``e_rcut_smth`` 5.3, ``a_rcut_smth`` 3.5, ``axis_neuron`` 4, ``fix_stat_std`` 0.3,
  ``a_compress_rate`` 1, ``a_compress_e_rate`` 2, ``a_compress_use_split``, ``update_angle``,
  ``smooth_edge_update``, ``use_exp_switch``, ``update_style`` res_residual with
  ``update_residual`` 0.1 (``const``), ``use_tebd_bias`` false, ``concat_output_tebd`` false,
  float32, and a fitting net of ``[240, 240, 240]`` with ``resnet_dt``.
- fine-tuning templates written for DPA-3.1-3M in public code (found with the code search; they
  name the file and its branches): ``e_sel`` 1200 and ``a_sel`` 300 with ``use_dynamic_sel``
  and ``sel_reduce_factor`` 10, activation ``silut:3.0`` and ``dim_case_embd`` 31. They do not set
  ``edge_init_use_dist`` (the water example does), so it is left at its default; it changes
  no parameter count.
- the type map is the whole periodic table, H to Og (118 types), as those templates and the
  registry say.
- deepmd-kit ``examples/water_multi_task/pytorch_example/input_torch_sharefit.json``: the
  multi-task layout with one fitting net in ``shared_dict`` shared by the branches.

At these sizes one extraction of the test structures takes ~10 s on one CPU thread, so the
released layout runs outside the default suite (``slow``); the default suite runs the same
layout and the same checks with 2 repflow layers instead of 16 (every other size as released).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import test_cache_dir as cache_dir  # aliased: pytest would collect test_*
from conftest import transformed_variants

from umlip_latents.extract import extract_features
from umlip_latents.extract.worker import pack_structures
from umlip_latents.families import environment_python, get_family
from umlip_latents.registry import load_registry

#: DPA-3.1-3M's descriptor and fitting net (sources in the module docstring)
RELEASED = dict(
    n_dim=128, e_dim=64, a_dim=32, nlayers=16, e_rcut=6.0, e_rcut_smth=5.3, e_sel=1200, a_rcut=4.0,
    a_rcut_smth=3.5, a_sel=300, neuron=[240, 240, 240], activation_function="silut:3.0", dim_case_embd=31,
    precision="float32", descriptor={"use_tebd_bias": False, "concat_output_tebd": False},
    repflow={"fix_stat_std": 0.3, "a_compress_rate": 1, "a_compress_e_rate": 2, "a_compress_use_split": True,
             "use_dynamic_sel": True, "sel_reduce_factor": 10.0, "use_exp_switch": True,
             "update_style": "res_residual", "update_residual": 0.1, "update_residual_init": "const"},
)
#: trainable parameters of one branch at the released sizes (matbench-discovery: 3 268 838, see above)
RELEASED_PARAMETERS = 3_268_689
#: the layouts tested: released, and the default suite's with 2 of the 16 repflow layers
LAYOUTS = {"released": RELEASED, "two-layer": dict(RELEASED, nlayers=2)}
#: deepmd's full type map: H ... Og
TYPE_MAP = ["H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar", "K",
            "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb",
            "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I", "Xe", "Cs",
            "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta",
            "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa",
            "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt",
            "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"]
REFERENCE_ENERGIES = {s: -1.0 - 0.02 * i for i, s in enumerate(TYPE_MAP)}
#: the registered branch that is also frozen
FROZEN_KEY = "dpa-3.1-3m-mptrj"
#: eV/atom
TOL = 1e-5
#: kinds of copies of ``conftest.transformed_variants`` -> the invariance they test
INVARIANCE_OF = {"rotated": "rotation", "translated": "translation", "permuted": "permutation",
                 "supercell": "supercell"}


def _registered() -> dict:
    """The registered DPA-3.1-3M branches, by key."""
    return {k: s for k, s in load_registry(derived=False).items() if s.family == "dpa"}


BUILD = """
import json, sys
from umlip_latents.extract.dpa import import_deepmd
from umlip_latents.testing import build_random_dpa3

import_deepmd("cpu")
from deepmd.infer import DeepPot
from deepmd.pt.entrypoints.main import freeze

pt, pth, head, raw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
build_random_dpa3(pt, shared=True, **raw)
freeze(pt, pth, head=head)
layout = {}
for h in raw["heads"]:
    model = DeepPot(pt, head=h, no_jit=True, auto_batch_size=False).deep_eval.dp.model["Default"]
    am = model.atomic_model
    layout[h] = {"parameters": sum(p.numel() for p in model.parameters()),
                 "nlayers": len(am.descriptor.repflows.layers), "n_dim": am.descriptor.repflows.n_dim,
                 "case_embd": am.fitting_net.case_embd.tolist(), "type_map": model.get_type_map()}
print(json.dumps(layout))
"""

REFERENCE = """
import json, sys
import numpy as np
from umlip_latents.extract.dpa import import_deepmd
from umlip_latents.extract.worker import unpack_structures

import_deepmd("cpu")
from deepmd.infer import DeepPot

structures = unpack_structures(sys.argv[1])
out = {}
for label, path, head in json.loads(sys.argv[2]):
    dp = DeepPot(path, head=head, no_jit=True)  # eager (a .pth is TorchScript either way)
    type_map = dp.get_type_map()
    out[label] = [float(np.ravel(dp.eval(a.positions.reshape(1, -1), a.cell.array.reshape(1, -1),
                                         [type_map.index(s) for s in a.get_chemical_symbols()])[0])[0])
                  for a in structures]
print(json.dumps(out))
"""


def _run_dpa(script: str, *args) -> dict:
    """Run ``script`` in the dpa environment; it prints one JSON line last."""
    env = dict(os.environ, UMLIP_LATENTS_ENV="dpa", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([str(environment_python("dpa")), "-c", script, *args], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=[pytest.param("released", marks=pytest.mark.slow), "two-layer"])
def layout(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoints(layout) -> dict:
    """The multi-task ``.pt`` (one branch per registry entry) and the frozen ``.pth`` of :data:`FROZEN_KEY`,
    built in the dpa environment and cached, with the layout deepmd reports for each branch."""
    specs = _registered()
    recipe = dict(LAYOUTS[layout], seed=0, type_map=TYPE_MAP, reference_energies=REFERENCE_ENERGIES,
                  heads=[s.source["head"] for s in specs.values()])
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / f"dpa-3.1-3m-{layout}-{key}"
    pt, pth, info = folder / "DPA-3.1-3M.pt", folder / f"{FROZEN_KEY}.pth", folder / "layout.json"
    if not all(p.exists() for p in (pt, pth, info)):
        folder.mkdir(parents=True, exist_ok=True)
        built = _run_dpa(BUILD, str(pt), str(pth), specs[FROZEN_KEY].source["head"], json.dumps(recipe))
        info.write_text(json.dumps(built))
    return {"pt": pt, "pth": pth, "layout": json.loads(info.read_text()), "heads": recipe["heads"]}


def _fingerprint(structures) -> str:
    return hashlib.sha256(json.dumps([[a.numbers.tolist(), a.positions.round(10).tolist(), a.cell.array.round(10).tolist()]
                                      for a in structures]).encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def deeppot(checkpoints, crystals, tmp_path_factory) -> dict:
    """deepmd's own ``DeepPot.eval`` energies of the base structures: every branch of the ``.pt``
    (by key) and the frozen ``.pth`` (``"frozen"``); cached with the files, keyed on the structures."""
    cached = checkpoints["pt"].parent / f"deeppot-{_fingerprint(crystals)}.json"
    if not cached.exists():
        folder = tmp_path_factory.mktemp("dpa-reference")
        pack_structures(crystals, folder / "structures.npz")
        models = [[key, str(checkpoints["pt"]), spec.source["head"]] for key, spec in _registered().items()]
        models.append(["frozen", str(checkpoints["pth"]), None])
        cached.write_text(json.dumps(_run_dpa(REFERENCE, str(folder / "structures.npz"), json.dumps(models))))
    return json.loads(cached.read_text())


@pytest.fixture(scope="module")
def extracted(layout, checkpoints, deeppot, crystals, tmp_path_factory) -> dict:
    """FeatureSets through the public API, each file placed in a checkpoints folder as a user would.

    ``("pt", key)``: ``DPA-3.1-3M.pt`` (the entries' ``source.filename``) for every registered
    branch; ``("pth", FROZEN_KEY)``: ``<FROZEN_KEY>.pth`` alone in another folder. Both layers of
    :data:`FROZEN_KEY` (``.pt`` and ``.pth``) on the base structures and their transformed
    copies; the last layer of the other branches on the copies too at the released size, on the
    base structures only in the default suite; the backbone of one other branch on the base
    structures.
    """
    specs = _registered()
    structures, maps = transformed_variants(crystals)
    n_base = len(crystals)
    other = next(k for k in specs if k != FROZEN_KEY)
    out = {"maps": maps, "n_base": n_base, "last": {}, "backbone": {}, "deeppot": deeppot}
    roots = {}
    for kind in ("pt", "pth"):
        root = roots[kind] = tmp_path_factory.mktemp(f"checkpoints-{kind}")
        name = specs[FROZEN_KEY].source["filename"] if kind == "pt" else f"{FROZEN_KEY}.pth"
        shutil.copyfile(checkpoints[kind], root / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("UMLIP_LATENTS_CHECKPOINTS", str(roots["pt"]))
        for key, spec in specs.items():
            todo = structures if key == FROZEN_KEY or layout == "released" else structures[:n_base]
            out["last"]["pt", key] = extract_features(spec, todo, layer="last", device="cpu")
        out["backbone"]["pt", FROZEN_KEY] = extract_features(specs[FROZEN_KEY], structures, layer="backbone",
                                                             device="cpu")
        out["backbone"]["pt", other] = extract_features(specs[other], structures[:n_base], layer="backbone",
                                                        device="cpu")
        mp.setenv("UMLIP_LATENTS_CHECKPOINTS", str(roots["pth"]))
        for layer in ("last", "backbone"):
            out[layer]["pth", FROZEN_KEY] = extract_features(specs[FROZEN_KEY], structures, layer=layer,
                                                             device="cpu")
    return out


def _rel(got, ref):
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _rows(fs, i):
    return np.asarray(fs.values[fs.structure_index == i], dtype=np.float64)


def test_checkpoint_has_the_released_layout(layout, checkpoints):
    """Every registered branch is in the file; one descriptor and one fitting net of the released sizes,
    the branches told apart by one-hot case embeddings of dimension 31 (sorted head order)."""
    info = checkpoints["layout"]
    heads = checkpoints["heads"]
    assert sorted(info) == sorted(heads) and len(heads) == len(_registered()) == 5
    for k, head in enumerate(sorted(heads)):
        row = info[head]
        assert row["nlayers"] == LAYOUTS[layout]["nlayers"] and row["n_dim"] == 128
        assert row["type_map"] == TYPE_MAP
        assert row["case_embd"] == [1.0 if i == k else 0.0 for i in range(31)], head
        assert row["parameters"] == info[heads[0]]["parameters"]
    if layout == "released":
        assert info[heads[0]]["parameters"] == RELEASED_PARAMETERS


def test_energy_reread_equals_deeppot(extracted):
    """Per branch and for the frozen branch: the energy re-read from the last-layer features is the
    model's energy, and equals deepmd's own ``DeepPot.eval`` on the same file (<= 1e-5 eV/atom)."""
    n_base = extracted["n_base"]
    for (kind, key), fs in extracted["last"].items():
        n = np.bincount(fs.structure_index)
        reread = fs.reread_energy()
        err = np.abs(reread - fs.energy) / n
        assert err.max() <= TOL, f"{kind} {key}: energy re-read error {err.max():.2e} eV/atom"
        ref = np.array(extracted["deeppot"]["frozen" if kind == "pth" else key])
        err = np.abs(reread[:n_base] - ref) / n[:n_base]
        assert err.max() <= TOL, f"{kind} {key}: re-read energy differs from DeepPot by {err.max():.2e} eV/atom"
        # the per-type biases are part of the readout
        shifted = fs.readout.atom_energies(np.asarray(fs.values) + 0.1, fs.species)
        assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)


def test_declared_invariances(extracted):
    """The invariances ``models/families.yml`` declares for dpa hold within its tolerance, for every
    branch and the frozen model, on both layers; a nudged atom changes the features far more.

    A random model in this layout is nearly blind to geometry where atoms are sparse (residual
    updates scaled by 0.1, neighbour sums divided by ``e_sel / sel_reduce_factor`` = 120): moving one
    atom of the bcc Na cell by 0.3 Å changes its two-layer last-layer features by ~2e-6, below the
    declared tolerance. So the nudged copy is compared with the invariant copies' own errors (float32
    rounding, ~5e-8): it must differ at least ten times more than any of them.
    """
    fam = get_family("dpa")
    sets = [(layer, kind, key, fs) for layer in ("last", "backbone") for (kind, key), fs in extracted[layer].items()
            if fs.n_structures > extracted["n_base"]]
    assert {("last", "pth"), ("backbone", "pt"), ("backbone", "pth")} <= {(layer, kind) for layer, kind, _, _ in sets}
    for layer, kind, key, fs in sets:
        n = np.bincount(fs.structure_index)
        checked, worst, nudged = set(), {}, {}
        for what, base, copy, idx in extracted["maps"]:
            err = _rel(_rows(fs, copy), _rows(fs, base)[idx])
            if what == "nudged":
                nudged[base] = err
                continue
            if not fam.exact(INVARIANCE_OF[what]):
                continue
            checked.add(INVARIANCE_OF[what])
            worst[base] = max(worst.get(base, 0.0), err)
            assert err <= fam.tolerance, f"{kind} {key} {layer}: {what} copy of {base} differs by {err:.2e}"
            per_atom = abs(fs.energy[copy] / n[copy] - fs.energy[base] / n[base])
            assert per_atom <= TOL, f"{kind} {key}: {what} copy of {base}: energy differs by {per_atom:.2e} eV/atom"
        assert checked == {k for k in INVARIANCE_OF.values() if fam.exact(k)}
        for base, err in nudged.items():
            assert err >= 10 * worst[base] and err > 0, \
                f"{kind} {key} {layer}: nudged structure {base} changes {err:.2e}, invariant copies up to {worst[base]:.2e}"


def test_branches_share_descriptor_and_fitting_net(extracted):
    """One descriptor: the backbone features of two branches are the same. One fitting net: the readout
    weights are the same, while the case embedding gives each branch its own last-layer features,
    and its own per-type biases give it its own energies."""
    n_base = extracted["n_base"]
    other = next(key for kind, key in extracted["backbone"] if key != FROZEN_KEY)
    a, b = extracted["backbone"]["pt", FROZEN_KEY], extracted["backbone"]["pt", other]
    np.testing.assert_allclose(a.values[a.structure_index < n_base], b.values, rtol=0, atol=1e-6)  # other batches
    last = {key: fs for (kind, key), fs in extracted["last"].items() if kind == "pt"}
    assert sorted(last) == sorted(_registered())
    ref = last[FROZEN_KEY]

    def base(fs):
        return np.asarray(fs.values[fs.structure_index < n_base], np.float64), fs.energy[:n_base]

    for key, fs in last.items():
        np.testing.assert_array_equal(fs.readout.weight, ref.readout.weight)
        if key == FROZEN_KEY:
            continue
        (values, energy), (ref_values, ref_energy) = base(fs), base(ref)
        assert _rel(values, ref_values) > 1e-3, key
        assert not np.allclose(fs.readout.bias, ref.readout.bias), key
        assert np.abs(energy - ref_energy).max() > 1e-2, key


def test_frozen_branch_equals_its_checkpoint_branch(extracted):
    """The frozen ``.pth`` of a branch gives that branch's features, readout and energies."""
    for layer in ("last", "backbone"):
        pt, pth = extracted[layer]["pt", FROZEN_KEY], extracted[layer]["pth", FROZEN_KEY]
        assert pth.meta["checkpoint_sha256"] != pt.meta["checkpoint_sha256"]
        np.testing.assert_allclose(pth.values, pt.values, rtol=0, atol=1e-6)
        np.testing.assert_allclose(pth.energy, pt.energy, rtol=0, atol=1e-6)
        assert [b.name for b in pth.blocks] == [b.name for b in pt.blocks]
    pt, pth = extracted["last"]["pt", FROZEN_KEY], extracted["last"]["pth", FROZEN_KEY]
    np.testing.assert_array_equal(pth.readout.weight, pt.readout.weight)
    np.testing.assert_array_equal(pth.readout.bias, pt.readout.bias)
