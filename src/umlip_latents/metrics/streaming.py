"""GFRE, GFRD and LFRE for features larger than memory: the matrix from row chunks read off disk.

:func:`streamed_matrix` gives the numbers of :func:`~umlip_latents.metrics.reconstruction_matrix`
(same split, scaling, CV folds, alphas and alpha choice) while holding only chunks of rows and
per-model factors in memory. Three passes over the rows:

1. the training rows' column sums (the centring of ``StandardFlexibleScaler``);
2. per CV fold, on the centred training rows: the Gram matrix of all models side by side
   (``X_a^T Y_a`` of every pair from one product, float64) and, per model, the triangular
   factor ``R_a`` by TSQR (QR of the running ``R`` stacked on the next chunk: backward stable,
   unlike ``R`` from the Gram matrix, whose square root loses the small singular values). The
   total variance is the trace of a model's Gram block; scaling is applied to the factors;
3. the test rows: each source's reconstruction of every target and its residual, explicitly.

Each pass can be cut into contiguous row ranges (``partitions``): every range gives its partial
(column sums; Gram matrices and per-model ``R``; summed squared residuals), and the partials
are combined first to last (sums added, ``R`` factors by the QR of the stacked pair). With a
Dask client the ranges are tasks on the workers, so one split's passes spread over a cluster;
the same ``partitions`` give the same values with or without one.

The in-memory engine uses ``U_a^T Q_a^T Y_a``; here the same quantity is ``S_a^-1 V_a^T
X_a^T Y_a`` (``R_a = U_a S_a V_a^T``, ``X_a = Q_a R_a``), and every other term of the CV error
is a product of ``R_b``, ``V_a / s_a`` and Gram blocks. In exact arithmetic nothing changes;
in float64 a component of singular value ``s`` carries a relative error of about
``eps s_max / s`` instead of ``eps`` (1e-7 at the smallest relative alpha, 1e-9), which is
what the tests allow on rank-deficient data (1e-6); on well-conditioned data the values agree
to 1e-8 relative or better.

LFRE (:class:`_LocalPass`) keeps the test rows in memory (its cost is a local fit per test row)
and streams the training rows twice: an exact nearest-neighbour search, chunk by chunk, keeping
each test row's ``k`` nearest so far (skmatter's squared-distance expression, merged with
``torch.topk``), then the neighbours' rows of every model, read by index for a batch of test
rows at a time, feed the local fits of the in-memory engine
(:func:`~umlip_latents.metrics._engine.local_fits`). Only the order of the training mean's
summation differs from the in-memory engine, so the values agree to rounding (unless two
training rows lie at exactly the same distance from a test row, where the two searches may
keep different ones).

Rows come from arrays, memory maps or ``.npy`` files; a memory map or a file is read with
plain file reads (:class:`NpyRows`), so the pages read are not kept mapped in this process and
the peak resident memory stays that of one chunk and the factors.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from functools import reduce  # partials first to last: the first as it is, then add(total, next)
from pathlib import Path

import numpy as np

from ._engine import (
    RANDOM_STATE,
    _alpha_cuts,
    _best_alphas,
    _check_alphas,
    _cv_rmse,
    _device,
    _clamp_local_points,
    _kfold,
    _offsets,
    _rms,
    _safe_inv,
    local_fits,
)
from ..threads import one_cpu_thread
from .matrix import local_points, percentile_interval, split_indices

#: metrics :func:`streamed_matrix` computes
STREAMED_METRICS = ("gfre", "gfrd", "lfre")
#: elements of one block of test-to-training squared distances in the neighbour search
_DISTANCE_ELEMENTS = 2 ** 25
#: bytes of one float64 chunk of all models' columns
_CHUNK_BYTES = 2 ** 26


class NpyRows:
    """Rows of a 2-D C-ordered ``.npy`` file (or of the file behind a memory map), read on demand.

    ``read(lo, hi)`` returns rows ``lo:hi`` as a new array by one file read; nothing stays
    mapped. Parameters: ``path`` of the file; ``offset``, ``shape``, ``dtype`` when known (a
    memory map's), else read from the ``.npy`` header.
    """

    def __init__(self, path, offset: int | None = None, shape=None, dtype=None):
        self.path = Path(path)
        if offset is None:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"{path}: .npy format version {version} is not supported")
                shape, fortran, dtype = read_header(fh)
                offset = fh.tell()
            if fortran:
                raise ValueError(f"{self.path}: Fortran-ordered arrays cannot be read by rows")
        if len(shape) != 2:
            raise ValueError(f"{self.path}: features must be 2-D (n_atoms, D), got shape {tuple(shape)}")
        self.offset, self.shape, self.dtype = int(offset), tuple(int(s) for s in shape), np.dtype(dtype)
        expected = self.offset + self.shape[0] * self.shape[1] * self.dtype.itemsize
        if os.path.getsize(self.path) < expected:
            raise ValueError(f"{self.path}: {os.path.getsize(self.path)} bytes, {expected} expected for "
                             f"{self.shape} {self.dtype}: the file is truncated")

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        d = self.shape[1]
        out = np.fromfile(self.path, dtype=self.dtype, count=(hi - lo) * d,
                          offset=self.offset + lo * d * self.dtype.itemsize)
        return out.reshape(hi - lo, d)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) as a new array; the file is mapped only during the call."""
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        try:
            return np.array(mapped[rows])
        finally:
            del mapped


class _ArrayRows:
    def __init__(self, array):
        self.array, self.shape, self.dtype = array, tuple(array.shape), array.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.array[lo:hi])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[rows])


def rows_of(source):
    """A row reader of ``source``: an ``.npy`` path, a memory map (read through its file) or an array."""
    from ..features import FeatureSet

    if isinstance(source, FeatureSet):
        source = source.values
    if isinstance(source, (str, os.PathLike)):
        return NpyRows(source)
    root = source
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if isinstance(source, np.memmap) and source.filename is not None and source.flags.c_contiguous \
            and isinstance(root, mmap.mmap) and source.ndim == 2:
        # where this view starts in the file: a row slice of a memory map keeps its parent's
        # ``offset``, so the position is taken from the view's address in the mapping (numpy maps
        # from ``offset`` rounded down to the allocation granularity)
        mapped = np.frombuffer(root, dtype=np.uint8).ctypes.data
        start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY + (source.ctypes.data - mapped)
        return NpyRows(source.filename, start, source.shape, source.dtype)
    if isinstance(source, (NpyRows, _ArrayRows)):
        return source
    array = np.asarray(source)
    if array.ndim != 2:
        raise ValueError(f"features must be 2-D (n_atoms, D), got shape {array.shape}")
    return _ArrayRows(array)


def _chunks(n: int, step: int, start: int = 0):
    """Row ranges of ``step`` rows from ``start`` to ``n``."""
    for lo in range(start, n, step):
        yield lo, min(lo + step, n)


def partition_bounds(n: int, partitions: int) -> list[tuple[int, int]]:
    """``partitions`` contiguous row ranges of about equal size covering ``0..n`` (none empty)."""
    edges = np.linspace(0, n, min(int(partitions), n) + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _partial(p: "_Pass", name: str, lo: int, hi: int, *args):
    """``p.<name>(lo, hi, *args)``: one partition's part of a pass (a task on a cluster's worker)."""
    return getattr(p, name)(lo, hi, *args)


class _Pass:
    """One split's sufficient statistics and fits, accumulated chunk by chunk."""

    def __init__(self, readers, names, train_idx, test_idx, opts, dev, step, progress, partitions=1, client=None):
        import torch

        self.readers, self.names, self.dev, self.step, self.progress = readers, names, dev, step, progress
        self.bounds = partition_bounds(len(readers[0]), partitions)
        self.client = client
        self.widths = [r.shape[1] for r in readers]
        self.off = _offsets(self.widths)
        n = len(readers[0])
        f1, f2 = _kfold(len(train_idx), opts["random_state"])
        self.role = np.full(n, -2, dtype=np.int8)      # -1 test, 0 / 1 CV fold, -2 neither
        self.role[np.asarray(test_idx)] = -1
        self.role[np.asarray(train_idx)[f1]] = 0
        self.role[np.asarray(train_idx)[f2]] = 1
        self.n_fold = [len(f1), len(f2)]
        self.n_train, self.n_test = len(train_idx), len(test_idx)
        self.opts = opts
        self.torch = torch
        self.mean = None

    def __getstate__(self):
        # what a partition task needs: not the module, client or progress callback, nor the
        # factors (D x D per fold) that only the combining process uses
        return {k: v for k, v in self.__dict__.items() if k not in ("torch", "client", "progress", "gram", "R")}

    def __setstate__(self, state):
        import torch

        self.__dict__.update(state, torch=torch, client=None, progress=None)

    def _map(self, name: str, *args) -> list:
        """``name``'s partial of every partition, in partition order: tasks on the client's
        main-environment workers, or here one after another (the same values either way)."""
        if self.client is None:
            return [getattr(self, name)(lo, hi, *args) for lo, hi in self.bounds]
        from ..cluster import resource

        futures = [self.client.submit(_partial, self, name, lo, hi, *args, resources={resource("main"): 1},
                                      pure=False) for lo, hi in self.bounds]
        return self.client.gather(futures)

    def _block(self, lo, hi, mask_of):
        """Rows ``lo:hi`` where ``mask_of(role)`` holds, all models side by side, centred (float64 tensor)."""
        mask = mask_of(self.role[lo:hi])
        if not mask.any():
            return None
        parts = []
        for i, r in enumerate(self.readers):
            rows = r.read(lo, hi)[mask]
            if not np.isfinite(rows).all():
                raise ValueError(f"features[{self.names[i]!r}] hold NaN or infinite values in rows {lo}..{hi - 1}")
            parts.append(rows.astype(np.float64))
        block = self.torch.as_tensor(np.concatenate(parts, axis=1), device=self.dev)
        if self.mean is not None:
            block -= self.mean
        return block

    def _sum_part(self, lo: int, hi: int):
        total = self.torch.zeros(self.off[-1], dtype=self.torch.float64, device=self.dev)
        for c0, c1 in _chunks(hi, self.step, lo):
            block = self._block(c0, c1, lambda role: role >= 0)
            if block is not None:
                total += block.sum(0)
        return total

    def means(self):
        self.mean = reduce(lambda a, b: a + b, self._map("_sum_part")) / self.n_train

    def _factor_part(self, lo: int, hi: int):
        """Rows ``lo:hi``'s Gram matrices and per-model R factors of both CV folds (centred, unscaled)."""
        torch = self.torch
        D = self.off[-1]
        gram = [torch.zeros(D, D, dtype=torch.float64, device=self.dev) for _ in range(2)]
        R = [[torch.zeros(0, w, dtype=torch.float64, device=self.dev) for w in self.widths] for _ in range(2)]
        for c0, c1 in _chunks(hi, self.step, lo):
            for f in (0, 1):
                block = self._block(c0, c1, lambda role, f=f: role == f)
                if block is None:
                    continue
                gram[f].addmm_(block.T, block)
                for m, (a, b) in enumerate(zip(self.off[:-1], self.off[1:])):
                    R[f][m] = torch.linalg.qr(torch.cat([R[f][m], block[:, a:b]]), mode="r").R
            if self.progress:
                self.progress("factors", c1, len(self.role))
        return gram, R

    def factors(self):
        torch = self.torch

        def add(total, part):  # Gram matrices add; R factors of stacked rows: the R of the stacked Rs
            return ([g + h for g, h in zip(total[0], part[0])],
                    [[R if len(S) == 0 else (S if len(R) == 0 else torch.linalg.qr(torch.cat([R, S]), mode="r").R)
                      for R, S in zip(rs, ss)] for rs, ss in zip(total[1], part[1])])

        self.gram, self.R = reduce(add, self._map("_factor_part"))
        var = torch.stack([torch.diagonal(self.gram[0] + self.gram[1])[a:b].sum()
                           for a, b in zip(self.off[:-1], self.off[1:])]) / self.n_train
        for m, v in enumerate(var.tolist()):
            if v < 1e-12:
                raise ValueError(f"features[{self.names[m]!r}] have zero variance on the training rows; "
                                 "they cannot be scaled")
        self.scale = torch.sqrt(var)
        col = torch.repeat_interleave(self.scale, torch.as_tensor(self.widths, device=self.dev))
        for f in (0, 1):
            self.gram[f] /= col[:, None] * col[None, :]
            self.R[f] = [R / s for R, s in zip(self.R[f], self.scale)]
        self.col_scale = col

    def fit(self, m: int, distortion: bool):
        """Source ``m``'s cutoff ridge of every target: ``(V / s, W)`` and, for GFRD, the rotations."""
        torch = self.torch
        a0, a1 = self.off[m], self.off[m + 1]
        svd = [torch.linalg.svd(self.R[f][m], full_matrices=False) for f in (0, 1)]
        rcond = max(self.n_train, self.widths[m]) * np.finfo(np.float64).eps
        scaled, cut = _alpha_cuts(svd[0].S[None], svd[1].S[None], self.opts["alphas"], self.opts["alpha_type"],
                                  rcond)
        losses = []
        for a, b in ((0, 1), (1, 0)):
            _, s, Vh = svd[a]
            Vs = Vh.T * _safe_inv(s, rcond)
            T = self.R[b][m] @ Vs
            losses.append(_cv_rmse(s[None], cut, (Vs.T @ self.gram[a][a0:a1])[None],
                                   (Vs.T @ self.gram[b][a0:a1])[None], (T.T @ T)[None],
                                   torch.diagonal(self.gram[b])[None], self.n_fold[b]))
        widths = torch.as_tensor(self.widths, device=self.dev)
        thr = torch.repeat_interleave(_best_alphas(losses, scaled, self.widths)[0], widths)
        R = torch.linalg.qr(torch.cat([self.R[0][m], self.R[1][m]]), mode="r").R
        _, s, Vh = torch.linalg.svd(R, full_matrices=False)
        Vs = Vh.T * _safe_inv(s, 0.0)
        W = (Vs.T @ (self.gram[0][a0:a1] + self.gram[1][a0:a1])) * (s[:, None] > thr[None, :])
        rotations = None
        if distortion:   # skmatter's OrthogonalRegression on X_train^T P_train = V S W, zero-padded
            cross = Vh.T @ (s[:, None] * W)
            rotations = []
            for lo, hi in zip(self.off[:-1], self.off[1:]):
                dx, dy = a1 - a0, hi - lo
                size = max(dx, dy)
                M = torch.zeros(size, size, dtype=torch.float64, device=self.dev)
                M[:dx, :dy] = cross[:, lo:hi]
                u, _, vh = torch.linalg.svd(M)
                rotations.append((u @ vh)[:dx])
        return Vs, W, rotations

    def errors(self, metrics):
        """RMS error of every (metric, source, target) on the test rows: ``{metric: (k, k)}``."""
        fits = [self.fit(m, "gfrd" in metrics) for m in range(len(self.widths))]
        sums = reduce(lambda total, part: {metric: total[metric] + part[metric] for metric in metrics},
                      self._map("_error_part", fits, metrics))
        return {metric: (v / self.n_test).sqrt().cpu().numpy() for metric, v in sums.items()}

    def _error_part(self, lo: int, hi: int, fits, metrics):
        """Summed squared pointwise errors of rows ``lo:hi``'s test rows: ``{metric: (k, k) tensor}``."""
        torch = self.torch
        k = len(self.widths)
        sums = {metric: torch.zeros(k, k, dtype=torch.float64, device=self.dev) for metric in metrics}
        for c0, c1 in _chunks(hi, self.step, lo):
            Y = self._block(c0, c1, lambda role: role == -1)
            if Y is None:
                continue
            Y /= self.col_scale
            for m, (Vs, W, rotations) in enumerate(fits):
                X = Y[:, self.off[m]:self.off[m + 1]]
                P = (X @ Vs) @ W
                for t, (a, b) in enumerate(zip(self.off[:-1], self.off[1:])):
                    if "gfre" in metrics:
                        sums["gfre"][m, t] += ((Y[:, a:b] - P[:, a:b]) ** 2).sum()
                    if "gfrd" in metrics:
                        orth = X @ rotations[t]
                        pad = torch.nn.functional.pad(P[:, a:b], (0, orth.shape[1] - (b - a)))
                        sums["gfrd"][m, t] += ((pad - orth) ** 2).sum()
            if self.progress:
                self.progress("test", c1, len(self.role))
        return sums


class _LocalPass:
    """LFRE of every pair on one split: neighbours found chunk by chunk, their rows read by index."""

    def __init__(self, base: _Pass, n_local_points, batch_size=None):
        torch = base.torch
        self.base, self.torch, self.batch_size = base, torch, batch_size
        widths, off = base.widths, base.off
        self.ks = [_clamp_local_points([local_points(n_local_points, widths[s], w) for w in widths],
                                       base.n_train, stacklevel=5) for s in range(len(widths))]
        total = torch.zeros(off[-1], dtype=torch.float64, device=base.dev)
        for lo, hi in _chunks(len(base.role), base.step):   # base.mean is set: blocks come centred
            block = base._block(lo, hi, lambda role: role >= 0)
            if block is not None:
                total += (block ** 2).sum(0)
        var = torch.stack([total[a:b].sum() for a, b in zip(off[:-1], off[1:])]) / base.n_train
        for m, v in enumerate(var.tolist()):
            if v < 1e-12:
                raise ValueError(f"features[{base.names[m]!r}] have zero variance on the training rows; "
                                 "they cannot be scaled")
        self.col_scale = torch.repeat_interleave(torch.sqrt(var), torch.as_tensor(widths, device=base.dev))
        tests = [b for lo, hi in _chunks(len(base.role), base.step)
                 if (b := base._block(lo, hi, lambda role: role == -1)) is not None]
        self.test = torch.cat(tests) / self.col_scale

    def neighbours(self) -> list:
        """Per source, the (n_test, max k) training rows (file positions) nearest each test row, nearest first."""
        torch, base = self.torch, self.base
        sources = list(zip(base.off[:-1], base.off[1:]))
        kmax = [max(k) for k in self.ks]
        best = [None] * len(sources)
        sub = max(1, _DISTANCE_ELEMENTS // max(1, len(self.test)))
        for lo, hi in _chunks(len(base.role), base.step):
            mask = base.role[lo:hi] >= 0
            block = base._block(lo, hi, lambda role: role >= 0)
            if block is None:
                continue
            block /= self.col_scale
            ids = torch.as_tensor(np.flatnonzero(mask) + lo, device=base.dev)
            for r0 in range(0, len(block), sub):
                part, pid = block[r0:r0 + sub], ids[r0:r0 + sub]
                for m, (a, b) in enumerate(sources):
                    A, Q = part[:, a:b], self.test[:, a:b]
                    d = (A ** 2).sum(1) + (Q ** 2).sum(1)[:, None] - 2 * Q @ A.T
                    cand = pid.expand(len(Q), -1)
                    if best[m] is not None:
                        d, cand = torch.cat([best[m][0], d], 1), torch.cat([best[m][1], cand], 1)
                    keep = torch.topk(d, min(kmax[m], d.shape[1]), dim=1, largest=False, sorted=True).indices
                    best[m] = (torch.gather(d, 1, keep), torch.gather(cand, 1, keep))
            if base.progress:
                base.progress("neighbours", hi, len(base.role))
        return [b[1] for b in best]

    def _take(self, rows, cols, a: int, b: int):
        """Source columns ``a:b`` and target columns ``cols`` of training rows ``rows`` (B, k), centred and scaled."""
        torch, base = self.torch, self.base
        flat = rows.reshape(-1).cpu().numpy()
        unique, inverse = np.unique(flat, return_inverse=True)
        parts = [r.take(unique).astype(np.float64) for r in base.readers]
        block = torch.as_tensor(np.concatenate(parts, axis=1), device=base.dev)
        block -= base.mean
        block /= self.col_scale
        inverse = torch.as_tensor(inverse, device=base.dev).reshape(rows.shape)
        return block[:, a:b][inverse], block[:, cols][inverse]

    def errors(self, opts) -> np.ndarray:
        """RMS LFRE of every (source, target): (k, k)."""
        base = self.base
        order = self.neighbours()
        n = len(base.widths)
        out = np.zeros((n, n))
        with one_cpu_thread(base.dev):  # thousands of small fits (see the in-memory engine)
            self._fits(order, opts, out)
        return out

    def _fits(self, order, opts, out) -> None:
        base, n = self.base, len(self.base.widths)
        for m, (a, b) in enumerate(zip(base.off[:-1], base.off[1:])):
            errs = local_fits(order[m], lambda rows, cols: self._take(rows, cols, a, b), self.test[:, a:b],
                              self.test, base.widths, self.ks[m], alphas=opts["alphas"],
                              alpha_type=opts["alpha_type"], random_state=opts["random_state"],
                              batch_size=self.batch_size)
            for t, e in enumerate(errs):
                out[m, t] = _rms(e.cpu().numpy())
            if base.progress:
                base.progress("local fits", m + 1, n)


def _one_split(readers, names, metrics, n, test_size, labels, split_seed, opts, device, step, n_local_points,
               batch_size, partitions=1, progress=None, client=None):
    """The metrics of one train/test split: ``({metric: (k, k) array}, n_train, n_test)``.

    With a ``client``, each pass's partitions are tasks on its workers (LFRE runs here).
    """
    import torch

    train_idx, test_idx = split_indices(n, test_size, labels, split_seed)
    p = _Pass(readers, names, train_idx, test_idx, opts, torch.device(device), step, progress, partitions, client)
    p.means()
    out = {}
    if "lfre" in metrics:
        out["lfre"] = _LocalPass(p, n_local_points, batch_size).errors(opts)
    global_metrics = [m for m in metrics if m != "lfre"]
    if global_metrics:
        p.factors()
        out.update(p.errors(global_metrics))
    return out, len(train_idx), len(test_idx)


def streamed_matrix(sources, metric=("gfre",), test_size=1000, stratify=None, seed=0, n_boot=0, device="auto", *,
                    alphas=None, alpha_type="relative", random_state=RANDOM_STATE, chunk_rows=None, progress=None,
                    n_local_points=None, batch_size=None, partitions=1, client=None):
    """Every model reconstructing every model, GFRE, GFRD and LFRE, out of core.

    The numbers of :func:`~umlip_latents.metrics.reconstruction_matrix` with the same
    arguments (see the module docstring for how close), for features read a chunk of rows at a
    time.

    Parameters
    ----------
    sources : mapping model key -> .npy path, memory map, FeatureSet or array (n_atoms, D)
        The same atoms in the same order in every source.
    metric : "gfre", "gfrd", "lfre" or a list of them
    test_size, stratify, seed, n_boot, device, alphas, alpha_type, random_state, n_local_points, batch_size
        As in :func:`~umlip_latents.metrics.reconstruction_matrix` (``stratify``: labels per
        atom, or None). LFRE holds the test rows in memory.
    chunk_rows : int, optional
        Rows per chunk (default: about 64 MB of float64 over all models' columns).
    progress : callable(stage, done, total), optional
        Not called with a ``client``.
    partitions : int
        Contiguous row ranges each pass over the rows (means, factors, test errors) is cut
        into; their partial sums and R factors are combined first to last. One (the default)
        is one pass over all rows. More partitions change the values only by rounding (the
        order of the sums), and the same ``partitions`` give the same values with or without
        a client.
    client : distributed.Client, optional
        Tasks on the cluster's main-environment workers (:mod:`umlip_latents.cluster`), which
        read the sources themselves: give ``.npy`` paths (or memory maps) on a file system they
        share. With ``partitions=1`` each split (that of ``seed`` and the ``n_boot`` re-drawn
        ones) is one task; with more, the splits run one after another and each pass's
        partitions are the tasks (LFRE's neighbour search and local fits stay in this process).
        The values are those of a run without a client with the same ``partitions``.

    Returns
    -------
    pandas.DataFrame
        Columns ``source, target, metric, value, ci_low, ci_high``; ``attrs`` as
        :func:`~umlip_latents.metrics.reconstruction_matrix`'s (with ``streamed=True`` and
        ``chunk_rows``).
    """
    import pandas as pd

    if not isinstance(sources, Mapping) or not sources:
        raise TypeError("sources must be a non-empty mapping model key -> .npy path, memory map or array")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    unknown = sorted(set(metrics) - set(STREAMED_METRICS))
    if unknown:
        raise ValueError(f"metric(s) {unknown} are not streamed; streamed_matrix computes {STREAMED_METRICS} "
                         "(use reconstruction_matrix in memory for the others)")
    names = list(sources)
    readers = []
    for key in names:
        try:
            readers.append(rows_of(sources[key]))
        except ValueError as exc:
            raise ValueError(f"sources[{key!r}]: {exc}") from exc
    n = len(readers[0])
    for key, r in zip(names, readers):
        if len(r) != n:
            raise ValueError(f"sources[{key!r}] has {len(r)} rows, sources[{names[0]!r}] {n}: "
                             "every source must hold the same atoms")
    opts = dict(alphas=_check_alphas(alphas, alpha_type), alpha_type=alpha_type, random_state=random_state)
    dev = _device(device)
    width = sum(r.shape[1] for r in readers)
    step = int(chunk_rows) if chunk_rows else max(256, _CHUNK_BYTES // (8 * width))
    if step < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if isinstance(partitions, bool) or not isinstance(partitions, (int, np.integer)) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, got {partitions!r}")
    labels = None if stratify is None else np.asarray(stratify)
    if isinstance(n_local_points, str) and n_local_points != "determined":
        raise ValueError(f"n_local_points must be an integer, 'determined' or None, got {n_local_points!r}")
    if isinstance(n_local_points, int) and not 2 <= n_local_points <= n:
        raise ValueError(f"n_local_points={n_local_points}: must be at least 2 and at most the {n} atoms")

    split = dict(readers=readers, names=names, metrics=metrics, n=n, test_size=test_size, labels=labels, opts=opts,
                 device=str(dev), step=step, n_local_points=n_local_points, batch_size=batch_size,
                 partitions=int(partitions))
    seeds = [seed + b for b in range(n_boot + 1)]
    if client is None:
        results = [_one_split(split_seed=s, progress=progress, **split) for s in seeds]
    else:  # tasks on the main-environment workers (numpy, torch, scikit-learn)
        from ..cluster import resource, require_workers

        require_workers(client, "main", "streamed matrix")
        if partitions > 1:
            results = [_one_split(split_seed=s, client=client, **split) for s in seeds]
        else:
            futures = [client.submit(_one_split, split_seed=s, resources={resource("main"): 1}, pure=False, **split)
                       for s in seeds]
            results = client.gather(futures)
    (values, n_train, n_test), boots = results[0], [r[0] for r in results[1:]]
    rows, replicates = [], []
    for m in metrics:
        for s, source in enumerate(names):
            for t, target in enumerate(names):
                v = float(values[m][s, t])
                reps = [v] + [float(b[m][s, t]) for b in boots]
                lo, hi = percentile_interval(reps) if boots else (np.nan, np.nan)
                rows.append({"source": source, "target": target, "metric": m, "value": v, "ci_low": lo, "ci_high": hi})
                replicates += [{"boot": b, "source": source, "target": target, "metric": m, "value": r}
                               for b, r in enumerate(reps)]
    df = pd.DataFrame(rows, columns=["source", "target", "metric", "value", "ci_low", "ci_high"])
    df.attrs.update(n_train=n_train, n_test=n_test, seed=seed, n_boot=n_boot, device=str(dev), test_size=test_size,
                    n_local_points=n_local_points, alpha_type=alpha_type, alphas=opts["alphas"].tolist(), streamed=True,
                    chunk_rows=step, partitions=int(partitions))
    if boots:
        df.attrs["replicates"] = replicates
    return df
