"""The pins are in one place: environment.yml agrees with requirements/main.txt."""

from __future__ import annotations

import yaml

from umlip_latents import paths


def _pins(lines):
    return {ln.split("==")[0].strip().lower(): ln.split("==")[1].strip() for ln in lines if "==" in ln}


def test_environment_yml_agrees_with_pip_pins():
    root = paths.project_root()
    req = [ln.split("#")[0].strip() for ln in (root / "requirements" / "main.txt").read_text().splitlines()]
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(req) == _pins(pip_section)
    assert "python=3.11" in env["dependencies"]
    assert _pins(req)["torch"] == "2.13.0"


def test_family_environments_pin_torch():
    for path in (paths.project_root() / "requirements").glob("*.txt"):
        pins = _pins(path.read_text().splitlines())
        assert pins.get("torch") == "2.13.0", path.name


def test_installed_versions_match_pins():
    from importlib.metadata import version

    req = (paths.project_root() / "requirements" / "main.txt").read_text().splitlines()
    for name, pin in _pins(req).items():
        assert version(name).split("+")[0] == pin, name
