"""The MatterSim adapter (``mattersim`` environment): what is specific beyond the family contract.

The contract (``tests/test_family_contract.py``) runs a small random M3GNet; here: the
registered checkpoints offline.
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


def _env(extra=None):
    return dict(os.environ, UMLIP_LATENTS_ENV="mattersim", **(extra or {}))


def test_registered_checkpoints_offline_say_how_to_fix(monkeypatch, tmp_path, crystals):
    """Every registered MatterSim is a mattersim loader entry; offline each raises ModelUnavailable naming the file."""
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no mattersim download cache either
    specs = [s for s in load_registry(derived=False).values() if s.family == "mattersim"]
    assert len(specs) >= 2 and all(s.source["kind"] == "loader" and s.source["package"] == "mattersim" for s in specs)
    with pytest.raises(ModelUnavailable) as err:
        extract_features(specs[0], crystals[:1], device="cpu")
    assert specs[0].source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)
    script = ("import json, sys\nfrom umlip_latents.errors import ModelUnavailable\n"
              "from umlip_latents.families import adapter_class\n"
              "from umlip_latents.registry import get_spec\n"
              "out = {}\nfor key in sys.argv[1:]:\n    try:\n        out[key] = 'loaded ' + adapter_class('mattersim').resolve_checkpoint(get_spec(key))\n"
              "    except ModelUnavailable as exc:\n        out[key] = str(exc)\nprint(json.dumps(out))\n")
    proc = subprocess.run([str(environment_python("mattersim")), "-c", script, *[s.key for s in specs]], check=True,
                          capture_output=True, text=True, env=_env())
    messages = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec in specs:
        assert spec.source["filename"] in messages[spec.key] and "checkpoints folder" in messages[spec.key], spec.key


def test_a_checkpoint_in_mattersims_own_cache_is_available(monkeypatch, tmp_path):
    """The main process asks the adapter in its environment, so mattersim's cache counts (it did not once)."""
    from umlip_latents.extract import availability

    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = next(s for s in load_registry(derived=False).values() if s.family == "mattersim")
    assert not availability(spec)[0]
    cache = tmp_path / ".local" / "mattersim" / "pretrained_models"
    cache.mkdir(parents=True)
    (cache / spec.source["filename"]).write_bytes(b"placeholder")
    ok, why = availability(spec)
    assert ok and "mattersim cache" in why and spec.source["filename"] in why, why
