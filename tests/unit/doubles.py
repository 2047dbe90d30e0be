"""Stand-ins shared by unit tests (no Kafka, no Redis)."""

from __future__ import annotations

from typing import Any


class StaticModel:
    """A fixed model: the scorer's ``ModelSource`` that never changes."""

    def __init__(self, model: Any, name: str, version: str) -> None:
        self.model = model
        self.name = name
        self.version = version

    def current(self) -> tuple[Any, str, str]:
        return self.model, self.name, self.version

    def refresh(self) -> bool:
        return False

    def age_seconds(self) -> float:
        return 0.0
