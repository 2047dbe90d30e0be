"""The Monitor's fair shadow (#16.5) and durable retrain input (#16.4), without Kafka: the
challenger's side is its prediction at serve time, kept by event id until the label; the
retrain reads its window through the injected training-log reader, records the lineage and
saves with a token; both survive a checkpoint, and a checkpoint without them still loads."""

from __future__ import annotations

import pickle
from typing import Any

from models.monitor import Monitor, _Shadow
from models.shadow import ShadowGate
from streams.history import History
from tests.unit.test_retrain_monitor import MemoryRegistry, _setup, agrawal_examples


class Persistence:
    """A classifier that predicts the last label it learned ('0' before any)."""

    def __init__(self) -> None:
        self.last = "0"

    def predict_proba_one(self, x: dict[str, Any]) -> dict[str, float]:
        return {self.last: 1.0}

    def learn_one(self, x: dict[str, Any], y: Any) -> None:
        self.last = "1" if y in (True, "1", 1) else "0"


def _shadowed(labels_needed: int = 4) -> tuple[Monitor, Persistence]:
    spec, _, reg = _setup()
    mon = Monitor(spec, reg, lambda r: None, check_every=10_000)
    model = Persistence()
    mon.shadow = _Shadow("v9", "manual", model, ShadowGate("binary", labels_needed=labels_needed))
    return mon, model


def _pred(eid: str, ts: float) -> dict[str, Any]:
    return {"event_id": eid, "ts": ts, "features": {"a": 1.0}, "prediction": "0", "model_version": "v1"}


def _ex(eid: str, ts: float, y: str, served: str = "0") -> dict[str, Any]:
    return {"event_id": eid, "ts": ts, "features": {"a": 1.0}, "label": y, "prediction": served}


def test_the_challenger_is_scored_on_its_serve_time_prediction() -> None:
    mon, _ = _shadowed()
    # Four events served while the challenger knows only '0'; their labels, all '1', come
    # a label delay later. At label time it would predict '1' from the second on (it learns
    # each label): the unfair comparison. At serve time it predicted '0' four times.
    mon.on_predictions([_pred(f"e{i}", 100.0 + i) for i in range(4)])
    assert len(mon.shadow_pending) == 4
    for i in range(3):
        mon.on_example(_ex(f"e{i}", 100.0 + i, "1"))
    assert mon.shadow is not None and mon.shadow.gate.challenger.n == 3
    assert mon.shadow.gate.challenger.value == 0.0  # the serve-time '0's, not label-time '1's
    mon.on_example(_ex("e3", 103.0, "1"))
    assert mon.shadow is None  # settled on the same four events: both 0.0, not better
    assert len(mon.shadow_pending) == 0


def test_labels_of_events_served_before_the_shadow_are_not_scored() -> None:
    mon, _ = _shadowed()
    mon.on_predictions([_pred("new", 200.0)])
    mon.on_example(_ex("old", 150.0, "1"))  # its prediction came before the shadow began
    assert mon.shadow_unpaired == 1 and mon.shadow is not None and mon.shadow.gate.labels == 0
    mon.on_example(_ex("new", 200.0, "0"))
    assert mon.shadow.gate.labels == 1


def test_pending_and_log_end_survive_a_checkpoint_and_old_ones_load() -> None:
    mon, _ = _shadowed()
    mon.on_predictions([_pred("e0", 100.0), _pred("e1", 101.0)])
    mon.on_example(_ex("e0", 100.0, "1"), (2, 41))
    state = pickle.loads(pickle.dumps(mon.state()))
    spec, _, reg = _setup()
    back = Monitor(spec, reg, lambda r: None, check_every=10_000)
    back.restore(state, {(2, 41): _ex("e0", 100.0, "1")})
    assert sorted(back.shadow_pending.items) == ["e1"] and back.log_end == {2: 42}
    # A checkpoint written before these keys: end offsets from the buffer's positions.
    old = {k: v for k, v in state.items() if k not in ("log_end", "shadow_pending")}
    old["counts"] = {k: v for k, v in old["counts"].items() if k != "shadow_unpaired"}
    again = Monitor(spec, reg, lambda r: None, check_every=10_000)
    assert again.restore(old, {(2, 41): _ex("e0", 100.0, "1")}) == 0
    assert again.log_end == {2: 42} and len(again.shadow_pending) == 0


def _retrain_with(reader: Any, reg: MemoryRegistry | None = None) -> tuple[Monitor, MemoryRegistry]:
    spec, champion, base = _setup()
    reg = reg or base
    mon = Monitor(spec, reg, lambda r: None, check_every=10_000, history=reader)
    for i, r in enumerate(agrawal_examples(spec, champion, [(6, 600)])):
        mon.on_example(r, (i % 2, i // 2))
    mon.on_control({"command": "retrain", "reason": "test"})
    return mon, reg


def test_the_retrain_reads_the_log_records_lineage_and_saves_idempotently() -> None:
    spec, champion, _ = _setup()
    log = agrawal_examples(spec, champion, [(6, 600)])
    asked: list[dict[int, int]] = []

    def reader(upto: dict[int, int]) -> History:
        asked.append(dict(upto))
        return History("tl", list(log[:400]), offsets={0: [0, 200], 1: [0, 200]}, count=2000)  # type: ignore[arg-type]

    mon, reg = _retrain_with(reader)
    assert asked == [{0: 300, 1: 300}]  # the offsets the trigger saw
    assert mon.shadow is not None
    meta = reg.get(mon.shadow.version_id).meta
    hist = meta["history"]
    assert hist["source"] == "kafka" and hist["offsets"] == {"0": [0, 200], "1": [0, 200]}
    assert hist["rows"] == 400 and len(hist["frame_sha256"]) == 64
    assert (hist["first_ts"], hist["last_ts"]) == (log[0]["ts"], log[399]["ts"])
    assert meta["rows"] == 400  # fitted on what was read, not on the 600 in memory

    # A monitor that crashed after that save and replays the same records saves nothing new.
    again, _ = _retrain_with(reader, reg)
    assert again.shadow is not None and again.shadow.version_id == mon.shadow.version_id
    assert len(reg.versions) == 2


def test_a_failed_read_falls_back_to_the_buffer() -> None:
    def reader(upto: dict[int, int]) -> History:
        raise RuntimeError("kafka is away")

    mon, reg = _retrain_with(reader)
    assert mon.shadow is not None
    hist = reg.get(mon.shadow.version_id).meta["history"]
    assert hist["source"] == "buffer" and "kafka is away" in hist["history_error"]
    assert hist["rows"] == 600 and hist["offsets"] == {"0": [0, 300], "1": [0, 300]}
