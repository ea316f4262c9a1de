"""Notebook 03 with the MACE back end (offline: a small MACE pretrained here), end to end.

The committed notebook carries the CHGNet run (checked by nbval); this runs the other branch
with papermill on a tiny budget and checks the numbers it reports are there and sane.
"""

from __future__ import annotations

import json

import yaml

from umlip_latents import paths
from umlip_latents.notebooks import run_notebook

MACE_SMOKE = {
    "backend": "mace", "base_model": "pretrained-here", "ft_dataset": "mpf-alkali-tp", "ft_limit": 80,
    "ft_max_atoms": 8, "ft_split": [0.4, 0.1, 0.5], "epochs": 2, "lr": 0.005, "ft_batch_size": 4,
    "ft_patience": 1, "ft_refit_offsets": True, "ft_options": {},
    "ft_test_size": 0.5, "pretrain_limit": 150, "pretrain_epochs": 3, "dataset": "mptrj-random-1k", "limit": 120,
    "layer": "last", "seed": 0, "device": "cpu",
}


def test_notebook03_runs_with_the_mace_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("UMLIP_LATENTS_FINETUNE", str(tmp_path / "finetune"))
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path / "store"))
    params = tmp_path / "mace.yml"
    params.write_text(yaml.safe_dump(MACE_SMOKE))
    out = run_notebook(paths.project_root() / "notebooks" / "03-finetuning-bias.ipynb", tmp_path / "03.ipynb", params)
    nb = json.loads(out.read_text())
    text = "\n".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                     for o in c.get("outputs", []))
    assert "not a foundation model" in text  # the base is labelled plainly
    assert "every model reconstructs itself (GFRE < 0.05): True" in text
    assert "all values finite: True" in text
    assert "epoch curves end at 0: True" in text
    # the learning curves: a figure of its own, after the accuracy table
    learning = [c for c in nb["cells"] if c.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("name")
                == "fig-ft-learning"]
    assert len(learning) == 1 and any("image/png" in o.get("data", {}) for o in learning[0]["outputs"])
    # every protocol's checkpoints are derived models: 4 runs of at most 2 epochs, plus the base
    runs = sorted(p.name for p in (tmp_path / "finetune").iterdir())
    assert sum(r.startswith("mace-") and "pretrain" not in r for r in runs) == 4, runs
    assert any("pretrain" in r for r in runs)
