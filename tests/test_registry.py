"""Model registry: schema, required panel, availability reporting."""

from __future__ import annotations

import pytest
import yaml

from umlip_latents import registry
from umlip_latents.errors import ModelUnavailable, RegistryError

OFFLINE_PANEL = {"chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan", "sevennet-0", "sevennet-0-22may2024",
                 "sevennet-l3i5", "sevennet-mf-0", "diep"}
MACE = {"mace-mp-0b3-medium", "mace-mp-0a-small", "mace-mp-0a-medium", "mace-mp-0a-large", "mace-off23-small",
        "mace-off23-medium", "mace-off23-large", "mace-matpes-pbe", "mace-matpes-r2scan", "mace-omat-0-medium"}


def test_every_registry_file_follows_the_schema():
    reg = registry.load_registry(derived=False)
    assert OFFLINE_PANEL | MACE <= set(reg)
    for key in OFFLINE_PANEL:
        assert reg[key].source["kind"] == "wheel", key
    for key in MACE:
        assert reg[key].source["kind"] == "loader" and reg[key].family == "mace", key
    for spec in reg.values():
        assert spec.parent is None or spec.parent in reg, spec.key
        assert spec.description, spec.key
    assert "modal" in reg["sevennet-mf-0"].options


@pytest.mark.parametrize("broken, problem", [
    ({"family": "nope"}, "family"),
    ({"source": {"kind": "wheel"}}, "needs 'package'"),
    ({"layers": {"middle": "x"}}, "layers"),
    ({"colour": "red"}, "unknown keys"),
])
def test_schema_rejects_bad_entries(tmp_path, broken, problem):
    good = {"key": "x", "family": "chgnet", "environment": "main",
            "source": {"kind": "wheel", "package": "chgnet", "name": "0.3.0"},
            "training_data": "MPtrj", "functional": "PBE", "layers": {"last": "a"}}
    (tmp_path / "x.yml").write_text(yaml.safe_dump({**good, **broken}))
    with pytest.raises(RegistryError, match=problem):
        registry.load_registry(tmp_path)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ModelUnavailable, match="chgnet-0.3.0"):
        registry.get_spec("no-such-model")


def test_missing_mace_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    from umlip_latents.extract import adapter_class

    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no mace download cache either
    spec = registry.get_spec("mace-mp-0b3-medium")
    ok, why = adapter_class("mace").availability(spec)
    assert not ok and spec.source["filename"] in why
