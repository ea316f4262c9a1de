"""FeatureSet selection and alignment across models."""

from __future__ import annotations

import numpy as np
import pytest

from umlip_latents.features import Block, FeatureSet, align


def _fs(ids, sizes, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    species = np.concatenate([np.full(s, 10 + i) for i, s in enumerate(sizes)])
    return FeatureSet(rng.normal(size=(n, dim)).astype(np.float32), np.repeat(np.arange(len(sizes)), sizes),
                      species, [Block("f", 0, dim)], structure_ids=list(ids), subsets=[f"s{i % 2}" for i in range(len(ids))],
                      energy=np.arange(len(ids), dtype=float))


def test_select_reorders_atoms_with_their_structures():
    fs = _fs(["a", "b", "c"], [2, 3, 1])
    sub = fs.select(["c", "a"])
    np.testing.assert_array_equal(sub.values, np.concatenate([fs.values[5:6], fs.values[0:2]]))
    np.testing.assert_array_equal(sub.structure_index, [0, 1, 1])
    assert sub.subsets == ["s0", "s0"] and list(sub.energy) == [2.0, 0.0]
    assert list(sub.atom_subsets()) == ["s0", "s0", "s0"]
    with pytest.raises(KeyError, match="zzz"):
        fs.select(["zzz"])


def test_align_keeps_common_structures_in_one_order():
    a = _fs(["a", "b", "c"], [2, 3, 1], seed=1)
    b = a.select(["a", "c"])  # a model that skipped "b"
    out = align({"m1": a, "m2": b})
    assert out["m1"].structure_ids == out["m2"].structure_ids == ["a", "c"]
    np.testing.assert_array_equal(out["m1"].species, out["m2"].species)
    np.testing.assert_array_equal(out["m2"].values, b.values)
