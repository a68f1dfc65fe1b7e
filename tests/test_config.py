"""Config schema validation: defaults are filled, and every bad value names its field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hfprune.errors import ConfigError
from hfprune.validation import check_models, load_config, validate_config

BASE = {"models": [{"name": "smol", "family": "llama", "source": "smollm2-135m"}],
        "criteria": ["taylor_entropy"], "ratios": [0.2]}


def with_(**changes):
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    cfg.update(changes)
    return cfg


def test_defaults_are_filled_without_touching_the_input():
    raw = with_()
    cfg = validate_config(raw)
    assert "calibration" not in raw
    assert cfg["calibration"] == {"source": "calibration", "sampling": "stream", "num_sequences": 16, "seq_len": 128,
                                  "batch_size": 4, "seed": 0, "seeds": None}
    assert cfg["criterion_options"]["taylor_kd"] == {"alpha": 0.4, "temperature": 0.2,
                                                     "preprune_keep": {"hidden_multiple": 3.9}}
    assert cfg["pruning"]["allocation"] == "uniform" and cfg["evaluation"]["suite"] == "offline7"


@pytest.mark.parametrize("changes, field, message", [
    ({"criteria": ["taylor_entropy", "snip"]}, "criteria[1]", "'snip' is not one of"),
    ({"ratios": [0.2, 1.0]}, "ratios[1]", "greater than or equal to the maximum of 1"),
    ({"ratios": [-0.1]}, "ratios[0]", "less than the minimum"),
    ({"models": [{"name": "m", "family": "gpt2", "source": "x/y"}]}, "models[0].family", "'gpt2' is not one of"),
    ({"ratios": "0.2"}, "ratios", "is not of type 'array'"),
    ({"calibration": {"num_sequences": "many"}}, "calibration.num_sequences", "is not of type 'integer'"),
    ({"evaluation": {"limit": 0}}, "evaluation.limit", "less than the minimum"),
    ({"pruning": {"alocation": "global"}}, "pruning", "Additional properties are not allowed ('alocation'"),
    ({"models": [{"name": "m", "family": "llama"}]}, "models[0]", "'source' is a required property"),
])
def test_invalid_values_name_the_field(changes, field, message):
    with pytest.raises(ConfigError) as err:
        validate_config(with_(**changes), source="cfg.yaml")
    text = str(err.value)
    assert f"cfg.yaml: invalid config field {field!r}" in text and message in text


def test_duplicate_model_names_are_rejected():
    m = BASE["models"][0]
    with pytest.raises(ConfigError, match=r"'models': duplicate model name\(s\) smol"):
        validate_config(with_(models=[m, dict(m)]))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing\.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad\.yaml': not valid YAML \(.* at line 2, column 1\)$"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the config must be a mapping"):
        load_config(notmap)


@pytest.mark.parametrize("changes, field, message", [
    # SmolLM2's embeddings are 21% of its parameters: removing 70% needs more neurons than a layer has
    ({"ratios": [0.2, 0.7]}, "ratios[1]' for model 'smol'",
     "ratio 0.7 removes 1816 neurons per layer but layers only have 1536"),
    ({"ratios": [0.5], "pruning": {"allocation": "global", "min_keep_fraction": 0.5}}, "ratios[0]' for model 'smol'",
     "keeps 239 neurons per layer on average, below the per-layer floor 768"),
    ({"models": [{"name": "smol", "family": "qwen2", "source": "smollm2-135m"}]}, "models[0]'",
     "config says family 'qwen2' but the checkpoint is 'llama'"),
    ({"models": [{"name": "m", "family": "llama", "source": "/no/such/model"}]}, "models[0]'",
     "local source folder '/no/such/model' does not exist"),
    ({"models": [{"name": "m", "family": "llama", "source": "smollm3"}]}, "models[0]'",
     "source 'smollm3' is not an embedded model"),
])
def test_model_dependent_values_fail_before_any_job(changes, field, message):
    """Checked from config.json facts alone (no weights, no conversion) where a grid starts."""
    cfg = validate_config(with_(**changes))  # the schema alone cannot know these
    with pytest.raises(ConfigError, match="invalid config field '" + re.escape(field)) as exc:
        check_models(cfg)
    assert message in str(exc.value)


def test_local_model_config_is_read_for_the_ratio_check(tmp_path, tiny_llama_dir):
    cfg = validate_config(with_(models=[{"name": "t", "family": "llama", "source": str(tiny_llama_dir)}],
                                ratios=[0.001, 0.5]))
    with pytest.raises(ConfigError, match=r"'ratios\[1\]' for model 't': ratio 0.5 removes"):
        check_models(cfg)
    cfg["ratios"] = [0.001]
    check_models(cfg)


def test_family_is_read_from_the_checkpoint_when_not_written(tmp_path, capsys):
    """Embedded models from their facts, local folders from config.json; a written family must match."""
    from conftest import tiny_config

    from hfprune.cli import main

    tiny_config("gemma3").save_pretrained(tmp_path / "g3")  # config.json alone: no weights are read
    tiny_config("phi3").save_pretrained(tmp_path / "phi")
    models = [{"name": "smol", "source": "smollm2-135m"}, {"name": "g3", "source": str(tmp_path / "g3")},
              {"name": "phi", "source": str(tmp_path / "phi"), "family": "phi3"}]
    cfg = validate_config(with_(models=models))
    assert [m["family"] for m in cfg["models"]] == ["llama", "gemma3", "phi3"]
    check_models(cfg)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(with_(models=models)))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["models"]
    assert [m["family"] for m in printed] == ["llama", "gemma3", "phi3"]
    wrong = validate_config(with_(models=[{"name": "g3", "family": "gemma2", "source": str(tmp_path / "g3")}]))
    with pytest.raises(ConfigError, match=r"^config: invalid config field 'models\[0\]': model 'g3': config says "
                                          r"family 'gemma2' but the checkpoint is 'gemma3_text' \(gemma3\)"):
        check_models(wrong)


def test_unsupported_checkpoint_without_family_is_refused_listing_the_families(tmp_path):
    from transformers import GPT2Config

    from hfprune.adapters import ADAPTERS

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    cfg = validate_config(with_(models=[{"name": "g", "source": str(tmp_path / "gpt2")}]))
    assert "family" not in cfg["models"][0]
    with pytest.raises(ConfigError, match=r"'models\[0\]': model 'g': unsupported architecture 'gpt2' \(model_type 'gpt2'\)") as err:
        check_models(cfg)
    assert "\n" not in str(err.value) and all(f"{name}: " in str(err.value) for name in ADAPTERS)


def test_family_enum_is_the_adapter_registry():
    from hfprune.adapters import ADAPTERS
    from hfprune.validation import schema

    assert schema()["properties"]["models"]["items"]["properties"]["family"]["enum"] == list(ADAPTERS)


def test_per_ratio_criterion_options():
    from hfprune.config import criterion_options, per_ratio, score_ratios, score_stem

    cfg = validate_config(with_(criteria=["taylor_kd", "taylor_ce"], ratios=[0.2, 0.3], criterion_options={
        "taylor_kd": {"preprune_keep": None, "by_ratio": {0.3: {"alpha": 0.42, "temperature": 0.5}}}}))
    assert cfg["criterion_options"]["taylor_kd"]["by_ratio"] == {"0.3": {"alpha": 0.42, "temperature": 0.5}}
    assert validate_config(cfg) == cfg  # a reload of the written copy (string keys) is the same
    assert per_ratio(cfg, "taylor_kd") and not per_ratio(cfg, "taylor_ce")
    assert score_ratios(cfg, "taylor_kd") == ["0.2", "0.3"] and score_ratios(cfg, "taylor_ce") == [None]
    assert score_stem("taylor_kd", 0, "0.3") == "taylor_kd/s0.r0.3" and score_stem("taylor_ce", 1) == "taylor_ce/s1"
    assert criterion_options(cfg, "taylor_kd", 0.3) == {"alpha": 0.42, "temperature": 0.5, "preprune_keep": None}
    assert criterion_options(cfg, "taylor_kd", "0.2") == {"alpha": 0.4, "temperature": 0.2, "preprune_keep": None}
    with pytest.raises(ConfigError, match="depend on the pruning ratio; score with --ratio"):
        criterion_options(cfg, "taylor_kd")


@pytest.mark.parametrize("options, field", [
    ({"by_ratio": {"high": {"alpha": 0.1}}}, "is not a pruning ratio"),
    ({"by_ratio": {0.2: {"beta": 0.1}}}, "criterion_options.taylor_kd.by_ratio.0.2"),
    ({"preprune_keep": {"hidden_multiple": 3.9, "ratio": 0.1}}, "criterion_options.taylor_kd.preprune_keep"),
    ({"preprune_ratio": 0.01}, "criterion_options.taylor_kd"),
])
def test_bad_kd_options_are_refused(options, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        validate_config(with_(criteria=["taylor_kd"], criterion_options={"taylor_kd": options}))


def test_paper_config_uses_the_released_settings():
    from hfprune.config import criterion_options
    from hfprune.validation import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "config" / "paper.yaml")
    assert cfg["calibration"]["sampling"] == "per_document"
    assert criterion_options(cfg, "taylor_kd", 0.3) == {"alpha": 0.42, "temperature": 0.5,
                                                        "preprune_keep": {"hidden_multiple": 3.9}}
    assert criterion_options(cfg, "taylor_kd", 0.4)["alpha"] == 0.1
    # SDMPrune the method runs with the released per-ratio settings of its loss
    assert all(criterion_options(cfg, "sdmprune", r) == criterion_options(cfg, "taylor_kd", r) for r in cfg["ratios"])
    assert {"sdmprune", "llm_pruner"} <= set(cfg["criteria"])
