"""Model registry: schema, required panel, availability reporting."""

from __future__ import annotations

import pytest
import yaml

from umlip_latents import registry
from umlip_latents.errors import ModelUnavailable, RegistryError

OFFLINE_PANEL = {"chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan", "sevennet-0", "sevennet-0-22may2024",
                 "sevennet-l3i5", "sevennet-mf-0", "diep"}
MACE = {"mace-mp-0b3-medium", "mace-mp-0a-small", "mace-mp-0a-medium", "mace-mp-0a-large", "mace-off23-small",
        "mace-off23-medium", "mace-off23-large", "mace-matpes-pbe", "mace-matpes-r2scan", "mace-omat-0-medium"}


def test_every_registry_file_follows_the_schema():
    reg = registry.load_registry(derived=False)
    assert OFFLINE_PANEL | MACE <= set(reg)
    for key in OFFLINE_PANEL:
        assert reg[key].source["kind"] == "wheel", key
    for key in MACE - {"mace-mp-0a-large"}:
        assert reg[key].source["kind"] == "loader" and reg[key].family == "mace", key
    # mace_mp("large") fetches MACE_MPtrj_2022.9.model: the paper's large file is a local entry
    assert reg["mace-mp-0a-large"].source == {"kind": "local", "package": "mace-torch",
                                              "path": "2024-01-07-mace-128-L2_epoch-199.model"}
    for spec in reg.values():
        assert spec.parent is None or spec.parent in reg, spec.key
        assert spec.description, spec.key
        assert spec.citation.strip() and spec.licence.strip(), spec.key
    assert "modal" in reg["sevennet-mf-0"].options


GOOD = {"key": "x", "family": "chgnet", "environment": "main",
        "source": {"kind": "wheel", "package": "chgnet", "name": "0.3.0"},
        "training_data": "MPtrj", "functional": "PBE", "layers": {"last": "a"},
        "citation": "Deng et al. (2023)", "licence": "BSD-3-Clause"}


@pytest.mark.parametrize("broken, problem", [
    ({"family": "nope"}, "family"),
    ({"source": {"kind": "wheel"}}, "source.package"),
    ({"layers": {"middle": "x"}}, "layers"),
    ({"colour": "red"}, "colour"),
    ({"environment": "mace"}, "environment"),
])
def test_schema_rejects_bad_entries(tmp_path, broken, problem):
    (tmp_path / "x.yml").write_text(yaml.safe_dump({**GOOD, **broken}))
    with pytest.raises(RegistryError, match=problem):
        registry.load_registry(tmp_path)


@pytest.mark.parametrize("broken, line", [
    ({"training_data": 3}, "training_data: 3 is not of type 'string'"),
    ({"citation": None}, "citation: None is not of type 'string'"),
    ({"licence": ""}, "licence: '' should be non-empty"),
    ({"source": {"kind": "loader", "package": "chgnet", "name": "0.3.0"}},
     "source.filename: 'filename' is a required property"),
    ({"layers": {"last": "a", "middle": "x"}}, "layers.middle: unknown key; allowed: backbone, last"),
    ({"options": {"modal": "PBE"}}, "options.modal: unknown key; allowed: on_isolated_atoms"),
    ({"options": {"on_isolated_atoms": "shout"}}, "options.on_isolated_atoms: 'shout' is not one of"),
    ({"family": "mace", "options": {"task": "omat"}}, "options.task: unknown key; allowed: head, loader"),
    ({"family": "nope"}, "family: 'nope' is not one of ['chgnet', 'diep', 'dpa', 'mace'"),
    ({"derived": {"protocol": "ff", "base": "chgnet-0.3.0", "data_sha256": "0" * 64, "epoch": 1, "run": "r"}},
     "source.kind: 'local' was expected"),
])
def test_a_malformed_entry_gives_one_line_naming_file_entry_and_field(tmp_path, broken, line):
    entries = [dict(GOOD, key="fine"), {**GOOD, **broken}]
    (tmp_path / "x.yml").write_text(yaml.safe_dump(entries))
    with pytest.raises(RegistryError) as err:
        registry.load_registry(tmp_path)
    assert str(err.value).startswith(f"x.yml[1] (x): {line}")
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_names_the_file(tmp_path):
    (tmp_path / "broken.yml").write_text("- key: x\n  family: [chgnet\n")
    with pytest.raises(RegistryError, match=r"^broken\.yml: line \d+: not valid YAML") as err:
        registry.load_registry(tmp_path)
    assert "\n" not in str(err.value)


def test_every_family_of_the_table_has_an_options_schema():
    from umlip_latents.extract.orb import ARCHITECTURES
    from umlip_latents.extract.uma import TASKS
    from umlip_latents.families import load_families, schema

    options = schema("model")["$defs"]["options"]
    assert set(options) == set(load_families())
    assert tuple(options["uma"]["properties"]["task"]["enum"]) == TASKS
    assert tuple(options["orb"]["properties"]["architecture"]["enum"]) == ARCHITECTURES


def test_a_family_without_an_options_schema_takes_any_options(tmp_path, monkeypatch):
    from umlip_latents import paths

    table = yaml.safe_load(paths.families_file().read_text())
    table["toy"] = table["chgnet"]
    (tmp_path / "families.yml").write_text(yaml.safe_dump(table))
    monkeypatch.setenv("UMLIP_LATENTS_FAMILIES", str(tmp_path / "families.yml"))
    spec = registry.validate(dict(GOOD, family="toy", options={"anything": [1, 2]}))
    assert spec.family == "toy" and spec.options == {"anything": [1, 2]}


def test_malformed_fine_tuning_registry_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from umlip_latents.finetune import derived_spec

    monkeypatch.setenv("UMLIP_LATENTS_FINETUNE", str(tmp_path))
    base = registry.get_spec("chgnet-0.3.0")
    ckpt = tmp_path / "run2" / "epoch-001.pth.tar"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    good = derived_spec(base, "run2-e1", ckpt, "ff", "0" * 64, 1, "run2", 10, "test data")
    assert (good.citation, good.licence) == (base.citation, base.licence)
    (tmp_path / "run2" / "models.yml").write_text(yaml.safe_dump([good.to_dict()]))
    bad = {k: v for k, v in good.to_dict().items() if k != "citation"}
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "models.yml").write_text(yaml.safe_dump([dict(bad, key="run1-e1")]))
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / "models.yml").write_text("- key: [\n")
    with pytest.warns(RuntimeWarning) as caught:
        reg = registry.load_registry()
    messages = [str(w.message) for w in caught]
    assert any("run1/models.yml[0] (run1-e1): citation: 'citation' is a required property" in m for m in messages)
    assert any("run3/models.yml: line" in m for m in messages)
    assert "run2-e1" in reg and "run1-e1" not in reg and "chgnet-0.3.0" in reg


def test_a_model_trained_from_scratch_keeps_no_upstream_licence(tmp_path):
    from umlip_latents.finetune import derived_spec

    base = registry.get_spec("mace-off23-small")
    spec = derived_spec(base, "b-e1", tmp_path / "b.model", "bespoke", "0" * 64, 1, "b", 10, "test data")
    assert spec.citation == base.citation and "ASL" not in spec.licence
    assert derived_spec(base, "f-e1", tmp_path / "f.model", "ff", "0" * 64, 1, "f", 10, "x").licence == base.licence


def test_unknown_model_lists_known_ones():
    with pytest.raises(ModelUnavailable, match="chgnet-0.3.0"):
        registry.get_spec("no-such-model")


def test_missing_mace_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    from umlip_latents.extract import adapter_class

    monkeypatch.setenv("UMLIP_LATENTS_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no mace download cache either
    spec = registry.get_spec("mace-mp-0b3-medium")
    ok, why = adapter_class("mace").availability(spec)
    assert not ok and spec.source["filename"] in why


def test_the_papers_checkpoints_are_registered_with_the_files_they_need():
    """Every checkpoint file the paper's scripts name (results.yml ``model_keys``) is a registered model's file."""
    import re

    results = registry.paths.project_root().parent / "shared" / "paper-reference" / "results.yml"
    keys = yaml.safe_load(results.read_text())["model_keys"]
    wanted = set(keys["mace_sizes_mp0a"].values())
    wanted |= {f"MACE-OFF23_{s}" for s in ("small", "medium", "large")}
    wanted |= {v for v in keys["mace_training_sets"].values()}
    wanted |= {"pet-mad-s-v1.0.2", "uma-s-1p1", "DPA-3.1-3M", "pet-spice-l-v1.0.0"}
    wanted |= {v for v in keys["pet_training_sets"].values() if re.fullmatch(r"pet-[a-z]+-l-v[0-9.]+", v)}
    wanted |= {f"pet-omat-{s}-v1.0.0" for s in ("xs", "s", "m", "l")}
    files = set()
    for spec in registry.load_registry(derived=False).values():
        for name in (spec.source.get("filename"), spec.source.get("path")):
            if name:
                files.add(name.rsplit(".", 1)[0] if name.endswith((".model", ".ckpt", ".pt")) else name)
    missing = sorted(w for w in wanted if w not in files)
    assert not missing, f"paper checkpoints without a registered file: {missing}"
