"""UMA-S-1.1 at its released sizes: a random fairchem UMA in the released layout, placed as a user would.

The registered UMA entries (``models/uma.yml``) are the five task heads of one checkpoint,
``uma-s-1p1.pt``, from a gated repository that cannot be reached here. This module builds a
random model of the released sizes with fairchem's own classes
(:func:`umlip_latents.testing.build_random_uma`: ``HydraModel`` with an ``eSCNMDMoeBackbone``
and one ``MLP_EFS_Head`` shared by the tasks through ``DatasetSpecificSingleHeadWrapper``, saved
as an ``MLIPInferenceCheckpoint``), places it as ``$UMLIP_LATENTS_CHECKPOINTS/uma-s-1p1.pt``
(the entries' ``source.filename``) and reads every registered task through
:func:`umlip_latents.extract.extract_features`; fairchem's own ASE calculator
(``FAIRChemCalculator.from_model_checkpoint``) on the same file gives the reference energies.

Released hyperparameters and where they come from (fairchem, ``configs/uma/training_release``):

- ``backbone/K4L2.yaml`` (UMA-S's backbone): ``sphere_channels`` 128, ``lmax`` 2, ``mmax`` 2,
  ``edge_channels`` 128, ``num_distance_basis`` 64 (gaussian), ``num_layers`` 4,
  ``hidden_channels`` 128, ``norm_type`` rms_norm_sh, ``act_type`` gate, ``ff_type`` spectral,
  ``chg_spin_emb_type`` rand_emb, ``use_composition_embedding``, ``max_num_elements`` 100. (The
  stored version also has a solvent embedding, which fairchem-core 2.24's backbone does not
  take: it belongs to a later UMA.)
- ``uma_sm_direct_pretrain.yaml`` (UMA-S pre-training): ``num_moe_experts`` 32 (MoLE),
  ``cutoff_radius`` 6, ``normalizer_rmsd`` 1.423, the five data sets.
- ``uma_sm_conserve_finetune.yaml`` (the conserving fine-tune UMA-S is released from):
  ``max_neighbors`` 300, ``cutoff_radius`` 6, and the head: ``DatasetSpecificSingleHeadWrapper``
  around ``MLP_EFS_Head`` (``wrap_property`` false) for omol, omat, oc20, omc and odac.

The build (146 566 817 parameters over the 32 experts, checked by the test, and their EMA copy: a
checkpoint of about 1.2 GB) is not cached: it is written to a temporary folder each run. The test takes longer than a
minute on one CPU thread, so it runs outside the default suite (``slow``); ``tests/test_uma.py``
runs the same layout at small sizes in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from umlip_latents import testing
from umlip_latents.extract import extract_features
from umlip_latents.extract.worker import pack_structures
from umlip_latents.families import environment_python
from umlip_latents.registry import load_registry

#: UMA-S-1.1's backbone (sources in the module docstring)
RELEASED = dict(sphere_channels=128, lmax=2, mmax=2, edge_channels=128, num_distance_basis=64,
                distance_function="gaussian", num_layers=4, hidden_channels=128, num_experts=32, cutoff=6.0,
                max_neighbors=300, max_num_elements=100, norm_type="rms_norm_sh", act_type="gate",
                ff_type="spectral", chg_spin_emb_type="rand_emb", use_composition_embedding=True)
#: parameters fairchem-core 2.24 builds for these sizes (all experts; the MoLE mixes them per system)
RELEASED_PARAMETERS = 146_566_817
TYPES = [1, 3, 8, 11, 12, 14, 17, 29]
#: eV/atom
TOL = 1e-5

REFERENCE = """
import json, sys
from fairchem.core import FAIRChemCalculator
from umlip_latents.extract.worker import unpack_structures

path, tasks = sys.argv[1], json.loads(sys.argv[3])
structures = unpack_structures(sys.argv[2])
out = {}
for task in tasks:
    calc = FAIRChemCalculator.from_model_checkpoint(path, task_name=task, inference_settings="batch", device="cpu")
    energies = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        energies.append(float(atoms.get_potential_energy()))
    out[task] = energies
backbone = calc.predictor.model.module.backbone
out["layout"] = {"parameters": sum(p.numel() for p in calc.predictor.model.module.parameters()),
                 **{k: getattr(backbone, k) for k in ("sphere_channels", "lmax", "mmax", "num_layers", "cutoff",
                                                      "hidden_channels", "num_experts", "max_neighbors")}}
print(json.dumps(out))
"""


def _run_uma(script: str, *args, env: dict) -> dict:
    """Run ``script`` in the uma environment; it prints one JSON line last."""
    child = dict(os.environ, UMLIP_LATENTS_ENV="uma", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **env)
    proc = subprocess.run([str(environment_python("uma")), "-c", script, *args], capture_output=True, text=True,
                          env=child)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_energy_reread_equals_fairchem_calculator(crystals, tmp_path, monkeypatch):
    """Every registered task of a released-size UMA-S-1.1 placed as ``uma-s-1p1.pt``: the energy re-read
    from the last-layer features is the model's energy and fairchem's calculator's (<= 1e-5 eV/atom)."""
    specs = [s for s in load_registry(derived=False).values() if s.family == "uma"]
    tasks = [s.options["task"] for s in specs]
    assert sorted(tasks) == sorted(testing.UMA_TASKS)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    path = checkpoints / specs[0].source["filename"]
    refs = {t: {z: -1.0 - 0.3 * i - 0.1 * k for i, z in enumerate(TYPES)} for k, t in enumerate(tasks)}
    testing.build_in_environment("uma", "build_random_uma", path,
                                 dict(RELEASED, seed=0, tasks=list(testing.UMA_TASKS), reference_energies=refs,
                                      rmsd=1.423))
    offline = {"HF_HUB_OFFLINE": "1", "FAIRCHEM_CACHE_DIR": str(tmp_path / "fairchem"),
               "UMLIP_LATENTS_CHECKPOINTS": str(checkpoints)}
    for k, v in offline.items():
        monkeypatch.setenv(k, v)
    pack_structures(crystals, tmp_path / "structures.npz")
    reference = _run_uma(REFERENCE, str(path), str(tmp_path / "structures.npz"), json.dumps(tasks), env=offline)
    layout = reference.pop("layout")
    assert {k: layout[k] for k in ("sphere_channels", "lmax", "mmax", "num_layers", "hidden_channels",
                                   "num_experts", "max_neighbors")} == \
        {k: RELEASED[k] for k in ("sphere_channels", "lmax", "mmax", "num_layers", "hidden_channels",
                                  "num_experts", "max_neighbors")}
    assert layout["cutoff"] == RELEASED["cutoff"]
    assert layout["parameters"] == RELEASED_PARAMETERS
    n = np.array([len(a) for a in crystals])
    energies = {}
    for spec in specs:
        fs = extract_features(spec, crystals, layer="last", device="cpu")
        task = spec.options["task"]
        reread = fs.reread_energy()
        err = np.abs(reread - fs.energy) / n
        assert err.max() <= TOL, f"{task}: energy re-read error {err.max():.2e} eV/atom"
        err = np.abs(reread - np.array(reference[task])) / n
        assert err.max() <= TOL, f"{task}: re-read energy differs from fairchem's calculator by {err.max():.2e} eV/atom"
        assert fs.values.shape[1] == RELEASED["hidden_channels"]
        energies[task] = fs.energy
    # the tasks are not one model: their energies differ (dataset embedding, expert mixture, references)
    assert min(np.abs(energies[a] - energies[b]).max() for a in tasks for b in tasks if a < b) > 1e-3
