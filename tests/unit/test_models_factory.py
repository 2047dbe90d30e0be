"""Contract suite for the model factory: every model kind builds, predicts untrained,
learns, predicts trained, and pickles; plus the error messages."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from models.factory import build_model, check_task, coerce_label, learn, model_input, predict
from weir.errors import InvalidMessage, ModelError
from weir.spec import ModelSpec, Task, parse_spec
from weir.types import FeatureValue, LabelValue

MODELS: dict[str, tuple[Task, list[Any]]] = {
    "logreg_pipeline": (
        "binary",
        [
            "river.preprocessing.StandardScaler",
            {
                "class": "river.linear_model.LogisticRegression",
                "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.1}}},
            },
        ],
    ),
    "hoeffding_tree": ("multiclass", ["river.tree.HoeffdingTreeClassifier"]),
    "linear_regression": (
        "regression",
        ["river.preprocessing.StandardScaler", "river.linear_model.LinearRegression"],
    ),
}


def _spec(steps: list[Any]) -> ModelSpec:
    return ModelSpec.model_validate({"steps": steps})


def _examples(task: Task) -> list[tuple[dict[str, FeatureValue], LabelValue]]:
    out = []
    for i in range(60):
        a, b = float(i % 7), float((i * 3) % 5)
        x: dict[str, FeatureValue] = {"a": a, "b": b, "c": None}
        if task == "binary":
            y: LabelValue = a > 3
        elif task == "multiclass":
            y = ["red", "green", "blue"][i % 3]
        else:
            y = 2.0 * a - b
        out.append((model_input(x), y))
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_contract(name: str) -> None:
    task, steps = MODELS[name]
    model = build_model(_spec(steps))
    check_task(model, task)
    data = _examples(task)
    # Untrained: no crash; classifiers that saw no class give (None, None).
    pred, proba = predict(model, data[0][0], task)
    if task == "regression":
        assert isinstance(pred, float) and proba is None
    else:
        assert pred is None or isinstance(pred, bool | str)
    for x, y in data:
        learn(model, x, y, task)
    pred, proba = predict(model, data[1][0], task)
    if task == "regression":
        assert isinstance(pred, float)
        assert proba is None
    else:
        assert proba is not None and all(isinstance(k, str) for k in proba)
        assert abs(sum(proba.values()) - 1.0) < 1e-6
        assert str(pred) == max(proba, key=proba.__getitem__)
    clone = pickle.loads(pickle.dumps(model))
    assert predict(clone, data[1][0], task) == predict(model, data[1][0], task)


def test_untrained_tree_predicts_none() -> None:
    model = build_model(_spec(["river.tree.HoeffdingTreeClassifier"]))
    assert predict(model, {"a": 1.0}, "binary") == (None, None)


def test_bad_class_did_you_mean() -> None:
    with pytest.raises(ModelError, match=r"steps\[1\]\.class.*did you mean.*LogisticRegression"):
        build_model(_spec(["river.preprocessing.StandardScaler", "river.linear_model.LogisticRegresion"]))


def test_bad_module() -> None:
    with pytest.raises(ModelError, match=r"steps\[0\]\.class: cannot import module.*linear_model"):
        build_model(_spec(["river.linear_modl.LogisticRegression"]))


def test_bad_param_named() -> None:
    with pytest.raises(ModelError, match=r"steps\[0\]\.params: unknown parameter.*'l2'"):
        build_model(_spec([{"class": "river.linear_model.LogisticRegression", "params": {"l22": 0.1}}]))


def test_nested_bad_class() -> None:
    with pytest.raises(ModelError, match=r"steps\[0\]\.params\.optimizer\.class.*SGD"):
        build_model(
            _spec(
                [
                    {
                        "class": "river.linear_model.LogisticRegression",
                        "params": {"optimizer": {"class": "river.optim.SDG"}},
                    }
                ]
            )
        )


def test_not_an_estimator() -> None:
    with pytest.raises(ModelError, match="not a River estimator"):
        build_model(_spec(["river.optim.SGD"]))


def test_last_step_transformer_refused() -> None:
    with pytest.raises(ModelError, match="last step must be a classifier or regressor"):
        build_model(_spec(["river.preprocessing.StandardScaler"]))


def test_task_mismatch() -> None:
    model = build_model(_spec(["river.linear_model.LinearRegression"]))
    with pytest.raises(ModelError, match="task is 'binary'"):
        check_task(model, "binary")


def test_demo_spec_builds() -> None:
    from weir.spec import load_spec

    spec = load_spec("examples/demo.yaml")
    check_task(build_model(spec.model), spec.task)


def _pipeline(task: str, classes: list[str] | None = None):
    data = {
        "name": "t",
        "task": task,
        "fields": {"a": "numeric"},
        "features": [{"agg": "raw", "field": "a"}],
        "model": {"steps": ["river.linear_model.LinearRegression"]},
    }
    if classes:
        data["classes"] = classes
    return parse_spec(data)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (True, True),
        (False, False),
        (0, False),
        (1, True),
        ("0", False),
        ("1", True),
        ("true", True),
        ("false", False),
        ("TRUE", True),
        (1.0, True),
    ],
)
def test_coerce_binary(value: object, want: bool) -> None:
    assert coerce_label(value, _pipeline("binary")) is want


@pytest.mark.parametrize("value", [2, "maybe", None, [1], {"a": 1}, 0.5])
def test_coerce_binary_invalid(value: object) -> None:
    with pytest.raises(InvalidMessage, match="binary label") as info:
        coerce_label(value, _pipeline("binary"))
    assert info.value.reason == "label_type"


def test_coerce_binary_named_classes() -> None:
    spec = _pipeline("binary", ["legit", "fraud"])
    assert coerce_label("fraud", spec) is True
    assert coerce_label("legit", spec) is False


def test_coerce_multiclass() -> None:
    spec = _pipeline("multiclass", ["a", "b"])
    assert coerce_label("a", spec) == "a"
    with pytest.raises(InvalidMessage, match="not one of") as info:
        coerce_label("c", spec)
    assert info.value.reason == "label_class"
    with pytest.raises(InvalidMessage, match="must be a string"):
        coerce_label(None, spec)
    assert coerce_label(3, _pipeline("multiclass")) == "3"


def test_coerce_regression() -> None:
    spec = _pipeline("regression")
    assert coerce_label(3, spec) == 3.0
    assert coerce_label("2.5", spec) == 2.5
    for bad in ("x", None, True, float("nan")):
        with pytest.raises(InvalidMessage, match="regression target") as info:
            coerce_label(bad, spec)
        assert info.value.reason == "label_type"


def test_model_features_select_what_the_model_reads() -> None:
    """``model.features``: the model ignores every other feature, in learning and predicting."""
    import copy

    import yaml

    with open("examples/demo.yaml") as fh:
        d = copy.deepcopy(yaml.safe_load(fh))
    d["model"] = {"steps": ["river.linear_model.LogisticRegression"], "features": ["salary"]}
    model = build_model(parse_spec(d).model)
    plain = build_model(parse_spec({**d, "model": {"steps": d["model"]["steps"]}}).model)
    for i in range(50):
        x = {"salary": float(i % 7), "loan": float(i)}
        learn(model, x, i % 7 > 3, "binary")
        learn(plain, x, i % 7 > 3, "binary")
    probe = {"salary": 6.0, "loan": 1000.0}
    assert predict(model, probe, "binary")[1] == predict(model, {"salary": 6.0}, "binary")[1]
    assert predict(plain, probe, "binary")[1] != predict(plain, {"salary": 6.0}, "binary")[1]
