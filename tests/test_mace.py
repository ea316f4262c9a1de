"""MACE specifics: backbone equals mace's own descriptors; foundation checkpoints load or say why."""

from __future__ import annotations

import numpy as np
import pytest

from umlip_latents.errors import ModelUnavailable
from umlip_latents.extract import extract_features
from umlip_latents.registry import get_spec, load_registry


def test_backbone_equals_mace_get_descriptors(trained_mace, crystals, mptrj_small):
    from mace.calculators import MACECalculator

    structures = list(crystals) + list(mptrj_small)
    fs = extract_features(trained_mace, structures, layer="backbone", device="cpu")
    calc = MACECalculator(model_paths=trained_mace.source["path"], device="cpu", default_dtype="float64")
    ref = np.concatenate([calc.get_descriptors(a, invariants_only=True) for a in structures])
    assert fs.values.shape == ref.shape
    np.testing.assert_allclose(fs.values, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert [b.name for b in fs.blocks] == [f"interaction_{i}_invariants" for i in range(len(fs.blocks))]
    assert len(fs.blocks) == 2  # the test model has two interaction layers


def test_local_checkpoint_folder_is_used(trained_mace, crystals, tmp_path, monkeypatch):
    """A foundation key resolves to a file the user drops in $UMLIP_LATENTS_CHECKPOINTS."""
    import shutil

    spec = get_spec("mace-mp-0a-small")
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    shutil.copy(trained_mace.source["path"], tmp_path / spec.source["filename"])
    from umlip_latents.extract import adapter_class

    ok, why = adapter_class("mace").availability(spec)
    assert ok and str(tmp_path) in why
    fs = extract_features(spec, crystals[:2], layer="last", device="cpu")
    assert fs.meta["model"] == "mace-mp-0a-small" and fs.dim > 0


@pytest.mark.parametrize("key", sorted(k for k, s in load_registry(derived=False).items() if s.family == "mace"
                                       and s.source["kind"] == "loader"))
def test_unavailable_foundation_model_says_where_to_put_it(key, crystals, tmp_path, monkeypatch):
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = get_spec(key)
    from umlip_latents.extract import adapter_class

    ok, why = adapter_class("mace").availability(spec)
    if ok:
        pytest.skip(f"{key} is available on this machine ({why})")
    with pytest.raises(ModelUnavailable) as err:
        extract_features(spec, crystals[:1], layer="last", device="cpu")
    assert spec.source["filename"] in str(err.value) and "UMLIP_LATENTS_CHECKPOINTS" in str(err.value)


def test_embedding_readout_model_is_refused_with_what_is_missing(trained_mace, crystals, tmp_path, monkeypatch):
    """MACE-MH-1 reads energy through a head embedding: placed as its file, it is refused, naming why."""
    import torch

    spec = get_spec("mace-mh-1-omat")
    model = torch.load(trained_mace.source["path"], weights_only=False)
    model.embedding_readout = torch.nn.Linear(2, 2)  # the attribute MH-1's class carries
    torch.save(model, tmp_path / spec.source["filename"])
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="embedding_readout.*not a fixed linear map"):
        extract_features(spec, crystals[:1], layer="last", device="cpu")
