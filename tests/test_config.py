"""Config schema validation: defaults are filled, and every bad value names its field."""

from __future__ import annotations

import pytest
import yaml

from hfprune.config import load_config, validate_config
from hfprune.errors import ConfigError

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
    assert cfg["calibration"] == {"source": "calibration", "num_sequences": 16, "seq_len": 128, "batch_size": 4,
                                  "seed": 0}
    assert cfg["criterion_options"]["taylor_kd"] == {"alpha": 0.4, "temperature": 0.2, "preprune_ratio": 0.01}
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
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the config must be a mapping"):
        load_config(notmap)
