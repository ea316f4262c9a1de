"""Provenance of a notebook run: package versions, git commit, parameters, models."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from . import paths

PACKAGES = ("umlip-latents", "torch", "numpy", "scipy", "scikit-learn", "skmatter", "ase", "mace-torch",
            "chgnet", "diep", "e3nn", "pandas")


def git_commit() -> str:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        root = paths.project_root()
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(packages=PACKAGES) -> dict:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info() -> dict:
    """Where and when a measurement ran: UTC time, git commit, CPU, logical cores, torch threads.

    Benchmarks put this in their reports, so a committed reference report says which code and
    machine made its numbers.
    """
    import datetime
    import os

    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "git_commit": git_commit(), "cpu": cpu_model(), "logical_cores": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def environment_versions(models) -> dict:
    """``{environment: {package: version}}`` of the models that run outside the main environment."""
    from .errors import ModelUnavailable
    from .registry import get_spec
    from .store import family_versions

    out: dict = {}
    for key in models or []:
        try:
            spec = get_spec(key)
        except ModelUnavailable:
            continue  # e.g. a model built in the notebook itself: it runs in this environment
        if spec.environment != "main":
            out.setdefault(spec.environment, {}).update(family_versions(spec))
    return out


def provenance(parameters: dict, models: list | None = None, extra_envs: dict | None = None) -> dict:
    """Everything needed to say which code, packages, parameters and models made a result.

    ``family_environments`` holds the versions of the packages of models that ran in another
    environment (read from that environment), unless ``extra_envs`` gives them.
    """
    return {"git_commit": git_commit(), "versions": versions(), "parameters": parameters,
            "models": list(models or []),
            "family_environments": environment_versions(models) if extra_envs is None else extra_envs}
