"""PET in the layouts the paper's checkpoints are released in (``pet`` environment).

The pretrained files cannot be fetched here, so each released layout is rebuilt with
metatrain's own classes (:func:`umlip_latents.testing.build_random_pet`) from the released
hyperparameters, with random weights, per-element reference energies and an energy scale other than 1,
and the file placed where a user would put the real one (``$UMLIP_LATENTS_CHECKPOINTS/<file>``).
Through the public API (:func:`umlip_latents.extract.extract_features`) each must re-read its
energy from the last-layer features, give the energy the model itself gives (metatomic's ASE
calculator on the same file, independently of the adapter's unwrapping), and keep the
invariances the ``pet`` row of ``models/families.yml`` declares.

Where each released number comes from
-------------------------------------
PET-MAD v1.0.2 (registry ``pet-mad-s-v1.0.2``):

- ``cutoff`` 4.5, ``cutoff_width`` 0.2, ``d_head`` 128, ``d_feedforward`` 512, ``num_heads`` 8,
  ``num_attention_layers`` 2, ``num_gnn_layers`` 2: metatrain's ``pet`` defaults of the
  PET-MAD release (``src/metatrain/pet/default-hypers.yaml`` of spring 2025, metatensor/metatrain),
  which the PET-MAD fine-tuning workshops keep, overriding only ``d_pet: 256`` to match the
  checkpoint (metatensor/Workshop-spring-2025 ``finetuning/01.full-finetuning/options.yaml``,
  lab-cosmo/pet-mad-finetuning-workshop ``05.transfer-learning/options.yaml``).
- ``d_node = d_pet``, ``LayerNorm``, ``SiLU``, ``PostLN``, ``featurizer_type: residual``:
  metatrain's upgrade of "the standard old PET checkpoints" (``model_update_v7_v8`` in
  ``src/metatrain/pet/checkpoints.py``); ``cutoff_function: Cosine`` and no adaptive cutoff:
  ``model_update_v9_v10``. Residual: every GNN layer is a readout layer (2).
- LLPR wrapper, conservative only (no direct force/stress heads), 85 elements: upet
  ``docs/src/models.rst`` (its uncertainty list and its conservative-only list both name
  ``pet-mad-s`` v1.0.2; legacy table: "PET-MAD-1 ... 85 elements").

uPET sizes (registry ``pet-omat-{xs,s,m,l}-v1.0.0``): upet ``docs/src/models.rst``, "Model sizes"
(the PET-OMat Pareto front, Bigi et al., arXiv:2601.16195, Table IV): node / edge feature
dimension (``d_node`` / ``d_pet``) 512/128, 1024/256, 1536/384, 2048/512; GNN layers 2, 3, 3, 4;
attention layers 1, 1, 2, 2; cutoff 7.5, 8.0, 8.5, 9.0 Å; adaptive neighbour number
(``num_neighbors_adaptive``) 8, 16, 24, 32 (the values before PET-MAD-1.6, given in parentheses
there); 4.5 M, 25.9 M, 109 M, 255 M parameters; 89 elements (PET-OMat row). ``d_feedforward =
2 d_pet``, ``RMSNorm``, ``SwiGLU``, ``PreLN``, ``featurizer_type: feedforward`` (one readout
layer): metatrain's upgrade of "the large-scale PET checkpoints" (``model_update_v7_v8``);
``adaptive_cutoff_method: grid``: ``model_update_v11_v12`` (checkpoints before the solver
method, which upet introduced with PET-MAD-1.6); the direct force and stress heads: upet
``docs/src/models.rst`` ("most also expose a direct, non-conservative force head"; PET-OMat is
not in its conservative-only list). Not stated anywhere we could read: ``d_head``, ``num_heads``,
``cutoff_width``, ``cutoff_function``; they keep the installed metatrain's defaults (128, 8,
0.5, Bump); a slow test checks that the layouts give the published parameter counts (PET-MAD:
2.77 M against the paper's 2.78 M for a PET with its hyperparameters; XS 4.48 M against 4.5 M,
S 25.1 M against 25.9 M).

The upet catalogue holds both featurizers (peterspackman/pet-kokkos README: "both featurizers"
among the published checkpoints) and the model cards do not say which file uses which, so
the uPET S layout is also run with the residual featurizer: three readout layers.

The default suite runs every layout with the released structure (featurizer, depth, cutoff,
adaptive cutoff, normalisation, activation, heads, wrapper) and fewer channels; the
full-size layouts are marked ``slow``.
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

from umlip_latents.datasets import sha256_file
from umlip_latents.extract import extract_features
from umlip_latents.families import environment_python, get_family
from umlip_latents.registry import ModelSpec, get_spec

#: the elements of each release (upet docs: PET-MAD-1 85, PET-OMat 89); the test crystals use
#: H-Cu. Reference energies differ per element so the per-element readout is exercised.
MAD_TYPES = list(range(1, 86))
OMAT_TYPES = list(range(1, 90))


def _per_element(types, a, b):
    return {z: a + b * (i % 7) for i, z in enumerate(types)}


#: released hyperparameters (sources in the module docstring)
PET_MAD_V102 = dict(cutoff=4.5, cutoff_width=0.2, cutoff_function="Cosine", num_neighbors_adaptive=None,
                    d_pet=256, d_node=256, d_head=128, d_feedforward=512, num_heads=8, num_attention_layers=2,
                    num_gnn_layers=2, normalization="LayerNorm", activation="SiLU", transformer_type="PostLN",
                    featurizer_type="residual")
UPET_S = dict(cutoff=8.0, num_neighbors_adaptive=16, adaptive_cutoff_method="grid", d_pet=256, d_node=1024,
              d_feedforward=512, num_attention_layers=1, num_gnn_layers=3, normalization="RMSNorm",
              activation="SwiGLU", transformer_type="PreLN", featurizer_type="feedforward")
UPET_XS = dict(UPET_S, cutoff=7.5, num_neighbors_adaptive=8, d_pet=128, d_node=512, d_feedforward=256,
               num_gnn_layers=2)
#: published parameter counts, name -> (layout, elements, direct force/stress heads, count, relative
#: tolerance): the uPET model card
#: (upet docs/src/models.rst; direct force and stress heads included) and the paper's bespoke LPS
#: PET "with PET-MAD hyperparameters, 2.78M parameters" (../shared/paper-reference/results.yml,
#: model_keys.fine_tuning.bespoke; elements Li, P, S)
PUBLISHED_PARAMETERS = {"pet-mad-v1.0.2 (LPS)": (PET_MAD_V102, [3, 15, 16], False, 2.78e6, 0.01),
                        "pet-omat-xs": (UPET_XS, OMAT_TYPES, True, 4.5e6, 0.02),
                        "pet-omat-s": (UPET_S, OMAT_TYPES, True, 25.9e6, 0.05)}


def _fewer_channels(hypers: dict, d_pet: int = 16) -> dict:
    """The same layout with ``d_pet`` edge channels: node, feed-forward and head widths keep their ratios."""
    scale = d_pet / hypers["d_pet"]
    out = dict(hypers, d_pet=d_pet, num_heads=2, d_head=16)
    for name in ("d_node", "d_feedforward"):
        out[name] = int(hypers[name] * scale)
    return out


#: case -> (registry key or None for a local file, file name as placed, builder arguments)
def _cases(small: bool) -> dict:
    shrink = _fewer_channels if small else dict
    mad = dict(seed=3, atomic_types=MAD_TYPES, llpr=True, reference_energies=_per_element(MAD_TYPES, -2.0, -0.3),
               scale=0.7, **shrink(PET_MAD_V102))
    omat = dict(seed=4, atomic_types=OMAT_TYPES, non_conservative=True,
                reference_energies=_per_element(OMAT_TYPES, -1.5, -0.4), scale=1.3)
    return {
        "pet-mad-v1.0.2-llpr.ckpt": ("pet-mad-s-v1.0.2", "pet-mad-s-v1.0.2.ckpt", mad),
        "pet-mad-v1.0.2-llpr.pt": ("pet-mad-s-v1.0.2", "pet-mad-s-v1.0.2.pt", mad),
        "pet-omat-s.ckpt": ("pet-omat-s-v1.0.0", "pet-omat-s-v1.0.0.ckpt", dict(omat, **shrink(UPET_S))),
        "upet-s-residual.ckpt": (None, "upet-s-residual.ckpt",
                                 dict(omat, **shrink(dict(UPET_S, featurizer_type="residual")))),
        **({} if small else {
            "pet-omat-xs.ckpt": ("pet-omat-xs-v1.0.0", "pet-omat-xs-v1.0.0.ckpt", dict(omat, **UPET_XS))}),
    }


def _readout_layers(args: dict) -> int:
    return args["num_gnn_layers"] if args["featurizer_type"] == "residual" else 1


def _build(name: str, args: dict, folder) -> tuple[str, dict]:
    """The built file (cached across sessions, keyed on its recipe) copied into ``folder`` as ``name``."""
    from umlip_latents.testing import build_in_environment

    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    built = cache_dir() / f"pet-released-{key}" / name
    info = built.parent / f"{name}.json"
    if not (built.exists() and info.exists()):
        built.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps(build_in_environment("pet", "build_random_pet", built, args)))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(built, folder / name)
    return str(folder / name), json.loads(info.read_text())


_OWN_ENERGY = """
import json, sys
from ase.io import read
from metatomic.torch.ase_calculator import MetatomicCalculator
from metatrain.utils.io import load_model
from umlip_latents.checks import calculator_energies
structures = read(sys.argv[1], ':')
out = {}
for path in sys.argv[2:]:  # the whole file (LLPR wrapper included), not the adapter's unwrapped PET
    model = load_model(path).export() if path.endswith('.ckpt') else path
    out[path] = calculator_energies(MetatomicCalculator(model, device='cpu'), structures).tolist()
print(json.dumps(out))
"""


def _released(tmp_path_factory, crystals, small: bool) -> dict:
    """Per case: spec, checkpoints folder, builder arguments, what the builder reported, the model's own energies."""
    from ase.io import write

    root = tmp_path_factory.mktemp("released")
    out = {}
    for case, (key, name, args) in _cases(small).items():
        folder = root / case  # one folder per case: the .ckpt and .pt of one key would shadow each other
        path, info = _build(name, args, folder)
        if key is None:
            fam = get_family("pet")
            spec = ModelSpec(key=case.rsplit(".", 1)[0], family="pet", environment=fam.environment,
                             source={"kind": "local", "path": name}, training_data="none", functional="none",
                             layers={"last": fam.last, "backbone": fam.backbone})
        else:
            spec = get_spec(key)
        out[case] = {"spec": spec, "folder": str(folder), "path": path, "args": args, "built": info}
    write(root / "crystals.xyz", crystals, format="extxyz")
    env = dict(os.environ, UMLIP_LATENTS_ENV="pet", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([str(environment_python("pet")), "-c", _OWN_ENERGY, str(root / "crystals.xyz"),
                           *[c["path"] for c in out.values()]], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in out.values():
        case["own_energy"] = np.array(own[case["path"]])
    return out


@pytest.fixture(scope="module")
def small_released(tmp_path_factory, crystals):
    return _released(tmp_path_factory, crystals, small=True)


@pytest.fixture(scope="module")
def full_released(tmp_path_factory, crystals):
    return _released(tmp_path_factory, crystals, small=False)


def _rows(fs, i):
    return np.asarray(fs.values[fs.structure_index == i], dtype=np.float64)


def _check(case: dict, crystals, monkeypatch):
    """Energy re-read, the model's own energy, feature blocks and declared invariances, both layers."""
    spec, args = case["spec"], case["args"]
    fam = get_family("pet")
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", case["folder"])
    layers = _readout_layers(args)
    assert case["built"]["readout_layers"] == layers
    structures, maps = transformed_variants(crystals)
    n_base = len(crystals)
    for layer in ("last", "backbone"):
        fs = extract_features(spec, structures, layer=layer, device="cpu")
        n = np.bincount(fs.structure_index)
        assert fs.meta["checkpoint_sha256"] == sha256_file(case["path"])  # the file placed for this case
        own = np.abs(fs.energy[:n_base] - case["own_energy"]) / n[:n_base]
        assert own.max() <= 1e-5, f"{spec.key} {layer}: energy differs from the model's own by {own.max():.2e} eV/atom"
        if layer == "last":
            assert fs.dim == layers * 2 * case["built"]["d_head"] + 1
            assert [b.name for b in fs.blocks] == ["last_layer_features", "neighbour_weight"]
            err = np.abs(fs.reread_energy() - fs.energy) / n
            assert err.max() <= 1e-5, f"{spec.key}: energy re-read error {err.max():.2e} eV/atom"
        else:
            assert fs.dim == layers * (args["d_node"] + args["d_pet"])
        checked = set()
        for kind, base, copy, idx in maps:
            ref, got = _rows(fs, base), _rows(fs, copy)
            rel = float(np.linalg.norm(got - ref[idx]) / np.linalg.norm(ref))
            if kind == "nudged":
                assert rel >= 3 * fam.tolerance, f"{spec.key} {layer}: a nudged atom changes only {rel:.2e}"
                continue
            invariance = {"rotated": "rotation", "translated": "translation", "permuted": "permutation",
                          "supercell": "supercell"}[kind]
            if not fam.exact(invariance):
                continue  # declared approximate (learned by augmentation, not constrained)
            checked.add(invariance)
            assert rel <= fam.tolerance, f"{spec.key} {layer}: {kind} copy of {base} differs by {rel:.2e}"
            per_atom = abs(fs.energy[copy] / n[copy] - fs.energy[base] / n[base])
            assert per_atom <= 1e-4, f"{spec.key}: {kind} copy of {base} energy differs by {per_atom:.2e} eV/atom"
        assert checked == {"translation", "permutation", "supercell"}


@pytest.mark.parametrize("case", list(_cases(small=True)))
def test_released_layout_with_fewer_channels(small_released, crystals, monkeypatch, case):
    """Each released layout (fewer channels): energy re-read and the model's own, invariances, both layers."""
    _check(small_released[case], crystals, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases(small=False)))
def test_released_layout_at_full_size(full_released, crystals, monkeypatch, case):
    """The same at the released sizes."""
    _check(full_released[case], crystals, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_released_hyperparameters_give_the_published_parameter_count(tmp_path, name):
    """A check on the hyperparameters the sources leave implicit (d_head, the heads): the count matches."""
    hypers, types, non_conservative, published, tolerance = PUBLISHED_PARAMETERS[name]
    _, built = _build("model.ckpt", dict(seed=0, atomic_types=types, non_conservative=non_conservative, **hypers),
                      tmp_path)
    assert abs(built["parameters"] / published - 1) <= tolerance, (built["parameters"], published)
