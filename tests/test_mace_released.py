"""MACE checkpoints in their released layouts, built here with mace-torch's own classes.

Pretrained MACE files cannot be fetched in the test session, so each case is a randomly
initialised model of the released *architecture* (block classes, hyper-parameters, heads),
saved with ``torch.save`` as mace's trainer does and placed as a user would, as
``$UMLIP_LATENTS_CHECKPOINTS/<key>.model`` for the registry key of that release. It is then
extracted through the public API (:func:`umlip_latents.extract.extract_features`) and
checked against mace's own ``MACECalculator`` on the same file.

Where the numbers come from
---------------------------
* MACE-MP-0b3 (``mace-mp-0b3-medium``): its training command, ``mace_mp_0b3/mace-mp0-b3.sh``
  of github.com/ACEsuit/mace-mp: ``--model="MACE"``,
  ``--interaction_first="RealAgnosticDensityInteractionBlock"``,
  ``--interaction="RealAgnosticDensityResidualInteractionBlock"``, ``--num_interactions=2``,
  ``--correlation=3``, ``--max_ell=3``, ``--r_max=6.0``, ``--max_L=1``,
  ``--num_channels=128`` (so ``hidden_irreps = 128x0e + 128x1o``), ``--num_radial_basis=10``,
  ``--MLP_irreps="16x0e"``, ``--pair_repulsion``, ``--distance_transform="Agnesi"``,
  ``--scaling='rms_forces_scaling'``, ``--default_dtype="float64"``. The options it leaves
  out take mace's defaults (``mace/tools/arg_parser.py``): ``num_cutoff_basis=5``,
  ``radial_MLP=[64, 64, 64]``, ``radial_type="bessel"``, ``gate="silu"``. mace's trainer
  builds ``--model="MACE"`` as a ``ScaleShiftMACE`` with scale = the data's std and shift
  0 (``_build_model`` in ``mace/tools/model_script_utils.py``), and that is what is built here.
* MACE-OMAT-0 (``mace-omat-0-medium``): released in mace-torch >= 0.3.10 as "medium"
  (mace README, "Pretrained Foundation Models" table); no training script is published.
  Its MatPES fine-tunes (registered with ``parent: mace-omat-0-medium``) are described as
  having MPA-0's architecture, density interaction blocks + ZBL + Agnesi transform
  (apax-hub/apax pull request 558, which converts MPA-0 and MACE-matpes-r2scan-omat-ft
  layer by layer), the 0b3 recipe above. The case is built with the plain ``MACE`` class
  (no scale/shift: the adapter's scale 1, shift 0 branch, with the ZBL energy added
  unscaled), the one class of the three that the trainer's ``--model=MACE`` does not give.
* MACE-MPA-0 (``mace-mpa-0-medium``), two heads: the same blocks, as a ``ScaleShiftMACE``
  with heads ``["pt_head", "Default"]`` as mace's multi-head replay fine-tuning
  (``--multiheads_finetuning``) names them: per-head E0s, scale and shift, one ``16x0e``
  MLP slice per head. The released MPA-0 file's head list is not checked here (the file is
  not reachable); the case checks that the head named by the registry's ``options.head``
  is the one extracted, as ``MACECalculator(head=...)`` evaluates it.

Sizes: the released widths (128 channels, L=1, max_ell 3, correlation 3) are kept: on CPU
the models take ~2 s each to build whatever their width, and 32 channels would save only ~20 %
of this file's time. Only the element table is cut from 89 elements to the 8 of the test
structures (the per-element weights of the product basis and the E0s), and the data
statistics (``avg_num_neighbors``, E0s, scale, shift) are made-up numbers where the release
has fitted ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import squeezed_crystals, transformed_variants

from umlip_latents.extract import extract_features
from umlip_latents.families import get_family
from umlip_latents.registry import ModelSpec, get_spec

#: eV/atom
ENERGY_TOL = 1e-5
#: the elements of the test structures (Si, Na, Cl, Cu, Mg, O) and a few more
ELEMENTS = [1, 3, 8, 11, 12, 14, 17, 29]
#: MACE-MP-0b3's training command (see the module docstring); mace defaults for the rest
RELEASED = {"r_max": 6.0, "num_bessel": 10, "num_polynomial_cutoff": 5, "max_ell": 3, "num_interactions": 2,
            "correlation": 3, "channels": 128, "max_L": 1, "MLP_irreps": "16x0e", "radial_MLP": [64, 64, 64],
            "radial_type": "bessel", "interaction_first": "RealAgnosticDensityInteractionBlock",
            "interaction": "RealAgnosticDensityResidualInteractionBlock", "pair_repulsion": True,
            "distance_transform": "Agnesi"}
#: case -> (registry key, model class, heads, {head: (scale, shift)}) ; scale/shift unused for plain MACE
CASES = {
    "omat-0": ("mace-omat-0-medium", "MACE", ["Default"], {}),
    "mp-0b3": ("mace-mp-0b3-medium", "ScaleShiftMACE", ["Default"], {"Default": (0.83, 0.0)}),
    "mpa-0-two-heads": ("mace-mpa-0-medium", "ScaleShiftMACE", ["pt_head", "Default"],
                        {"pt_head": (0.83, 0.0), "Default": (1.12, -0.07)}),
}
#: (case, head option) runs: the two-head model once per head, chosen by the registry's options.head
RUNS = [("omat-0", None), ("mp-0b3", None), ("mpa-0-two-heads", "pt_head"), ("mpa-0-two-heads", "Default")]
#: one run per file (the backbone and the invariances do not depend on the head)
FILES = RUNS[:3]


def build_released_mace(path, kind: str, heads: list[str], scale_shift: dict, seed: int = 0, **overrides) -> str:
    """A randomly initialised MACE of the released layout (:data:`RELEASED`), saved whole to ``path``."""
    from umlip_latents.extract.mace import import_mace

    torch = import_mace()  # mace before e3nn: it sets up the full-pickle loading e3nn's constants need
    from e3nn import o3
    from mace import modules
    from mace.tools import torch_tools

    hp = {**RELEASED, **overrides}
    hidden = o3.Irreps(" + ".join(f"{hp['channels']}x{lv}{'e' if lv % 2 == 0 else 'o'}"
                                  for lv in range(hp["max_L"] + 1)))
    rng = np.random.default_rng(seed)
    e0 = -1.0 - 4.0 * rng.random((len(heads), len(ELEMENTS)))  # eV, per head and element
    kwargs = {
        "r_max": hp["r_max"], "num_bessel": hp["num_bessel"], "num_polynomial_cutoff": hp["num_polynomial_cutoff"],
        "max_ell": hp["max_ell"], "interaction_cls": modules.interaction_classes[hp["interaction"]],
        "interaction_cls_first": modules.interaction_classes[hp["interaction_first"]],
        "num_interactions": hp["num_interactions"], "num_elements": len(ELEMENTS), "hidden_irreps": hidden,
        "MLP_irreps": o3.Irreps(hp["MLP_irreps"]), "atomic_energies": e0 if len(heads) > 1 else e0[0],
        "avg_num_neighbors": 40.0, "atomic_numbers": ELEMENTS, "correlation": hp["correlation"],
        "gate": torch.nn.functional.silu, "pair_repulsion": hp["pair_repulsion"],
        "distance_transform": hp["distance_transform"], "radial_MLP": hp["radial_MLP"],
        "radial_type": hp["radial_type"], "heads": heads}
    with torch_tools.default_dtype("float64"):
        torch.manual_seed(seed)
        if kind == "MACE":
            model = modules.MACE(**kwargs)
        else:
            model = modules.ScaleShiftMACE(atomic_inter_scale=[scale_shift[h][0] for h in heads],
                                           atomic_inter_shift=[scale_shift[h][1] for h in heads], **kwargs)
    torch.save(model.eval(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The released-layout files, as ``$UMLIP_LATENTS_CHECKPOINTS/<key>.model`` (set for the module)."""
    root = tmp_path_factory.mktemp("checkpoints")
    for seed, (key, kind, heads, scale_shift) in enumerate(CASES.values()):
        build_released_mace(root / f"{key}.model", kind, heads, scale_shift, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMLIP_LATENTS_CHECKPOINTS", str(root))
        yield root


def _spec(case: str, head: str | None) -> ModelSpec:
    """The registry entry of ``case``; for a head, the same entry with ``options.head`` set."""
    spec = get_spec(CASES[case][0])
    if head is None:
        return spec
    return ModelSpec(**{**spec.to_dict(), "options": {**spec.options, "head": head}})


@pytest.fixture(scope="module")
def features(checkpoints, crystals):
    """``get(case, head, layer) -> (FeatureSet, maps, n)``: :func:`transformed_variants` of ``crystals``
    (``n`` structures, ``maps`` back to the base atoms) followed by the squeezed crystals, extracted once each."""
    cache = {}

    def get(case, head, layer):
        if (case, head, layer) not in cache:
            structures, maps = transformed_variants(crystals)
            fs = extract_features(_spec(case, head), structures + squeezed_crystals(), layer=layer, device="cpu")
            cache[case, head, layer] = (fs, maps, len(structures))
        return cache[case, head, layer]

    return get


def _calculator(root, case, head):
    from mace.calculators import MACECalculator

    key, _, heads, _ = CASES[case]
    kwargs = {"head": head or "Default"} if len(heads) > 1 else {}
    return MACECalculator(model_paths=str(root / f"{key}.model"), device="cpu", default_dtype="float64",
                          **kwargs)


def _rows(fs, i):
    return np.asarray(fs.values[fs.structure_index == i], dtype=np.float64)


def _check_energies(fs, calc, rows, structures, label):
    """Blocks and widths of the last layer; re-read and model energies of ``rows`` = MACECalculator's."""
    assert [b.name for b in fs.blocks] == ["interaction_0_scalars", "readout_mlp_hidden", "zbl_pair_energy"]
    assert fs.dim == RELEASED["channels"] + 16 + 1
    n = np.bincount(fs.structure_index)
    reread = fs.reread_energy()
    for k, atoms in zip(rows, structures):
        atoms = atoms.copy()
        atoms.calc = calc
        ref = atoms.get_potential_energy()
        assert abs(reread[k] - ref) / n[k] <= ENERGY_TOL, f"{label} {atoms.info['structure_id']}: " \
            f"re-read {reread[k]:.6f} vs MACECalculator {ref:.6f} eV"
        assert abs(fs.energy[k] - ref) / n[k] <= ENERGY_TOL


def _check_descriptors(fs, calc, crystals):
    """The backbone of the first structures = ``MACECalculator.get_descriptors(invariants_only=True)``."""
    assert [b.name for b in fs.blocks] == ["interaction_0_invariants", "interaction_1_invariants"]
    for k, atoms in enumerate(crystals):
        ref = calc.get_descriptors(atoms, invariants_only=True)
        got = _rows(fs, k)
        assert got.shape == ref.shape == (len(atoms), 2 * RELEASED["channels"])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("case,head", RUNS)
def test_energy_reread_equals_mace_calculator(features, checkpoints, crystals, case, head):
    """Energy re-read from the last-layer features = MACECalculator's energy, ZBL included."""
    fs, _, n_variants = features(case, head, "last")
    assert fs.meta["model"] == CASES[case][0]
    rows = list(range(len(crystals))) + [n_variants, n_variants + 1]  # the crystals and the squeezed ones
    _check_energies(fs, _calculator(checkpoints, case, head), rows, list(crystals) + squeezed_crystals(), f"{case}/{head}")
    squeezed = np.isin(fs.structure_index, rows[-2:])
    assert (fs.values[squeezed, -1] > 1e-3).all(), "the squeezed crystals must switch the ZBL column on"
    # the readout is not trivially satisfied: shifting the features changes the energy
    shifted = fs.readout.atom_energies(np.asarray(fs.values) + 1.0, fs.species)
    assert not np.allclose(np.bincount(fs.structure_index, shifted), fs.energy, atol=1e-3)


def test_registry_head_option_selects_the_head(features):
    """The two heads of one file give different energies; no ``options.head`` takes its ``Default`` head."""
    pt, _, _ = features("mpa-0-two-heads", "pt_head", "last")
    default, _, _ = features("mpa-0-two-heads", "Default", "last")
    assert np.abs(pt.energy - default.energy).min() > 1e-3
    unset, _, _ = features("mpa-0-two-heads", None, "last")
    np.testing.assert_array_equal(unset.values, default.values)
    np.testing.assert_array_equal(unset.energy, default.energy)


@pytest.mark.parametrize("case,head", FILES)
def test_backbone_equals_mace_get_descriptors(features, checkpoints, crystals, case, head):
    fs, _, _ = features(case, head, "backbone")
    _check_descriptors(fs, _calculator(checkpoints, case, head), crystals)


@pytest.mark.parametrize("layer", ["last", "backbone"])
@pytest.mark.parametrize("case,head", FILES)
def test_invariances(features, case, head, layer):
    """Rotation, translation, permutation and supercell copies give the base atoms' features; a nudge does not."""
    tol = get_family("mace").tolerance
    fs, maps, _ = features(case, head, layer)
    n = np.bincount(fs.structure_index)
    seen = set()
    for kind, base, copy, idx in maps:
        ref, got = _rows(fs, base), _rows(fs, copy)
        err = float(np.linalg.norm(got - ref[idx]) / np.linalg.norm(ref))
        if kind == "nudged":
            assert err >= 3 * tol, f"{case} {layer}: nudged copy of {base} changes only {err:.2e}"
            continue
        seen.add(kind)
        assert err <= tol, f"{case} {layer}: {kind} copy of {base} differs by {err:.2e} (relative)"
        per_atom = abs(fs.energy[copy] / n[copy] - fs.energy[base] / n[base])
        assert per_atom <= 10 * ENERGY_TOL, f"{case}: {kind} copy of {base} energy differs by {per_atom:.2e} eV/atom"
    assert seen == {"rotated", "translated", "permuted", "supercell"}

