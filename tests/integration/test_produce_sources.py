"""Every River source the README names, replayed by ``weir produce`` into a real worker.

Issue #17: a spec for River's SEA declared its fields ``'0'``, ``'1'``, ``'2'``; SEA keys
them by integers, so ``weir produce`` sent ``null`` for every field and the worker
dead-lettered every event. Here each source named in README.md and streams/produce.py
(``Phishing``, ``Bananas``, ``synth.Agrawal``, ``synth.SEA``, ``agrawal-drift``,
``sea-drift``) is replayed by :func:`streams.produce.produce` through the real broker
against a spec written as a user would write it (YAML, field names as the data set shows
them, numbers quoted), into a real ``weir worker SPEC`` (role ``all``: scores, joins the
labels, learns) on the real Kafka and Redis. Every event gets a prediction, every label
is joined and learned (a training-log record each), and the dead-letter topic stays empty.

A few hundred events per source. The six workers start together (a module fixture), so
the module takes about a minute on a busy 2-core machine, most of it the workers' start.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import yaml

from streams.admin import delete_keys, delete_topics
from streams.produce import FieldMismatch, produce
from tests.integration.conftest import TopicFactory
from tests.integration.processes import REPO, Worker
from weir.contracts import decode_dead_letter
from weir.settings import Settings
from weir.spec import PipelineSpec, parse_spec

N_EVENTS = 300
LABEL_DELAY = 1.0

_AGRAWAL = """
name: loans
task: binary
fields:
  salary: numeric
  commission: numeric
  age: numeric
  elevel: categorical
  car: categorical
  zipcode: categorical
  hvalue: numeric
  hyears: numeric
  loan: numeric
features:
  - {agg: raw, field: salary}
  - {agg: raw, field: commission}
  - {agg: raw, field: age}
  - {agg: raw, field: elevel}
  - {agg: raw, field: car}
  - {agg: raw, field: hvalue}
  - {agg: raw, field: loan}
  - {agg: mean, field: loan, window: 1h}
  - {agg: count, window: 1h}
model:
  steps: [river.tree.HoeffdingTreeClassifier]
"""

_SEA = """
name: sea
task: binary
fields:
  "0": numeric
  "1": numeric
  "2": numeric
features:
  - {agg: raw, field: "0", name: x0}
  - {agg: raw, field: "1", name: x1}
  - {agg: raw, field: "2", name: x2}
model:
  steps: [river.preprocessing.StandardScaler, river.linear_model.LogisticRegression]
"""

#: Source URI -> the spec a user would write for it.
SOURCES: dict[str, str] = {
    "river:Phishing": """
name: phishing
task: binary
fields:
  empty_server_form_handler: numeric
  popup_window: numeric
  https: numeric
  request_from_other_domain: numeric
  anchor_from_other_domain: numeric
  is_popular: numeric
  long_url: numeric
  age_of_domain: numeric
  ip_in_url: numeric
features:
  - {agg: raw, field: empty_server_form_handler}
  - {agg: raw, field: popup_window}
  - {agg: raw, field: https}
  - {agg: raw, field: request_from_other_domain}
  - {agg: raw, field: anchor_from_other_domain}
  - {agg: raw, field: is_popular}
  - {agg: raw, field: long_url}
  - {agg: raw, field: age_of_domain}
  - {agg: raw, field: ip_in_url}
model:
  steps: [river.preprocessing.StandardScaler, river.linear_model.LogisticRegression]
""",
    "river:Bananas": """
name: bananas
task: binary
entity_field: customer
fields:
  "1": numeric
  "2": numeric
features:
  - {agg: raw, field: "1", name: x1}
  - {agg: raw, field: "2", name: x2}
  - {agg: mean, field: "1", window: 10m, name: x1_mean_10m}
model:
  steps: [river.tree.HoeffdingTreeClassifier]
""",
    "river:synth.Agrawal?seed=1": _AGRAWAL,
    "river:synth.SEA?variant=0&seed=11": _SEA,
    "river:agrawal-drift?position=150&seed=3": _AGRAWAL,
    "river:sea-drift?position=150&seed=3": _SEA,
}


def test_every_source_the_readme_names_is_covered() -> None:
    """The README and produce's docstring name no source this module does not test."""
    text = (REPO / "README.md").read_text() + (REPO / "streams/produce.py").read_text()
    named = {m.split("?")[0] for m in re.findall(r"river:[A-Za-z][\w.-]*", text)} - {"river:NAME"}
    tested = {uri.split("?")[0] for uri in SOURCES}
    assert named, "README.md names no river: source"
    assert named <= tested, f"untested sources: {sorted(named - tested)}"


@dataclass
class Case:
    spec: PipelineSpec
    worker: Worker


@pytest.fixture(scope="module")
def cases(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Case]]:
    """One worker per source, all started at once so their starts overlap."""
    uid = uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("sources")
    factories: list[TopicFactory] = []
    out: dict[str, Case] = {}
    try:
        for i, (source, text) in enumerate(SOURCES.items()):
            factories.append(TopicFactory(settings, f"t{uid}{i}"))
            spec = factories[-1].for_spec(parse_spec(yaml.safe_load(text), source), partitions=1)
            out[source] = Case(spec, Worker(spec, tmp / str(i)))
        yield out
    finally:
        codes = {source: case.worker.stop() for source, case in out.items()}
        client = settings.redis()
        for case in out.values():
            delete_keys(client, case.spec.redis_prefix)
        client.close()
        for factory in factories:
            factory.cleanup()
        # Faust's app makes one internal topic per consumer group.
        delete_topics(settings, [f"{c.spec.consumer_group}-__assignor-__leader" for c in out.values()])
    bad = {s: c for s, c in codes.items() if c not in (0, -signal.SIGTERM)}
    assert not bad, f"workers exited with {bad}:\n" + "\n".join(out[s].worker.tail() for s in bad)


@pytest.mark.parametrize("source", list(SOURCES), ids=lambda s: s.removeprefix("river:").split("?")[0])
def test_source_is_scored_and_learned_with_no_dead_letter(
    source: str, settings: Settings, cases: dict[str, Case], consume_all: Any
) -> None:
    spec, worker = cases[source].spec, cases[source].worker
    summary = produce(
        spec,
        settings,
        source,
        limit=N_EVENTS,
        label_delay=LABEL_DELAY,
        entities=25,
        time_step=1.0,
        start_ts=time.time() - N_EVENTS - 600,
        run_id="p",
        progress=False,
    )
    assert summary["events"] == summary["labels"] == N_EVENTS
    assert summary["unfilled"] == 0 and summary["unused_fields"] == []

    events = consume_all(spec.topics.events, N_EVENTS, timeout=30)
    sample = orjson.loads(events[0].value())
    assert spec.entity_field in sample and all(v is not None for v in sample["data"].values())

    preds = consume_all(spec.topics.predictions, N_EVENTS, timeout=120)
    ids = {orjson.loads(m.value())["event_id"] for m in preds}
    assert ids == {f"p-{i}" for i in range(N_EVENTS)}, worker.tail()
    learned = consume_all(spec.topics.training_log, N_EVENTS, timeout=90)
    assert {orjson.loads(m.value())["event_id"] for m in learned} == ids, worker.tail()

    dead = consume_all(spec.topics.dead_letters, 1, timeout=3, allow_fewer=True)
    reasons = [decode_dead_letter(m.value())["reason"] for m in dead]
    assert reasons == [], f"dead letters: {reasons[:5]}"
    assert worker.alive(), worker.tail()


def test_a_mismatched_spec_fails_and_sends_nothing(
    settings: Settings, make_topics: Any, consume_all: Any
) -> None:
    """The issue's run: a spec whose field names SEA does not have. Before the fix every
    event went out with null fields; now produce refuses and the events topic stays empty."""
    user = yaml.safe_load(_SEA.replace('"0"', "a").replace('"1"', "b").replace('"2"', "c"))
    spec = make_topics.for_spec(parse_spec(user, "mismatch"))
    with pytest.raises(FieldMismatch, match=r"requires field\(s\) 'a', 'b', 'c'.*fields are '0', '1', '2'"):
        produce(spec, settings, "river:synth.SEA?seed=11", limit=N_EVENTS, progress=False)
    assert consume_all(spec.topics.events, 1, timeout=3, allow_fewer=True) == []
