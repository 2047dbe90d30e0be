from __future__ import annotations

import copy

import pytest
import yaml

from weir.durations import parse_duration
from weir.errors import ConfigError, SpecError
from weir.settings import load_settings
from weir.spec import load_spec, parse_spec

with open("examples/demo.yaml") as fh:
    DEMO = yaml.safe_load(fh)


def demo(**over):
    d = copy.deepcopy(DEMO)
    d.update(over)
    return d


def test_demo_spec_is_valid_and_fills_defaults():
    spec = load_spec("examples/demo.yaml")
    assert spec.topics.events == "weir.demo.events"
    assert spec.topics.dead_letters == "weir.demo.dead-letters"
    assert spec.features[7].name == "loan_mean_1h" and spec.features[7].window == 3600.0
    assert spec.features[0].name == "salary"
    assert len(spec.feature_names) == 10
    assert len(spec.spec_hash()) == 64


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda d: d["features"][7].update(window="0s"),
            r"features\[7\]\.window: window must be > 0",
        ),
        (lambda d: d["features"][7].update(window="soon"), r"features\[7\]\.window: a duration"),
        (lambda d: d["features"][1].update(field="comission"), r"did you mean 'commission'"),
        (lambda d: d.update(modle={}), r"modle: unknown key; did you mean 'model'"),
        (lambda d: d.update(task="ranking"), r"task: Input should be 'binary'"),
        (lambda d: d.pop("features"), r"features: required key is missing"),
        (lambda d: d["features"].append({"agg": "mean", "window": "1h"}), r"needs a `field`"),
        (lambda d: d["features"].append({"agg": "raw", "field": "age"}), r"duplicate feature name"),
        (lambda d: d.update(name="Demo Pipeline"), r"name: name must match"),
        (lambda d: d["model"]["steps"].append({"class": "nodots"}), r"dotted path"),
        (
            lambda d: d["model"].update(features=["salary", "comission"]),
            r"model\.features\[1\]: 'comission' is not a feature \(did you mean 'commission'\?\)",
        ),
        (lambda d: d["model"].update(features=[]), r"model\.features: empty"),
    ],
)
def test_spec_errors_name_field_and_fix(mutate, match):
    d = copy.deepcopy(DEMO)
    mutate(d)
    with pytest.raises(SpecError, match=match):
        parse_spec(d)


def test_categorical_field_rejects_numeric_agg():
    d = demo(fields={**DEMO["fields"], "city": "categorical"})
    d["features"].append({"agg": "mean", "field": "city", "window": "1h"})
    with pytest.raises(SpecError, match="'mean' needs a numeric field but 'city' is categorical"):
        parse_spec(d)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_durations():
    assert parse_duration("1d") == 86400.0
    with pytest.raises(ValueError, match="a duration must be like"):
        parse_duration("5 minutes")


def test_settings_reject_unknown_and_bad_values(monkeypatch):
    monkeypatch.setenv("WEIR_REDIS_URLL", "redis://x")
    with pytest.raises(ConfigError, match=r"WEIR_REDIS_URLL .did you mean WEIR_REDIS_URL"):
        load_settings()
    monkeypatch.delenv("WEIR_REDIS_URLL")
    monkeypatch.setenv("WEIR_KAFKA_BOOTSTRAP", "localhost")
    with pytest.raises(ConfigError, match=r"WEIR_KAFKA_BOOTSTRAP: .*host:port"):
        load_settings()


def test_settings_mask_secrets(monkeypatch):
    monkeypatch.setenv("WEIR_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("WEIR_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("WEIR_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    s = load_settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.safe_dump())
    assert s.confluent_config()["sasl.password"] == "hunter2"


def test_fields_named_by_unquoted_integers() -> None:
    """River's SEA keys its features 0, 1, 2: a user writes them unquoted in YAML."""
    data = yaml.safe_load(
        """
name: sea
task: binary
fields: {0: numeric, 1: numeric, 2: numeric}
features:
  - {agg: raw, field: 0}
  - {agg: mean, field: 1, window: 5m}
  - {agg: raw, field: 2, name: third}
model: {name: lr, steps: [{class: river.linear_model.LogisticRegression}]}
"""
    )
    spec = parse_spec(data)
    assert list(spec.fields) == ["0", "1", "2"]
    assert [(f.name, f.field) for f in spec.features] == [("f_0", "0"), ("f_1_mean_5m", "1"), ("third", "2")]
