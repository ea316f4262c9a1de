"""Per-atom latent features of registered models: :func:`extract_features`.

One adapter module per family behind the interface of :mod:`umlip_latents.extract.base`; which
module, and which environment, is the family's row of ``models/families.yml``
(:mod:`umlip_latents.families`). A family whose environment is not the one running (e.g.
SevenNet, which needs ``e3nn>=0.5`` while mace-torch pins ``e3nn==0.4.4``) runs in its own
virtual environment through :func:`umlip_latents.extract.worker.call`.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

from ..datasets import MIN_DISTANCE
from ..errors import ModelUnavailable
from ..features import FeatureSet
from ..registry import ModelSpec, get_spec, local_checkpoint
from ..families import adapter_class
from .base import Adapter, resolve_device, run_adapter

#: environment variable naming the environment this process runs in (set by the worker).
ENV_VAR = "UMLIP_LATENTS_ENV"


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


def loaded_adapter(spec: ModelSpec, device: str = "auto") -> Adapter:
    """:func:`load_adapter` in this process, reused across calls while the checkpoint file is unchanged."""
    ckpt = local_checkpoint(spec)
    stamp = f"{ckpt}:{ckpt.stat().st_size}:{ckpt.stat().st_mtime_ns}" if ckpt else ""
    return _cached_adapter(json.dumps(spec.to_dict(), sort_keys=True), resolve_device(device), stamp)


def extract_features(model_key: str | ModelSpec, structures: list, layer: str = "last", device: str = "auto",
                     batch_size: int | None = None, on_unsupported: str = "raise",
                     workers: int | str = 1, timeout: float | None = None,
                     min_distance: float | None = MIN_DISTANCE) -> FeatureSet:
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
    timeout
        Seconds a family-environment worker may take before it is killed and the call fails
        (default: :func:`umlip_latents.extract.worker.default_timeout`, scaled to the atoms;
        ``$UMLIP_LATENTS_WORKER_TIMEOUT`` overrides it). Unused in the running environment.
    min_distance
        Closest approach (Å) of two atoms (minimum image) accepted before the model runs
        (:data:`~umlip_latents.datasets.MIN_DISTANCE`); ``None`` checks no distances.

    Returns
    -------
    FeatureSet
        ``values`` of shape (n_atoms, D) in float32, with the model's energy prediction of
        the same pass and, for ``layer="last"``, its readout weights.

    Raises
    ------
    StructureError
        For a malformed structure (atoms closer than ``min_distance``, a broken cell ...) or an
        id given twice, before any model runs.
    NonFiniteFeatures
        When the model returns a NaN or infinite feature or energy.
    """
    spec = get_spec(model_key)
    if spec.environment != current_environment():
        from .worker import run_in_environment

        return run_in_environment(spec, structures, layer=layer, device=device, batch_size=batch_size,
                                  on_unsupported=on_unsupported, workers=workers, timeout=timeout,
                                  min_distance=min_distance)
    adapter = loaded_adapter(spec, device)
    return run_adapter(adapter, structures, layer=layer, batch_size=batch_size, on_unsupported=on_unsupported,
                       workers=workers, min_distance=min_distance)


def availability(model: str | ModelSpec) -> tuple[bool, str]:
    """Whether ``model``'s weights can be had here without downloading, and why (never downloads).

    Asked of the family's adapter in the model's own environment (:func:`worker.call`); a
    missing environment or package is a reason, not an error.
    """
    spec = get_spec(model)
    if spec.environment == current_environment():
        try:
            return adapter_class(spec.family).availability(spec)
        except ImportError as exc:
            return False, f"{spec.family} not importable in this environment ({exc}); run `make setup`"
    from .worker import call

    try:
        answer = call(spec.environment, "availability", {"spec": spec.to_dict()})
    except ModelUnavailable as exc:
        return False, str(exc)
    return answer["available"], f"{answer['why']} (environment {spec.environment})"


def models_table(derived: bool = False) -> list[dict]:
    """One row per registered model: key, family, environment, source, training data, availability.

    With ``derived``, also the models fine-tuning runs made (``finetune_dir()/*/models.yml``);
    the analyses' model panels leave them out.
    """
    from ..registry import load_registry

    rows = []
    for key, spec in sorted(load_registry(derived=derived).items()):
        ok, why = availability(spec)
        rows.append({"key": key, "family": spec.family, "environment": spec.environment,
                     "source": spec.source["kind"], "training_data": spec.training_data,
                     "functional": spec.functional, "available": ok, "why": why})
    return rows


__all__ = ["extract_features", "load_adapter", "adapter_class", "FeatureSet", "current_environment", "loaded_adapter",
           "availability", "models_table"]
