"""Command line: listing, extraction with summary, one clear error line for bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from umlip_latents.cli import main


def test_models_list_shows_every_model_and_availability(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "chgnet-0.3.0" in out and "sevennet-mf-0" in out and "mace-mp-0b3-medium" in out
    mace_line = next(ln for ln in out.splitlines() if ln.startswith("mace-mp-0b3-medium"))
    assert "available=no" in mace_line


def test_models_list_shows_the_file_every_model_expects(capsys, tmp_path, monkeypatch):
    """Each line names the file the model is looked for as (checkpoints folder + registry file name,
    e.g. the paper's PET-MAD as ``pet-mad-s-v1.0.2.ckpt``), or the wheel that bundles it."""
    import umlip_latents.extract as extract
    from umlip_latents.registry import load_registry

    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setattr(extract, "availability", lambda spec: (False, "not probed"))  # the column, not the probe
    assert main(["models", "list"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if " file=" in ln}
    specs = load_registry(derived=False)
    assert set(lines) == set(specs)
    for key, spec in specs.items():
        src = spec.source
        want = (f"({src['package']} wheel: {src['name']})" if src["kind"] == "wheel"
                else str(tmp_path / (src.get("path") or src["filename"])))
        assert f" file={want} " in lines[key], (key, lines[key])
    assert f" file={tmp_path / 'pet-mad-s-v1.0.2.ckpt'} " in lines["pet-mad-s-v1.0.2"]
    assert f" file={tmp_path / 'mace-mp-0b3-medium.model'} " in lines["mace-mp-0b3-medium"]


def test_extract_writes_store_and_prints_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path))
    assert main(["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--limit", "4",
                 "--device", "cpu", "--quiet", "--workers", "2", "--batch-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "4 structures" in out and "D=64" in out and "structures/s)" in out
    entry = tmp_path / "mpf-alkali-tp-n4-s0" / "chgnet-0.3.0" / "last"
    assert (entry / "values.npy").exists()
    assert '"workers": 2' in (entry / "meta.json").read_text()


def test_extract_on_a_local_cluster(capsys, tmp_path, monkeypatch):
    """`extract --scheduler local:1` fills the store as a run without it (the cache key, so the entry, is the same)."""
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path))
    args = ["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--limit", "3", "--quiet"]
    assert main([*args, "--scheduler", "local:1"]) == 0
    entry = tmp_path / "mpf-alkali-tp-n3-s0" / "chgnet-0.3.0" / "last"
    values = (entry / "values.npy").read_bytes()
    assert main([*args, "--device", "cpu", "--recompute"]) == 0
    assert (entry / "values.npy").read_bytes() == values
    assert "3 structures" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["extract", "--dataset", "nope", "--model", "chgnet-0.3.0"], "unknown dataset"),
    (["extract", "--dataset", "mpf-alkali-tp", "--model", "nope"], "unknown model"),
    (["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--workers", "0"], "positive integer"),
    (["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--scheduler", "cluster"], "local:N"),
    (["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--scheduler", "s.json"], "does not exist"),
    (["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--scheduler", "local:1", "--workers", "2"],
     "start more workers"),
    (["worker", "--scheduler", "tcp://127.0.0.1:1", "--env", "nope"], "not an environment"),
    (["worker", "--scheduler", "local:2"], "joins a running scheduler"),
])
def test_bad_arguments_give_one_error_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_bad_file_through_console_script(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\nProperties=species:S:1:pos:R:3\nNa 0 0 0\nCl nan 0 2.8\n")
    proc = subprocess.run([sys.executable, "-m", "umlip_latents.cli", "extract", "--dataset", str(bad),
                           "--model", "chgnet-0.3.0", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "non-finite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def bad_inputs(tmp_path):
    """One file per kind of bad input the command line must reject with one line."""
    ok = "Lattice=\"5 0 0 0 5 0 0 0 5\" Properties=species:S:1:pos:R:3 energy=-1.0 pbc=\"T T T\""
    files = {
        "truncated": f"3\n{ok}\nNa 0 0 0\nCl 2.5 0 0\n",
        "malformed": f"2\n{ok}\nNa 0 0 0\nCl 2.5 zero 0\n",
        "nan": f"2\n{ok}\nNa 0 0 0\nCl nan 0 0\n",
        "empty": f"0\n{ok}\n",
        "element": f"2\n{ok}\nNa 0 0 0\nOg 2.5 0 0\n",
    }
    out = {}
    for name, text in files.items():
        out[name] = tmp_path / f"{name}.xyz"
        out[name].write_text(text)
    return out


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot be read"), ("malformed", "cannot be read"), ("nan", "non-finite positions"),
    ("empty", "no atoms"), ("element", "does not support element(s) Og"),
])
def test_bad_input_one_line_nonzero_exit(capsys, bad_inputs, tmp_path, monkeypatch, case, message):
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path / "store"))
    assert main(["extract", "--dataset", str(bad_inputs[case]), "--model", "chgnet-0.3.0", "--quiet",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "store" / case / "chgnet-0.3.0" / "last").exists()  # nothing half-written


def test_checksum_mismatch_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UMLIP_LATENTS_DATA", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "mpf-alkali-tp.xyz").write_text("tampered\n")
    assert main(["datasets", "fetch", "mpf-alkali-tp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "mpf-alkali-tp" in err[0]


@pytest.mark.envs
def test_models_in_other_environments_report_missing_checkpoints(tmp_path, monkeypatch):
    from umlip_latents.extract import models_table

    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    rows = {r["key"]: r for r in models_table()}
    pet = [r for r in rows.values() if r["family"] == "pet"]
    assert pet and not any(r["available"] for r in pet)
    assert all("checkpoints folder" in r["why"] for r in pet if "missing" not in r["why"])
    assert rows["sevennet-0"]["available"]


def test_fine_tuned_models_stay_out_of_the_panel_unless_asked(tmp_path, monkeypatch):
    import yaml

    from umlip_latents.extract import models_table
    from umlip_latents.finetune import derived_spec
    from umlip_latents.registry import get_spec

    monkeypatch.setenv("UMLIP_LATENTS_FINETUNE", str(tmp_path))
    ckpt = tmp_path / "run-x" / "epoch-001.pth.tar"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    spec = derived_spec(get_spec("chgnet-0.3.0"), "run-x-e1", ckpt, "ff", "0" * 64, 1, "run-x", 10, "test data")
    (ckpt.parent / "models.yml").write_text(yaml.safe_dump([spec.to_dict()]))
    assert "run-x-e1" not in {r["key"] for r in models_table()}
    assert "run-x-e1" in {r["key"] for r in models_table(derived=True)}
    assert get_spec("run-x-e1") == spec


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "expected a positive integer, not '0'"),
    (["--limit", "-1"], "expected a positive integer, not '-1'"),
    (["--seed", "-1"], "expected a non-negative integer, not '-1'"),
    (["--batch-size", "0"], "expected a positive integer"),
    (["--device", "gpu"], "device 'gpu' is not a device name"),
    (["--device", "cuda:7"], "device 'cuda:7': this machine has"),
])
def test_bad_limits_seeds_and_devices_give_one_error_line(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path))
    assert main(["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, message", [
    ("2\nProperties=species:S:1:pos:R:3\nNa 0 0 0\nCl 0 0 0\n", "atoms 0 and 1 (Na, Cl) are 0.000 Å apart"),
    ("2\nProperties=species:S:1:pos:R:3\nNa 0 0 0\nCl 0.1 0 0\n", "0.100 Å apart"),
    ('2\nProperties=species:S:1:pos:R:3 pbc="T F F"\nNa 0 0 0\nCl 2.5 0 0\n', "periodic along a"),
])
def test_broken_geometry_gives_one_error_line(capsys, tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path / "store"))
    (tmp_path / "geo.xyz").write_text(text)
    assert main(["extract", "--dataset", str(tmp_path / "geo.xyz"), "--model", "chgnet-0.3.0", "--quiet",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "store").exists()


def test_a_store_that_cannot_be_written_gives_one_error_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path / "a-file" / "store"))
    assert main(["extract", "--dataset", "mpf-alkali-tp", "--model", "chgnet-0.3.0", "--limit", "2", "--quiet",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the feature store" in err[0] and "UMLIP_LATENTS_STORE" in err[0], err


def test_a_truncated_checkpoint_of_a_derived_model_gives_one_error_line(capsys, tmp_path, monkeypatch):
    import yaml

    from umlip_latents.families import adapter_class
    from umlip_latents.finetune import derived_spec
    from umlip_latents.registry import get_spec, local_checkpoint

    monkeypatch.setenv("UMLIP_LATENTS_FINETUNE", str(tmp_path / "ft"))
    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path / "store"))
    base = get_spec("chgnet-0.3.0")
    whole = adapter_class("chgnet").bundled_checkpoint(base) or local_checkpoint(base)
    ckpt = tmp_path / "ft" / "run-t" / "epoch-001.pth.tar"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(whole.read_bytes()[:100000])
    spec = derived_spec(base, "run-t-e1", ckpt, "ff", "0" * 64, 1, "run-t", 10, "test data")
    (ckpt.parent / "models.yml").write_text(yaml.safe_dump([spec.to_dict()]))
    assert main(["extract", "--dataset", "mpf-alkali-tp", "--model", "run-t-e1", "--limit", "2", "--quiet",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load" in err[0] and str(ckpt) in err[0], err
    assert [p.name for p in (tmp_path / "store").rglob("*") if ".staging" in p.name] == []


def test_matrix_of_stored_features_equals_the_in_memory_engine(capsys, tmp_path, monkeypatch):
    """`umlip-latents matrix` streams GFRE/GFRD off the store, LFRE in memory, and names what is missing."""
    import pandas as pd

    from umlip_latents.metrics import reconstruction_matrix
    from umlip_latents.store import entry_dir, read_entry

    monkeypatch.setenv("UMLIP_LATENTS_STORE", str(tmp_path / "store"))
    base = ["--dataset", "mpf-alkali-tp", "--limit", "6"]
    assert main(["matrix", *base, "--models", "chgnet-0.3.0", "diep", "--out", str(tmp_path / "m.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stored last features of chgnet-0.3.0" in err[0] and "umlip-latents extract" in err[0]
    for model in ("chgnet-0.3.0", "diep"):
        assert main(["extract", *base, "--model", model, "--device", "cpu", "--quiet"]) == 0
    out = tmp_path / "m.parquet"
    assert main(["matrix", *base, "--models", "chgnet-0.3.0", "diep", "--metric", "gfre", "gfrd", "lfre",
                 "--test-size", "0.5", "--chunk-rows", "7", "--device", "cpu", "--out", str(out)]) == 0
    assert "2 models x 3 metric(s)" in capsys.readouterr().out
    got = pd.read_parquet(out)
    feats = {m: read_entry(entry_dir("mpf-alkali-tp-n6-s0", m, "last")) for m in ("chgnet-0.3.0", "diep")}
    ref = reconstruction_matrix(feats, ["gfre", "gfrd", "lfre"], test_size=0.5, device="cpu")
    merged = ref.merge(got, on=["source", "target", "metric"], suffixes=("_ref", ""))
    assert len(merged) == len(ref) == 12
    # real float32 features of a few dozen atoms are rank-deficient: 1e-6 on the metric's scale
    np.testing.assert_allclose(merged.value, merged.value_ref, rtol=1e-6, atol=1e-6)
    assert main(["matrix", *base, "--models", "diep", "diep", "--out", str(out)]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["matrix", *base, "--models", "diep", "--out", str(tmp_path / "m.csv")]) == 2
    assert "parquet" in capsys.readouterr().err
    assert main(["matrix", *base, "--models", "diep", "chgnet-0.3.0", "--out", str(out), "--scheduler", "x"]) == 2
    assert "expected local:N" in capsys.readouterr().err
    # each split a task on a local cluster: the same matrix
    boot = tmp_path / "boot.parquet"
    args = ["matrix", *base, "--models", "chgnet-0.3.0", "diep", "--metric", "gfre", "lfre", "--n-boot", "2",
            "--device", "cpu"]
    assert main([*args, "--out", str(boot)]) == 0
    assert main([*args, "--out", str(out), "--scheduler", "local:2"]) == 0
    a, b = pd.read_parquet(boot), pd.read_parquet(out)
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-10, atol=1e-14)
    # each pass's row ranges tasks: the matrix of the same partitions without a cluster
    assert main([*args, "--out", str(boot), "--partitions", "2"]) == 0
    assert main([*args, "--out", str(out), "--partitions", "2", "--scheduler", "local:2"]) == 0
    c, d = pd.read_parquet(boot), pd.read_parquet(out)
    for col in ("value", "ci_low", "ci_high"):
        np.testing.assert_allclose(d[col], c[col], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(c[col], a[col], rtol=1e-6, atol=1e-6)  # one partition: to rounding, rank-deficient
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--partitions", "0"]) == 2
    assert "--partitions" in capsys.readouterr().err
