"""MACE (mace-torch): ``MACE`` and ``ScaleShiftMACE`` models from full ``.model`` files.

Layers
------
``last`` (as in the paper): the invariant vectors each per-atom energy is read from
linearly, captured with hooks on the model's own readout modules in one energy-only pass.

* ``interaction_<i>_scalars`` for every layer ``i`` with a *linear* readout: the ``0e``
  channels of the node features entering ``readouts[i]`` (the ``l>0`` channels have no
  path to the scalar output of an equivariant linear map).
* ``readout_mlp_hidden``: the hidden layer of the *non-linear* readout of the last layer,
  i.e. the input of its final linear ``readouts[-1].linear_2`` (after the activation; for
  multi-head models only the selected head's slice, the others being masked to zero).
* ``zbl_pair_energy`` (one column, only for checkpoints with ``pair_repulsion``): the
  per-atom ZBL pair energy (``pair_repulsion_fn``), added to the readouts before the
  scale/shift, so that the readout stays exact.

Per-atom energy = ``E0[Z]`` (``atomic_energies_fn``) + ``scale`` * (sum of the readouts
+ ZBL) + ``shift`` (``ScaleShiftMACE``; per head; plain ``MACE``: 1 and 0). The readout
weights are probed (:func:`affine_probe`) on the model's own readout linears, with zeros
in the ``l>0`` channels.

``backbone``: exactly ``MACECalculator.get_descriptors(atoms, invariants_only=True)``:
the invariant channels of the node features of every interaction layer (``products[i]``
outputs, the inputs of ``readouts[i]``), concatenated by
``mace.modules.utils.extract_invariant``; one block ``interaction_<i>_invariants`` each.

Dimensions
----------
All registered checkpoints have 2 interaction layers and a ``16x0e`` readout MLP, so with
``C`` channels ``last`` is ``C + 16`` (+1 where the checkpoint has ZBL pair repulsion) and
``backbone`` is ``2 C``: MACE-MP-0a small/medium/large, MACE-MP-0b3 medium, MACE-OMAT-0
medium, MACE-MATPES-PBE/r2SCAN (C=128): 144(+1) / 256; MACE-OFF23 small (C=96): 112 / 192,
medium (C=128): 144 / 256, large (C=192): 208 / 384. (Nominal, from the published
hyper-parameters; the blocks of a run record the actual widths.)

Weights
-------
Looked up in this order, none downloaded by :meth:`MaceAdapter.availability`: a user file
in ``$UMLIP_LATENTS_CHECKPOINTS`` (or a ``local`` source path), mace's own download cache
(``~/.cache/mace`` or ``$XDG_CACHE_HOME/mace``), then mace's ``mace_mp``/``mace_off``
loader (which downloads when online). Multi-head models use ``options.head`` or, like
``MACECalculator``, their only or ``default`` head.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import ModelUnavailable
from ..features import Block, Readout
from ..registry import ModelSpec
from .base import Adapter, affine_probe, species_readout

#: mace-torch's calculator keys for charge/spin information (as ``MACECalculator`` uses them).
_INFO_KEYS = {"total_spin": "spin", "total_charge": "charge", "external_field": "external_field"}


def import_mace():
    """Import mace before e3nn (it sets up full-pickle loading that its checkpoints need)."""
    import mace  # noqa: F401
    import torch

    return torch


def _cache_path(spec: ModelSpec) -> tuple[Path | None, str | None]:
    """Where mace's own loader caches ``spec``'s checkpoint, and the URL it downloads from."""
    src = spec.source
    if src["kind"] != "loader":
        return None, None
    import_mace()
    from mace.calculators import foundations_models as fm
    from mace.tools.utils import get_cache_dir

    loader = spec.options.get("loader", "mace_mp")
    urls = fm.mace_off_urls if loader == "mace_off" else fm.mace_mp_urls
    url = urls.get(src["name"])
    base = os.path.basename(url).split("?")[0] if url else src["filename"]
    if loader == "mace_mp":  # download_mace_mp_checkpoint keeps only [A-Za-z0-9_]
        base = "".join(c for c in base if c.isalnum() or c == "_")
    return Path(get_cache_dir()) / base, url


def _scalar_columns(irreps) -> list[int]:
    """Columns of the ``0e`` channels of an e3nn irreps layout."""
    cols, start = [], 0
    for mul, ir in irreps:
        if ir.l == 0 and ir.p == 1:
            cols.extend(range(start, start + mul))
        start += mul * ir.dim
    return cols


class MaceAdapter(Adapter):
    """A loaded MACE / ScaleShiftMACE model (e3nn backend)."""

    default_batch_atoms = 500  # CPU: see Adapter.default_batch_atoms
    default_batch_atoms_gpu = 8000

    def __init__(self, spec: ModelSpec, device: str, model, path: Path | None):
        super().__init__(spec, device, path)
        torch = import_mace()
        kind = type(model).__name__
        if kind not in ("MACE", "ScaleShiftMACE"):
            raise ModelUnavailable(f"model {spec.key}: {kind} is not supported (only MACE and ScaleShiftMACE)")
        if hasattr(model, "embedding_readout"):
            raise ModelUnavailable(
                f"model {spec.key}: its energy is read through a learned head embedding (embedding_readout, as in "
                "MACE-MH-1), not a fixed linear map of per-atom features; extracting it needs that embedding folded "
                "into a per-head readout, which this adapter does not do yet")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = next(model.parameters()).dtype
        self.z_table = [int(z) for z in model.atomic_numbers]
        self.heads = list(getattr(model, "heads", None) or ["Default"])
        head = spec.options.get("head")
        if head is None:
            default = [h for h in self.heads if h.lower() == "default"]
            if len(self.heads) > 1 and not default:
                raise ModelUnavailable(f"model {spec.key} has heads {self.heads} and none is 'default'; "
                                       "set options.head in its registry entry")
            head = self.heads[0] if len(self.heads) == 1 else default[0]
        if head not in self.heads:
            raise ModelUnavailable(f"model {spec.key}: head {head!r} not among {self.heads}")
        self.head, self.head_index = head, self.heads.index(head)
        self._readout = None
        self._layout = self._last_layout()
        self._torch = torch

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def cached_checkpoint(cls, spec: ModelSpec) -> Path | None:
        """mace's own download cache (``~/.cache/mace`` or ``$XDG_CACHE_HOME/mace``)."""
        cached, _ = _cache_path(spec)
        if cached is not None:
            for cand in (cached, cached.parent / spec.source["filename"]):
                if cand.is_file():
                    return cand
        return None

    @classmethod
    def download_checkpoint(cls, spec: ModelSpec) -> str:
        """mace's ``mace_mp``/``mace_off`` loader (``options.loader``), which downloads into its cache."""
        from mace.calculators import foundations_models as fm

        loader = spec.options.get("loader", "mace_mp")
        with contextlib.redirect_stdout(sys.stderr):  # mace prints download progress
            getattr(fm, loader)(model=spec.source["name"], device="cpu", return_raw_model=True)
        path = cls.cached_checkpoint(spec)
        if path is None:
            raise ModelUnavailable(f"model {spec.key}: mace's {loader} left no {spec.source['filename']!r} in its cache")
        return str(path)

    @classmethod
    def open(cls, spec: ModelSpec, device: str, path: str) -> "MaceAdapter":
        torch = import_mace()
        return cls(spec, device, torch.load(path, map_location=device, weights_only=False), Path(path))

    @property
    def supported_elements(self) -> set[int]:
        return set(self.z_table)

    def calculator(self):
        """mace's own ``MACECalculator`` on the same checkpoint file and head."""
        from mace.calculators import MACECalculator

        dtype = "float64" if self.dtype == self._torch.float64 else "float32"
        kwargs = {"head": self.head} if len(self.heads) > 1 else {}
        return MACECalculator(model_paths=str(self.path), device=self.device, default_dtype=dtype, **kwargs)

    # -- layout of the readouts --------------------------------------------------------------
    def _last_layout(self) -> list[dict]:
        """Per readout: the module whose input is captured, which columns are kept, and names."""
        from mace.modules.blocks import LinearReadoutBlock

        out = []
        for i, readout in enumerate(self.model.readouts):
            if isinstance(readout, LinearReadoutBlock):
                irreps = readout.linear.irreps_in
                cols = _scalar_columns(irreps)
                out.append({"module": readout, "linear": readout.linear, "width": irreps.dim, "cols": cols,
                            "name": f"interaction_{i}_scalars",
                            "source": f"readouts[{i}] input (products[{i}] output), 0e channels of {irreps}"})
            else:
                linear = readout.linear_2
                width = linear.irreps_in.dim
                n_heads = int(getattr(readout, "num_heads", 1) or 1)
                h = width // n_heads
                lo = self.head_index * h if n_heads > 1 else 0
                out.append({"module": linear, "linear": linear, "width": width, "cols": list(range(lo, lo + h)),
                            "name": "readout_mlp_hidden",
                            "source": f"readouts[{i}].linear_2 input (hidden layer after the activation), "
                                      f"head {self.head}"})
        return out

    def _blocks(self, layer: str) -> list[Block]:
        blocks, start = [], 0
        if layer == "last":
            items = [(d["name"], len(d["cols"]), d["source"]) for d in self._layout]
            if hasattr(self.model, "pair_repulsion"):
                items.append(("zbl_pair_energy", 1, "pair_repulsion_fn output (per-atom ZBL energy, eV)"))
        else:
            n = int(self.model.num_interactions)
            items = [(f"interaction_{i}_invariants", self._invariant_width(),
                      f"node_feats of products[{i}], invariant channels (mace.modules.utils.extract_invariant)")
                     for i in range(n)]
        for name, width, source in items:
            blocks.append(Block(name, start, start + width, source))
            start += width
        return blocks

    def _invariant_layout(self):
        from e3nn import o3

        irreps_out = o3.Irreps(str(self.model.products[0].linear.irreps_out))
        l_max = irreps_out.lmax
        return irreps_out, l_max, irreps_out.dim // (l_max + 1) ** 2

    def _invariant_width(self) -> int:
        return self._invariant_layout()[2]

    # -- forward ---------------------------------------------------------------------------
    def _batch(self, structures: list):
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools
        from mace.tools.utils import AtomicNumberTable

        keyspec = mace_data.KeySpecification(info_keys=dict(_INFO_KEYS), arrays_keys={"charges": "Qs"})
        dtype = "float64" if self.dtype == self._torch.float64 else "float32"
        r_max = float(self.model.r_max)
        table = AtomicNumberTable(self.z_table)
        with torch_tools.default_dtype(dtype):
            graphs = [mace_data.AtomicData.from_config(
                mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name=self.head),
                z_table=table, cutoff=r_max, heads=self.heads) for atoms in structures]
        batch = torch_geometric.Batch.from_data_list(graphs).to(self.device)
        for key in batch.keys:
            value = batch[key]
            if self._torch.is_tensor(value) and self._torch.is_floating_point(value):
                batch[key] = value.to(dtype=self.dtype)
        return batch

    def forward(self, structures: list, layer: str) -> tuple[np.ndarray, list[Block], np.ndarray]:
        torch = self._torch
        if layer not in ("last", "backbone"):
            raise ValueError(f"unknown layer {layer!r}")
        batch = self._batch(structures)
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        if layer == "last":
            for k, d in enumerate(self._layout):
                hooks.append(d["module"].register_forward_pre_hook(
                    lambda mod, args, k=k: captured.__setitem__(k, args[0].detach())))
            if hasattr(self.model, "pair_repulsion"):
                hooks.append(self.model.pair_repulsion_fn.register_forward_hook(
                    lambda mod, args, out: captured.__setitem__("pair", out.detach())))
        try:
            with torch.no_grad():
                out = self.model(batch.to_dict(), compute_force=False, compute_stress=False, training=False)
        finally:
            for h in hooks:
                h.remove()
        energy = out["energy"].detach().double().cpu().numpy().reshape(-1)
        if layer == "last":
            parts = [captured[k][:, d["cols"]] for k, d in enumerate(self._layout)]
            if "pair" in captured:
                parts.append(captured["pair"].reshape(-1, 1))
            values = torch.cat(parts, dim=1)
        else:
            from mace.modules.utils import extract_invariant

            irreps_out, l_max, n_inv = self._invariant_layout()
            n_layers = int(self.model.num_interactions)
            values = extract_invariant(out["node_feats"], num_layers=n_layers, num_features=n_inv, l_max=l_max)
            values = values[:, :(n_layers - 1) * irreps_out.dim + n_inv]
        return values.detach().cpu().numpy(), self._blocks(layer), energy

    # -- readout ---------------------------------------------------------------------------
    def readout(self) -> Readout:
        if self._readout is not None:
            return self._readout
        torch, model, h = self._torch, self.model, self.head_index
        ws, offset = [], 0.0
        for d in self._layout:
            cols = torch.tensor(d["cols"], device=self.device)

            def fn(x, d=d, cols=cols):
                full = torch.zeros(x.shape[0], d["width"], dtype=x.dtype, device=x.device)
                full[:, cols] = x
                return d["linear"](full)[:, h]

            w, b = affine_probe(fn, len(d["cols"]), self.dtype, self.device)
            ws.append(w)
            offset += b
        if hasattr(model, "pair_repulsion"):
            ws.append(np.ones(1))
        if hasattr(model, "scale_shift"):
            scale = float(torch.atleast_1d(model.scale_shift.scale)[h])
            shift = float(torch.atleast_1d(model.scale_shift.shift)[h])
        else:
            scale, shift = 1.0, 0.0
        with torch.no_grad():
            eye = torch.eye(len(self.z_table), dtype=self.dtype, device=self.device)
            e0 = model.atomic_energies_fn(eye)[:, h].double().cpu().numpy()
        self._readout = species_readout(self.z_table, scale * np.concatenate(ws), e0 + scale * offset + shift)
        return self._readout
