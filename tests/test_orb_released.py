"""ORB v3 in its released layout, against orb-models' own ASE calculator (``orb`` environment).

The adapter reads ORB's energy by calling the GNN and the energy head itself
(:mod:`umlip_latents.extract.orb`); here that reading is checked against
``orb_models.forcefield.calculator.ORBCalculator`` (the regressor's own ``predict``) on the
same weights and structures.

Models
------
* ``orb-v3-conservative-inf-omat``: orb-models' own ``orb_v3_conservative_architecture``
  with its defaults, which are the released sizes (latent 256, base MLP 1024 x 2, head MLP
  256 x 1, 5 message-passing steps, Bessel 8 / spherical harmonics l <= 3, ZBL pair
  repulsion; ``orb_models/forcefield/pretrained.py`` of orb-models 0.5.5), and the system
  config of that key's builder (``orb_v3_conservative_inf_omat``: radius 6 A, at most 120
  neighbours), random seeded weights (:func:`umlip_latents.testing.build_random_orb`),
  saved as a state dict at ``$UMLIP_LATENTS_CHECKPOINTS/<key>.ckpt``, where the registered
  key finds it and reads it with orb-models' pretrained builder, as a user's download would be.
* the family contract's small random ORB v3 *direct* model, for contrast: its ZBL energy is
  summed over atoms.

ZBL under a supercell: orb-models 0.5.5's conservative regressor adds a ZBL energy
*averaged* over the atoms (``ZBLBasis`` default ``node_aggregation="mean"``; the direct
regressor passes ``"sum"``), so the released conservative models' energy is not extensive in
the repulsion: ORBCalculator gives a 2x1x1 supercell of a squeezed crystal less than twice
the cell's energy, by the cell's repulsion. The adapter's ``pair_repulsion`` column
(``E_rep / n``) must follow the model, so it halves in the supercell; the direct model's column
is the same atom by atom. Both are asserted, each with the calculator's own energies.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import squeezed_crystals
from conftest import test_cache_dir as cache_dir  # aliased: pytest would collect test_*

from umlip_latents.extract import extract_features
from umlip_latents.families import environment_python, get_family
from umlip_latents.registry import ModelSpec, get_spec
from umlip_latents.testing import build_in_environment, contract_model

#: eV/atom
ENERGY_TOL = 1e-5
RELEASED_KEY = "orb-v3-conservative-inf-omat"
MODELS = ["conservative-released", "direct-contract"]

_CALCULATOR_SCRIPT = """
import json, sys
from ase.io import read
from umlip_latents.families import adapter_class
from umlip_latents.registry import ModelSpec

spec = ModelSpec(**json.loads(sys.argv[1]))
cls = adapter_class("orb")
calc = cls.open(spec, "cpu", cls.resolve_checkpoint(spec)).calculator()  # ORBCalculator on the loaded regressor
out = []
for atoms in read(sys.argv[2], ":"):
    atoms.calc = calc
    out.append(float(atoms.get_potential_energy()))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """``orb-v3-conservative-inf-omat`` as a random model of the released architecture, in the checkpoints folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    spec = get_spec(RELEASED_KEY)
    assert spec.source["name"] == RELEASED_KEY  # read by orb-models' pretrained builder of that name
    build_in_environment("orb", "build_random_orb", root / f"{RELEASED_KEY}.ckpt",
                         {"seed": 0, "architecture": "orb_v3_conservative_architecture",
                          "system_config": {"radius": 6.0, "max_num_neighbors": 120}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UMLIP_LATENTS_CHECKPOINTS", str(root))
        yield spec


@pytest.fixture(scope="module")
def models(request):
    def get(name) -> ModelSpec:
        if name == "conservative-released":
            return request.getfixturevalue("released")
        return contract_model("orb", cache_dir())

    return get


@pytest.fixture(scope="module")
def structures(crystals):
    """The crystals and the squeezed crystals, then a 2x1x1 supercell of each (same order)."""
    base = list(crystals) + squeezed_crystals()
    supers = []
    for atoms in base:
        s = atoms.repeat((2, 1, 1))
        s.info["structure_id"] = f"{atoms.info['structure_id']}-2x1x1"
        supers.append(s)
    return base, supers


@pytest.fixture(scope="module")
def results(models, structures, tmp_path_factory):
    """``get(name) -> (FeatureSet of the "last" layer, ORBCalculator energies)`` on base + supercells."""
    from ase.io import write

    cache = {}

    def get(name):
        if name not in cache:
            spec = models(name)
            base, supers = structures
            fs = extract_features(spec, base + supers, layer="last", device="cpu")
            path = tmp_path_factory.mktemp("orb-calc") / "structures.extxyz"
            write(path, base + supers, format="extxyz")
            env = dict(os.environ, UMLIP_LATENTS_ENV="orb", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            proc = subprocess.run([str(environment_python("orb")), "-c", _CALCULATOR_SCRIPT,
                                   json.dumps(spec.to_dict()), str(path)],
                                  capture_output=True, text=True, env=env, check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[name] = (fs, np.array(json.loads(proc.stdout.strip().splitlines()[-1])))
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_energy_reread_equals_orb_calculator(results, structures, name):
    """The energy re-read from the last-layer features = ORBCalculator's, per structure, ZBL included."""
    fs, ref = results(name)
    n = np.bincount(fs.structure_index)
    assert len(ref) == len(n) == sum(map(len, structures))
    err = np.abs(fs.reread_energy() - ref) / n
    assert err.max() <= ENERGY_TOL, f"{name}: re-read vs ORBCalculator {err.max():.2e} eV/atom " \
        f"({fs.structure_ids[int(err.argmax())]})"
    assert (np.abs(fs.energy - ref) / n).max() <= ENERGY_TOL
    squeezed = [fs.structure_ids.index(s.info["structure_id"]) for s in squeezed_crystals()]
    assert (fs.values[np.isin(fs.structure_index, squeezed), -1] > 1e-3).all(), "ZBL must be on when squeezed"


@pytest.mark.parametrize("name", MODELS)
def test_supercell_pair_repulsion_column(results, structures, name):
    """2x1x1 supercells: the structure-level block is the cell's, atom by atom; the ZBL column follows the model.

    Direct (ZBL summed over atoms): the column is the cell's too. Conservative (orb-models
    0.5.5 averages ZBL over atoms): the column is half the cell's, and ORBCalculator's own
    energies show the same missing repulsion.
    """
    fs, ref = results(name)
    tol = get_family("orb").tolerance
    base, _ = structures
    k = len(base)
    n = np.bincount(fs.structure_index)
    conservative = name.startswith("conservative")
    for i, atoms in enumerate(base):
        cell = np.asarray(fs.values[fs.structure_index == i], np.float64)
        sup = np.asarray(fs.values[fs.structure_index == k + i], np.float64)
        idx = np.arange(2 * len(atoms)) % len(atoms)  # ase's repeat appends whole copies of the cell
        err = np.linalg.norm(sup[:, :-1] - cell[idx, :-1]) / np.linalg.norm(cell[:, :-1])
        assert err <= tol, f"{name} {atoms.info['structure_id']}: supercell hidden block differs by {err:.2e}"
        factor = 0.5 if conservative else 1.0
        np.testing.assert_allclose(sup[:, -1], factor * cell[idx, -1], rtol=1e-5, atol=1e-7)
        rep_cell = float(cell[:, -1].sum())  # E_rep of the cell
        missing = ref[k + i] - 2 * ref[i]  # what the model's own energy lacks for extensivity
        expected = -rep_cell if conservative else 0.0
        assert abs(missing - expected) <= ENERGY_TOL * n[k + i], \
            f"{name} {atoms.info['structure_id']}: ORBCalculator E(2x1x1) - 2 E(cell) = {missing:.6f}, " \
            f"expected {expected:.6f} eV"
