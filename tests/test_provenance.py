"""Provenance of a notebook run names the code, the packages (of every environment used) and the inputs."""

from __future__ import annotations

import re

import pytest

from umlip_latents.provenance import provenance


@pytest.mark.envs
def test_provenance_records_other_environments():
    out = provenance({"seed": 0}, models=["chgnet-0.3.0", "sevennet-0", "built-in-the-notebook"])
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", out["git_commit"])
    assert out["versions"]["torch"] and out["versions"]["chgnet"]
    assert out["parameters"] == {"seed": 0}
    assert out["models"] == ["chgnet-0.3.0", "sevennet-0", "built-in-the-notebook"]
    # SevenNet runs in its own environment: its version is read from there, not from this one
    assert set(out["family_environments"]) == {"sevenn"}
    assert re.fullmatch(r"\d+\.\d+.*", out["family_environments"]["sevenn"]["sevenn"])
    assert provenance({}, models=["sevennet-0"], extra_envs={"x": {}})["family_environments"] == {"x": {}}
