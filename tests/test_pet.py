"""The PET adapter (``pet`` environment): what is specific to PET beyond the family contract.

The contract (``tests/test_family_contract.py``) runs a small random PET
(:data:`umlip_latents.testing.CONTRACT_MODELS`); here: the registered checkpoints offline.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import extract_features
from umlip_latents.families import environment_python
from umlip_latents.registry import load_registry


def _pet_env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="pet", **(extra or {}))


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals):
    """Every registered PET is a upet loader entry; offline each raises ModelUnavailable naming the file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    specs = [s for s in load_registry(derived=False).values() if s.family == "pet"]
    assert len(specs) >= 9 and all(s.source["kind"] == "loader" and s.source["package"] == "upet" for s in specs)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
    script = ("import json, sys\nfrom umlip_latents.errors import ModelUnavailable\n"
              "from umlip_latents.families import adapter_class\nfrom umlip_latents.registry import get_spec\n"
              "out = {}\nfor key in sys.argv[1:]:\n    try:\n        out[key] = 'loaded ' + adapter_class('pet').resolve_checkpoint(get_spec(key))\n"
              "    except ModelUnavailable as exc:\n        out[key] = str(exc)\nprint(json.dumps(out))\n")
    proc = subprocess.run([str(environment_python("pet")), "-c", script, *[s.key for s in specs]], check=True,
                          capture_output=True, text=True, env=_pet_env())
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec in specs:
        assert spec.source["filename"] in messages[spec.key] and "checkpoints folder" in messages[spec.key], spec.key
