"""Per-atom latent features of registered models: :func:`extract_features`.

One adapter module per family (``mace``, ``chgnet``, ``sevenn``, ``diep``, ``pet``, ``uma``,
``dpa``, ``mattersim``, ``orb``) behind the interface of :mod:`umlip_latents.extract.base`. A
family whose environment is not the one running (e.g. SevenNet, which needs ``e3nn>=0.5`` while
mace-torch pins ``e3nn==0.4.4``) runs in its own virtual environment through
:mod:`umlip_latents.extract.worker`.
"""

from __future__ import annotations

import importlib
import json
import os
from functools import lru_cache

from ..errors import ModelUnavailable
from ..features import FeatureSet
from ..registry import ModelSpec, get_spec, local_checkpoint
from .base import Adapter, resolve_device, run_adapter

ADAPTERS = {
    "mace": "umlip_latents.extract.mace:MaceAdapter",
    "chgnet": "umlip_latents.extract.chgnet:ChgnetAdapter",
    "sevenn": "umlip_latents.extract.sevenn:SevennAdapter",
    "diep": "umlip_latents.extract.diep:DiepAdapter",
    "pet": "umlip_latents.extract.pet:PetAdapter",
    "uma": "umlip_latents.extract.uma:UmaAdapter",
    "dpa": "umlip_latents.extract.dpa:DpaAdapter",
    "mattersim": "umlip_latents.extract.mattersim:MattersimAdapter",
    "orb": "umlip_latents.extract.orb:OrbAdapter",
}

#: environment variable naming the environment this process runs in (set by the worker).
ENV_VAR = "UMLIP_LATENTS_ENV"


def adapter_class(family: str) -> type[Adapter]:
    """The adapter class of a family (imports its module, and so the family's package)."""
    module, name = ADAPTERS[family].split(":")
    return getattr(importlib.import_module(module), name)


def current_environment() -> str:
    """Name of the environment this process runs in (``main`` unless a worker says otherwise)."""
    return os.environ.get(ENV_VAR, "main")


def load_adapter(model: str | ModelSpec, device: str = "auto") -> Adapter:
    """Load a model in this process (its family's package must be importable here)."""
    spec = get_spec(model)
    try:
        cls = adapter_class(spec.family)
    except ImportError as exc:
        raise ModelUnavailable(
            f"model {spec.key}: the {spec.family} package cannot be imported in environment "
            f"{current_environment()!r} ({exc}); run `make setup` or use environment {spec.environment!r}"
        ) from exc
    return cls.load(spec, resolve_device(device))


@lru_cache(maxsize=4)
def _cached_adapter(spec_json: str, device: str, stamp: str = "") -> Adapter:
    """Loaded adapters, reused across calls (e.g. the shards of one store entry).

    ``stamp`` identifies the checkpoint file (size, mtime) so a rewritten file reloads.
    """
    return load_adapter(ModelSpec(**json.loads(spec_json)), device)


def extract_features(model_key: str | ModelSpec, structures: list, layer: str = "last", device: str = "auto",
                     batch_size: int | None = None, on_unsupported: str = "raise",
                     workers: int | str = 1) -> FeatureSet:
    """Per-atom features of ``model_key`` on ``structures``.

    Parameters
    ----------
    model_key
        A registry key (``umlip-latents models list``) or a :class:`ModelSpec`.
    structures
        ``ase.Atoms`` objects; ``info["structure_id"]`` names each in errors and outputs.
    layer
        ``"last"``: the vector each per-atom energy is read from linearly; ``"backbone"``:
        the node features entering the readout. What each family takes is documented in its
        adapter module and recorded in ``FeatureSet.blocks``.
    device
        ``"auto"`` (GPU when visible), ``"cpu"``, ``"cuda"`` ...
    batch_size
        Atoms per forward pass (default: the adapter's).
    on_unsupported
        ``"raise"`` (default) or ``"skip"`` structures holding elements the model lacks.
    workers
        CPU worker processes of one thread each (``"auto"``: one per core); the batches and
        so the features are those of ``workers=1``. Ignored (1) on a GPU with ``"auto"``.

    Returns
    -------
    FeatureSet
        ``values`` of shape (n_atoms, D) in float32, with the model's energy prediction of
        the same pass and, for ``layer="last"``, its readout weights.
    """
    spec = get_spec(model_key)
    if spec.environment != current_environment():
        from .worker import run_in_environment

        return run_in_environment(spec, structures, layer=layer, device=device,
                                  batch_size=batch_size, on_unsupported=on_unsupported, workers=workers)
    ckpt = local_checkpoint(spec)
    stamp = f"{ckpt}:{ckpt.stat().st_size}:{ckpt.stat().st_mtime_ns}" if ckpt else ""
    adapter = _cached_adapter(json.dumps(spec.to_dict(), sort_keys=True), resolve_device(device), stamp)
    return run_adapter(adapter, structures, layer=layer, batch_size=batch_size, on_unsupported=on_unsupported,
                       workers=workers)


__all__ = ["extract_features", "load_adapter", "adapter_class", "FeatureSet", "ADAPTERS"]
