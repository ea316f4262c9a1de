"""The batched energy-only pass is the real model: its energies equal the package's own ASE calculator."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import offline_panel

from umlip_latents.checks import calculator_energies
from umlip_latents.extract import load_adapter
from umlip_latents.extract.base import run_adapter
from umlip_latents.registry import get_spec

MAIN_ENV = [k for k in offline_panel() if get_spec(k).environment == "main"] + ["test-mace"]


@pytest.mark.parametrize("key", MAIN_ENV)
def test_energy_equals_package_calculator(key, request, crystals):
    spec = request.getfixturevalue("trained_mace") if key == "test-mace" else get_spec(key)
    adapter = load_adapter(spec, "cpu")
    fs = run_adapter(adapter, crystals, layer="last")
    ref = calculator_energies(adapter.calculator(), crystals)
    n = np.array([len(a) for a in crystals])
    assert np.max(np.abs(fs.energy - ref) / n) < 1e-5
