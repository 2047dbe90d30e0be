"""Fidelity: the live path (served store -> label join -> LearnerCore -> OnlineEvaluator),
replayed with delayed labels, scores what River's progressive validation scores."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from river import datasets, evaluate, metrics
from river.datasets import synth

from models.factory import build_model
from models.replay import replay

from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration

LOGREG = [
    "river.preprocessing.StandardScaler",
    {
        "class": "river.linear_model.LogisticRegression",
        "params": {"optimizer": {"class": "river.optim.SGD", "params": {"lr": 0.05}}},
    },
]
TREE = [{"class": "river.tree.HoeffdingTreeClassifier", "params": {"grace_period": 50}}]


def _phishing() -> list[tuple[dict, Any]]:
    return list(datasets.Phishing())


def _agrawal() -> list[tuple[dict, Any]]:
    return list(itertools.islice(synth.Agrawal(classification_function=2, seed=42), 3000))


def _sea() -> list[tuple[dict, Any]]:
    # SEA names its features 0, 1, 2; feature names are strings on the wire
    rows = itertools.islice(synth.SEA(variant=1, seed=7, noise=0.05), 3000)
    return [({f"x{k}": v for k, v in x.items()}, y) for x, y in rows]


@pytest.mark.parametrize(
    ("data", "steps", "delay"),
    [
        (_phishing, LOGREG, 10),
        (_phishing, TREE, 25),
        (_agrawal, LOGREG, 50),
        (_agrawal, TREE, 50),
        (_sea, LOGREG, 100),
    ],
    ids=["phishing-logreg", "phishing-tree", "agrawal-logreg", "agrawal-tree", "sea-logreg"],
)
def test_replay_matches_progressive_val_score(
    redis_client: Any, unique: Any, data: Any, steps: list, delay: int
) -> None:
    rows = data()
    spec = make_spec(unique, model={"name": "m", "steps": steps})
    result = replay(rows, spec, redis_client, delay=float(delay), step=1.0)
    assert result.events == len(rows) == result.labels
    assert result.core.labels_learned == len(rows)
    assert dict(result.core.joins) == {"hit": len(rows)}
    ours = result.evaluator.get("accuracy")
    assert ours is not None

    reference = evaluate.progressive_val_score(rows, build_model(spec.model), metrics.Accuracy(), delay=delay)
    assert ours == pytest.approx(reference.get(), abs=0.01), (ours, reference.get())
    # it is the same computation, so in practice it is identical
    assert abs(ours - reference.get()) < 1e-9
