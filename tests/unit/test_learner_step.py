"""The learner's step as a sequence of calls (no servers: the calls are answered here).

What is tested is the order, the one thing both roles share: a batch is joined, learned,
its markers written, and only then do its offsets move; the records are delivered
(flush) before a snapshot; a retried call is the failed call, not the batch.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import orjson
import pytest

from models.factory import build_model
from models.join import JoinResult
from models.learner import Io, LabelMessage, LearnerCore, run_step
from streams.learner import LearnerLoop
from weir.contracts import Example
from weir.settings import load_settings
from weir.spec import PipelineSpec, parse_spec


def _spec() -> PipelineSpec:
    return parse_spec(
        {
            "name": "steps",
            "task": "binary",
            "fields": {"a": "numeric"},
            "features": [{"agg": "raw", "field": "a"}],
            "model": {"name": "lr", "steps": ["river.linear_model.LogisticRegression"]},
            "learner": {"snapshot_every_labels": 2, "snapshot_every_seconds": 3600},
        }
    )


def _hit(eid: str, label: bool) -> JoinResult:
    ex = Example(eid, "u", 1.0, 2.0, {"a": 1.0}, label, None, None, "v1")
    return JoinResult("hit", eid, ex)


def _msgs(n: int) -> list[LabelMessage]:
    return [
        LabelMessage(orjson.dumps({"event_id": f"e{i}", "label": True, "ts": 1e9 + 2}), 0, 10 + i)
        for i in range(n)
    ]


class Answers:
    """Answers the calls of a step by name; records their order."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def drive(self, step: Any, on_call: Any = None) -> Any:
        result: Any = None
        while True:
            try:
                op = step.send(result)
            except StopIteration as done:
                return done.value
            if op is None:
                result = None
                continue
            assert isinstance(op, Io)
            self.calls.append(op.what)
            if on_call is not None:
                on_call(op.what)
            result = self.answers.get(op.what)


def _answered(step: Any, answers: Answers) -> Any:
    """The step with its label join answered here, its other calls run (run_step)."""
    result: Any = None
    while True:
        try:
            op = step.send(result)
        except StopIteration as done:
            return done.value
        if op is not None and op.what in answers.answers:
            result = answers.answers[op.what]
        else:
            result = yield op


def test_offsets_move_only_once_the_batch_is_learned_and_marked() -> None:
    core = LearnerCore(_spec(), build_model(_spec().model), None, client=None, version_id="v1")
    seen: list[tuple[str, int, dict[int, int]]] = []
    answers = Answers(**{"label join": [_hit("e0", True), _hit("e1", False)]})
    out = answers.drive(
        core.process_step(_msgs(2), now=1e9 + 5),
        on_call=lambda what: seen.append((what, core.labels_learned, dict(core.offsets))),
    )
    assert seen == [("label join", 0, {})]  # the markers go with the next call: one round trip
    assert core.joiner.unwritten == 2
    assert core.offsets == {0: 12} and core.labels_learned == 2 and len(out.training_log) == 2


def test_a_loop_iteration_flushes_before_it_snapshots() -> None:
    spec = _spec()
    core = LearnerCore(spec, build_model(spec.model), registry=object(), client=None, version_id="v1")  # type: ignore[arg-type]
    loop = LearnerLoop(spec, load_settings(kafka_bootstrap="127.0.0.1:1"), core)
    answers = Answers(
        **{"label join": [_hit("e0", True), _hit("e1", False)], "label sweep": (0, []), "snapshot": "v1.1"}
    )
    answers.drive(loop.iteration(_msgs(2), now=1e9 + 5))
    assert answers.calls == [
        "label join",
        "training-log produce",
        "label sweep",
        "training-log produce",
        "champion alias",
        "status",
        "training-log delivery",
        "snapshot",
        "offset commit",
    ]
    assert loop.consistent


def test_run_step_runs_the_calls_inline() -> None:
    def step() -> Any:
        a = yield Io(lambda: 2, "two")
        yield None
        b = yield Io(lambda: 3, "three")
        return a * b

    assert run_step(step()) == 6


def test_an_undelivered_flush_raises_a_transient_error_and_keeps_the_records() -> None:
    """No broker: flush fails (the loop retries it, and never snapshots past it)."""
    import socket

    from confluent_kafka import KafkaException

    from models.learner import StepOutput
    from streams.learner import StepEmitter
    from weir.resilience import dependency_of, is_transient

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emitter = StepEmitter(_spec(), load_settings(kafka_bootstrap=f"127.0.0.1:{port}"))
    emitter.add(StepOutput(training_log=[b"{}", b"{}"], dead_letters=[b"{}"]))
    assert len(emitter.pending) == 3
    try:
        emitter.flush(timeout=0.5)
    except KafkaException as exc:
        assert is_transient(exc) and dependency_of(exc) == "kafka"
        assert "3 training-log/dead-letter records undelivered" in str(exc)
    else:
        raise AssertionError("flush succeeded without a broker")
    # still queued in the producer (len counts its pending requests too): a later flush delivers them
    assert len(emitter.producer) >= 3
    emitter.producer.purge()  # drop them (and their callbacks, so the producer is freed now)
    emitter.producer.flush(0)


def test_a_label_whose_learning_raises_is_dead_lettered_and_the_rest_learned() -> None:
    from river.linear_model import LogisticRegression

    from weir.contracts import decode_dead_letter

    class Poisoned(LogisticRegression):  # type: ignore[misc]
        def learn_one(self, x: Any, y: Any, w: float = 1.0) -> None:  # type: ignore[override]
            if x.get("a") == 13.0:
                raise ValueError("cannot learn a=13")
            super().learn_one(x, y, w)

    core = LearnerCore(_spec(), Poisoned(), None, client=None, version_id="v1")
    bad = JoinResult("hit", "e1", Example("e1", "u", 1.0, 2.0, {"a": 13.0}, True, None, None, "v1"))
    answers = Answers(**{"label join": [_hit("e0", True), bad, _hit("e2", False)]})
    marked: list[Any] = []
    core.joiner.mark_learned = marked.extend  # type: ignore[method-assign,assignment]
    out = run_step(_answered(core.process_step(_msgs(3), now=1e9 + 5), answers))
    assert core.labels_learned == 2 and len(out.training_log) == 2
    [dl] = [decode_dead_letter(d) for d in out.dead_letters]
    assert dl["reason"] == "model_error" and "cannot learn a=13" in dl["detail"]
    assert orjson.loads(dl["value"])["features"] == {"a": 13.0} and dl["key"] == b"e1"
    # marked like the others: neither a redelivery nor the sweep tries it again
    assert [eid for eid, _ in marked] == ["e0", "e1", "e2"]


def _run_scripted(loop: LearnerLoop, consumer: Any, script: Any, apply: Any) -> None:
    """Run ``loop`` with no servers: ``consumer`` answers its polls; each iteration ``apply``-es
    the next item of ``script`` to the loop; the loop stops once the script is done."""

    def iteration(batch: list[LabelMessage], now: float) -> Any:
        got = next(script, None)
        if got is None:
            loop.stop.set()
        else:
            apply(got)
        return
        yield

    loop.open = lambda: []  # type: ignore[method-assign]
    loop.close = lambda: None  # type: ignore[method-assign]
    loop.consumer = consumer
    loop.iteration = iteration  # type: ignore[method-assign]
    loop.run()


def test_the_loop_polls_without_waiting_while_a_backlog_of_held_labels_is_resolved() -> None:
    """Each chunk of held labels (``joiner.more_held``) follows the last at once: a poll
    waiting 200 ms for labels already read made a 60,000-label backlog learn 26 s after
    its last prediction (issue #12)."""
    from streams.learner import POLL_SECONDS

    spec = _spec()
    core = LearnerCore(spec, build_model(spec.model), registry=object(), client=None, version_id="v1")  # type: ignore[arg-type]
    loop = LearnerLoop(spec, load_settings(kafka_bootstrap="127.0.0.1:1"), core)
    waits: list[float] = []

    class Consumer:
        def consume(self, num_messages: int, timeout: float) -> list[Any]:
            waits.append(timeout)
            return []

    # A sweep finds a backlog; each chunk but the last is full and decides some labels.
    held = iter([True, True, True, False, False])
    _run_scripted(loop, Consumer(), held, lambda more: setattr(core.joiner, "more_held", more))
    assert waits == [POLL_SECONDS, 0.0, 0.0, 0.0, POLL_SECONDS, POLL_SECONDS]


def test_the_split_learner_waits_before_its_next_poll_after_a_batch_of_mostly_early_labels() -> None:
    """Ahead of the scorers (labels read before their events are served), the learner lets
    them serve before it reads on: each early label is held, swept and joined again, and
    split roles held 43-53k of a 60,000-label backlog (issue #12). Not while held labels
    are being resolved, and not after a batch of hits."""
    from streams.learner import EARLY_PAUSE, early_pause

    spec = _spec()
    core = LearnerCore(spec, build_model(spec.model), registry=object(), client=None, version_id="v1")  # type: ignore[arg-type]
    steps: list[str] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            steps.append(f"wait {timeout}")
            return False

    loop = LearnerLoop(spec, load_settings(kafka_bootstrap="127.0.0.1:1"), core, stop=Stop())

    class Consumer:
        def consume(self, num_messages: int, timeout: float) -> list[Any]:
            if num_messages == 1:
                steps.append("poll")
            return []

    early = [JoinResult("early", "e1"), JoinResult("early", "e2"), JoinResult("hit", "e3")]
    hits = [JoinResult("hit", "e1"), JoinResult("hit", "e2")]
    # each iteration's batch outcome, and whether held labels are being resolved after it
    script = iter([(early, False), (hits, False), (early, True), (early, False)])

    def apply(got: tuple[list[JoinResult], bool]) -> None:
        loop.early_pause = early_pause(got[0])
        core.joiner.more_held = got[1]

    _run_scripted(loop, Consumer(), script, apply)
    pause = f"wait {EARLY_PAUSE}"
    assert steps == ["poll", pause, "poll", "poll", "poll", pause, "poll"]


def test_held_labels_that_wait_are_looked_at_less_often_while_none_resolves() -> None:
    """Between sweeps, held labels that wait for their events are looked at every 0.2 s,
    doubling after each look that resolves none up to the sweep's second (labels whose
    events never come cost no more than before); a look that resolves some, or new holds,
    bring it back to 0.2 s."""
    from streams.learner import HELD_EVERY, SWEEP_EVERY

    spec = _spec()
    core = LearnerCore(spec, build_model(spec.model), registry=None, client=None, version_id="v1")  # type: ignore[arg-type]
    loop = LearnerLoop(spec, load_settings(kafka_bootstrap="127.0.0.1:1"), core)
    core.joiner.held_waiting = True
    loop.last_sweep = 1e12  # no sweep here

    clock = {"t": 0.0}

    def looks(until: float, answer: list[JoinResult]) -> list[float]:
        """Iterations every 10 ms from the last ``until`` to this one; when a look was made."""
        at = []
        for i in range(round(clock["t"] * 100), round(until * 100)):
            answers = Answers(**{"held labels": answer})
            answers.drive(loop.iteration([], i / 100))
            if answers.calls:
                at.append(i / 100)
        clock["t"] = until
        return at

    def gaps(seen: list[float]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(seen)]

    seen = looks(4.0, [])  # nothing resolved: 0.2 s after the start, then 0.4, 0.8, 1, 1
    assert seen[0] == pytest.approx(HELD_EVERY, abs=0.015)
    expected = [2 * HELD_EVERY, 4 * HELD_EVERY, SWEEP_EVERY, SWEEP_EVERY]
    assert gaps(seen) == pytest.approx(expected, abs=0.015), seen
    seen = looks(6.0, [JoinResult("resolved", "e1", _hit("e1", True).example)])
    assert gaps(seen)[:3] == pytest.approx([HELD_EVERY] * 3, abs=0.015), seen
