"""The adapter interface every model family implements, and the batching driver around it.

An adapter wraps one loaded model. It runs **batched, energy-only** forward passes (no
force/backward pass) and returns, for each atom, the features of the requested layer plus
the model's own energy prediction from the same pass. For ``layer="last"`` it also exposes
the model's readout as an explicit affine map (:class:`~umlip_latents.features.Readout`),
derived from the model's own modules, so energies can be re-read from stored features.
"""

from __future__ import annotations

import abc
import importlib
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from .. import paths
from ..datasets import sha256_file as file_sha256
from ..datasets import MIN_DISTANCE, structure_ids, validate_structure
from ..errors import DeviceError, ModelUnavailable, UnsupportedElement
from ..families import get_family
from ..features import Block, FeatureSet, Readout
from ..registry import ModelSpec, local_checkpoint


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names are checked.

    Raises
    ------
    DeviceError
        For a name torch does not know, or a ``cuda``/``cuda:N``/``mps`` device absent here.
    """
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise DeviceError(f"device {device!r}: this machine has {count} visible GPU(s) (torch "
                              f"{torch.__version__}); use --device cpu, or auto to take a GPU when there is one")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r}: no MPS device here; use cpu or auto")
    elif parsed.type != "cpu":
        raise DeviceError(f"device {device!r}: only cpu, cuda[:N] and mps are supported")
    return device


class Adapter(abc.ABC):
    """One loaded model of a family. Subclasses live in ``extract/<family>.py``.

    Written once here: where a checkpoint is found (:meth:`find_checkpoint`: the wheel, the
    checkpoints folder, the package's own cache) or downloaded (:meth:`resolve_checkpoint`),
    whether a model can be had offline and why not (:meth:`availability`), loading with errors
    wrapped into :class:`ModelUnavailable` saying how to fix them (:meth:`load`), package
    versions, the checkpoint's sha256 and the per-species readout (:func:`species_readout`).
    A family adapter keeps its hooks: :meth:`open` (build the model from a file),
    :meth:`bundled_checkpoint`, :meth:`cached_checkpoint` and :meth:`download_checkpoint`
    where its package has them, :meth:`forward` and :meth:`readout`.
    """

    #: the family's row of ``models/families.yml``, set by :func:`umlip_latents.families.adapter_class`
    family = None
    #: atoms per forward pass when the caller gives no batch size, on a CPU and on a GPU. On a
    #: CPU the work is compute-bound and batching buys little, while large batches are slower
    #: (their edge tensors leave the caches): on 100 structures of the default set, SevenNet-0
    #: took 6.0 s in batches of 50 atoms and 12.2 s in batches of 2000, DIEP 15.3 s and 23.0 s,
    #: CHGNet 3.4 s (500) and 4.2 s (2000), one thread. On a GPU large batches amortise kernel
    #: launches. (CHGNet and MACE take 500 / 8000; SevenNet and DIEP 100 on a CPU.)
    default_batch_atoms = 1000
    default_batch_atoms_gpu = 4000

    def __init__(self, spec: ModelSpec, device: str, path=None):
        self.spec = spec
        self.device = device
        if self.family is None:  # a class used without umlip_latents.families.adapter_class
            self.family = get_family(spec.family)
        #: the checkpoint file (or folder) the weights came from, when there is one
        self.path = path
        self._sha256 = None

    # -- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def bundled_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """The checkpoint a ``wheel`` entry names, inside the installed package (hook)."""
        return None

    @classmethod
    def cached_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """The package's own download cache's copy of a ``loader`` entry's checkpoint (hook)."""
        return None

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        """Download a ``loader`` entry's checkpoint with the package's own loader; its path (hook).

        Any exception becomes a :class:`ModelUnavailable` saying where to put the file.
        """
        raise NotImplementedError(f"{cls.__name__} has no download")

    @classmethod
    def _where(cls, spec: ModelSpec) -> str:
        name = spec.source.get("filename") or spec.source.get("path")
        return f"the checkpoints folder ($UMLIP_LATENTS_CHECKPOINTS = {paths.checkpoints_dir()}) as {name!r}"

    @classmethod
    def find_checkpoint(cls, spec: ModelSpec) -> tuple[Path | None, str]:
        """The checkpoint of ``spec`` on this machine, never downloading: ``(path or None, why)``."""
        kind, dist = spec.source["kind"], cls.family.distribution
        if kind == "wheel":
            path = cls.bundled_checkpoint(spec)
            if path is not None:
                return path, f"bundled in the {dist} wheel"
            return None, (f"the installed {dist} has no checkpoint {spec.source['name']!r}; reinstall it in "
                          f"environment {spec.environment!r} (`make setup`)")
        path = local_checkpoint(spec)
        if path is not None:
            return path, f"local checkpoint {path}"
        path = cls.cached_checkpoint(spec) if kind == "loader" else None
        if path is not None:
            return path, f"{dist} cache {path}"
        if kind == "local":
            return None, f"local checkpoint not found; put it in {cls._where(spec)}"
        return None, (f"{dist} downloads {spec.source['name']!r} from {cls.family.origin} on first use (needs "
                      f"internet); offline, put the file in {cls._where(spec)}")

    @classmethod
    def resolve_checkpoint(cls, spec: ModelSpec) -> str:
        """:meth:`find_checkpoint`, else (``loader`` entries) :meth:`download_checkpoint`.

        Raises
        ------
        ModelUnavailable
            When the file is not here and cannot be downloaded, saying where to put it.
        """
        path, why = cls.find_checkpoint(spec)
        if path is not None:
            return str(path)
        if spec.source["kind"] != "loader":
            raise ModelUnavailable(f"model {spec.key}: {why}")
        try:
            return str(cls.download_checkpoint(spec))
        except ModelUnavailable:
            raise
        except Exception as exc:  # each package's downloader raises its own kinds of errors offline
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelUnavailable(
                f"model {spec.key}: {cls.family.distribution} could not download "
                f"{spec.source.get('filename', spec.source['name'])!r} from {cls.family.origin} "
                f"({type(exc).__name__}: {first}); download it where there is internet and put it in "
                f"{cls._where(spec)}") from exc

    @classmethod
    def availability(cls, spec: ModelSpec) -> tuple[bool, str]:
        """Whether the weights can be had here without downloading, and a one-line explanation."""
        if not cls.family.importable():
            return False, (f"package {cls.family.distribution} not importable here; the model runs in "
                           f"environment {spec.environment!r} (`make setup`)")
        path, why = cls.find_checkpoint(spec)
        return path is not None, why

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: ModelSpec, device: str) -> "Adapter":
        """Load the model or raise :class:`~umlip_latents.errors.ModelUnavailable` saying how to fix it."""
        try:
            importlib.import_module(cls.family.import_name)
        except ImportError as exc:
            raise ModelUnavailable(
                f"model {spec.key}: package {cls.family.distribution} not importable ({exc}); it runs in "
                f"environment {spec.environment!r} (`make setup`)") from exc
        path = cls.resolve_checkpoint(spec)
        try:
            return cls.open(spec, device, path)
        except (ModelUnavailable, NotImplementedError):
            raise
        except Exception as exc:  # a corrupt or foreign file: the package's loader raises anything
            raise ModelUnavailable(
                f"model {spec.key}: {cls.family.distribution} cannot load {path} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); is it a complete {cls.family.name} checkpoint? "
                f"Replace it ({cls.family.checkpoints})") from exc

    @classmethod
    @abc.abstractmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "Adapter":
        """Build the adapter from the checkpoint at ``path`` (hook)."""

    # -- the model -----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def supported_elements(self) -> set[int]:
        """Atomic numbers the model can featurise."""

    @abc.abstractmethod
    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        """One batched energy-only pass.

        Returns ``(values, blocks, energy)``: per-atom features (n_atoms, D) in the order of
        the structures and their atoms, the named column blocks, and the model's predicted
        total energy per structure (eV).
        """

    @abc.abstractmethod
    def readout(self) -> Readout:
        """The model's own map from ``layer="last"`` features to per-atom energy."""

    def calculator(self):
        """The family package's own ASE calculator for the same weights (baseline and cross-check)."""
        raise NotImplementedError(f"{type(self).__name__} has no ASE calculator")

    def checkpoint_file(self) -> Path | None:
        """The file whose sha256 identifies the weights (hook; default :attr:`path`)."""
        return Path(self.path) if self.path is not None else None

    def checkpoint_sha256(self) -> str | None:
        """sha256 of :meth:`checkpoint_file`, when there is one (computed once)."""
        if self._sha256 is None and self.checkpoint_file() is not None:
            self._sha256 = file_sha256(self.checkpoint_file())
        return self._sha256

    def versions(self) -> dict:
        """Versions of the family's distributions (``versions`` of its row), plus :meth:`extra_versions`."""
        out = {}
        for dist in self.family.versions:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = None
        return {**out, **self.extra_versions()}

    def extra_versions(self) -> dict:
        """Model-specific entries of :meth:`versions` (hook), e.g. a checkpoint's own version."""
        return {}


def species_readout(zs, weight, bias) -> Readout:
    """A :class:`Readout` with rows ``weight`` and ``bias`` at atomic numbers ``zs`` and zeros elsewhere.

    ``weight`` is one row (D,) shared by every element or one row per element (len(zs), D);
    ``bias`` a scalar or one value per element.
    """
    zs = np.asarray(zs, dtype=np.int64)
    weight = np.asarray(weight, dtype=np.float64)
    out_w = np.zeros((119, weight.shape[-1]))
    out_b = np.zeros(119)
    out_w[zs] = weight
    out_b[zs] = bias
    return Readout(weight=out_w, bias=out_b)


def check_elements(adapter: Adapter, structures: list, on_unsupported: str = "raise") -> list[int]:
    """Indices of the structures the model supports.

    ``on_unsupported="raise"`` raises :class:`UnsupportedElement` naming the element, the
    structure and the model; ``"skip"`` drops such structures (their ids are recorded in
    the FeatureSet's ``meta["skipped"]``).
    """
    if on_unsupported not in ("raise", "skip"):
        raise ValueError("on_unsupported must be 'raise' or 'skip'")
    from ase.data import chemical_symbols

    ok = adapter.supported_elements
    keep = []
    for i, atoms in enumerate(structures):
        bad = sorted(set(int(z) for z in atoms.numbers) - ok)
        if not bad:
            keep.append(i)
        elif on_unsupported == "raise":
            sid = atoms.info.get("structure_id", f"#{i}")
            names = ", ".join(chemical_symbols[z] for z in bad)
            raise UnsupportedElement(
                f"model {adapter.spec.key} does not support element(s) {names} found in structure {sid}; "
                "pass on_unsupported='skip' to leave such structures out"
            )
    return keep


def batches(structures: list, batch_atoms: int):
    """Consecutive slices of ``structures`` holding at most ``batch_atoms`` atoms (at least one structure)."""
    start, count = 0, 0
    for i, atoms in enumerate(structures):
        if count and count + len(atoms) > batch_atoms:
            yield start, i
            start, count = i, 0
        count += len(atoms)
    if start < len(structures):
        yield start, len(structures)


def resolve_workers(workers: int | str | None, device: str) -> int:
    """Number of CPU worker processes: ``"auto"`` is one per usable core on a CPU, 1 on a GPU."""
    if workers is None or (workers == 1 and not isinstance(workers, bool)):
        return 1
    if workers == "auto":
        if not device.startswith("cpu"):
            return 1
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer or 'auto', not {workers!r}")
    if workers > 1 and not device.startswith("cpu"):
        raise ValueError(f"workers={workers} needs device 'cpu' (a {device} device runs one process); "
                         "on a GPU raise batch_size instead")
    return workers


#: what forked workers read: set by _parallel_forward just before the pool forks, so the
#: children inherit the loaded model without pickling or reloading it.
_FORK_STATE: dict = {}


def _forward_batch(bounds: tuple[int, int]):
    import torch

    torch.set_num_threads(1)  # one thread per worker: the processes, not threads, share the cores
    adapter, structures, layer = _FORK_STATE["args"]
    lo, hi = bounds
    v, b, e = adapter.forward(structures[lo:hi], layer)
    return np.asarray(v, dtype=np.float32), b, np.asarray(e, dtype=np.float64)


def _parallel_forward(adapter: Adapter, structures: list, layer: str, bounds: list, workers: int):
    """``adapter.forward`` on each batch, in ``workers`` forked processes, results in batch order.

    The batches are the ones a single process runs, so the features do not depend on
    ``workers`` (each batch is one forward pass, whichever process runs it).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError("workers > 1 needs the 'fork' start method (Linux, macOS); use workers=1 here")
    _FORK_STATE["args"] = (adapter, structures, layer)
    # a worker that dies (killed, out of memory) raises BrokenProcessPool here, never hangs
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        yield from pool.map(_forward_batch, bounds)
    except BaseException:  # an error or an interrupt: drop the batches not started, do not wait
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown()
    finally:
        _FORK_STATE.clear()


def run_adapter(adapter: Adapter, structures: list, layer: str = "last", batch_size: int | None = None,
                on_unsupported: str = "raise", progress=None, workers: int | str = 1,
                min_distance: float | None = MIN_DISTANCE) -> FeatureSet:
    """Featurise ``structures`` with a loaded adapter, in batches of about ``batch_size`` atoms.

    Before the model runs, every structure is validated
    (:func:`~umlip_latents.datasets.validate_structure` with ``min_distance``) and the ids are
    checked unique; a NaN or infinite feature or energy raises
    :class:`~umlip_latents.errors.NonFiniteFeatures` instead of being returned.

    ``workers`` > 1 (CPU only; ``"auto"``: one per core) runs the batches in that many forked
    processes of one thread each. On a CPU the work is compute-bound and small structures keep
    intra-op threads idle, so processes use many cores better than threads do; the batches,
    and so the features, are those of ``workers=1``.
    """
    if layer not in adapter.spec.layers:
        raise ValueError(f"model {adapter.spec.key} offers layers {sorted(adapter.spec.layers)}, not {layer!r}")
    ids = structure_ids(structures)
    for sid, atoms in zip(ids, structures):
        validate_structure(atoms, str(sid), min_distance=min_distance)
    keep = check_elements(adapter, structures, on_unsupported)
    skipped = [ids[i] for i in sorted(set(range(len(structures))) - set(keep))]
    structures, ids = [structures[i] for i in keep], [ids[i] for i in keep]
    if batch_size is None:
        gpu = adapter.device.startswith("cuda")
        batch_size = adapter.default_batch_atoms_gpu if gpu else adapter.default_batch_atoms
    workers = resolve_workers(workers, adapter.device)
    bounds = list(batches(structures, batch_size))
    workers = min(workers, len(bounds)) or 1  # processes actually used (recorded in meta)
    if workers > 1:
        results = _parallel_forward(adapter, structures, layer, bounds, workers)
    else:
        results = (adapter.forward(structures[lo:hi], layer) for lo, hi in bounds)
    values, energies, blocks = [], [], None
    t0 = time.perf_counter()
    for (lo, hi), (v, b, e) in zip(bounds, results):
        values.append(np.asarray(v, dtype=np.float32))
        energies.append(np.asarray(e, dtype=np.float64))
        blocks = b
        if progress is not None:
            progress(hi - lo, sum(len(a) for a in structures[lo:hi]))
    seconds = time.perf_counter() - t0
    n_atoms = np.array([len(a) for a in structures], dtype=np.int64)
    species = np.concatenate([a.numbers for a in structures]).astype(np.int64) if structures else np.zeros(0, np.int64)
    dim = blocks[-1].stop if blocks else 0
    meta = {
        "model": adapter.spec.key,
        "family": adapter.spec.family,
        "layer": layer,
        "device": adapter.device,
        "batch_atoms": batch_size,
        "workers": workers,
        "checkpoint_sha256": adapter.checkpoint_sha256(),
        "versions": adapter.versions(),
        "seconds": seconds,
        "atoms_per_second": float(n_atoms.sum() / seconds) if seconds > 0 else None,
        "skipped": skipped,
    }
    return FeatureSet(
        values=np.concatenate(values) if values else np.zeros((0, dim), np.float32),
        structure_index=np.repeat(np.arange(len(structures)), n_atoms),
        species=species,
        blocks=list(blocks or []),
        meta=meta,
        structure_ids=ids,
        energy=np.concatenate(energies) if energies else np.zeros(0),
        readout=adapter.readout() if layer == "last" else None,
    ).require_finite(f"model {adapter.spec.key} ({layer})")


def affine_probe(fn, dim: int, dtype, device) -> tuple[np.ndarray, float]:
    """Weights and bias of an affine map ``fn: (n, dim) -> (n,)`` read off by probing it.

    ``fn`` is the model's own module (e.g. an e3nn ``Linear`` on invariant channels); the
    unit vectors and the zero vector give its exact matrix and offset.
    """
    import torch

    with torch.no_grad():
        eye = torch.eye(dim, dtype=dtype, device=device)
        zero = torch.zeros(1, dim, dtype=dtype, device=device)
        b = fn(zero).reshape(-1)[0]
        w = fn(eye).reshape(-1) - b
    return w.double().cpu().numpy(), float(b)
