"""``weir models`` and ``weir status`` against the real Redis."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.learner import LearnerCore
from models.registry import ModelRegistry
from weir.cli import main
from weir.settings import get_settings

from .test_learner_registry import make_spec

pytestmark = pytest.mark.integration


@pytest.fixture
def env(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("WEIR_REDIS_URL", settings.redis_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_models_and_status_commands(
    env: Any, redis_client: Any, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = make_spec(unique)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(by_alias=True, mode="json")))
    assert main(["models", str(path), "list"]) == 0
    assert "no model versions yet" in capsys.readouterr().out

    registry = ModelRegistry(redis_client, spec)
    core = LearnerCore.start(spec, registry, redis_client)
    v2 = registry.save(core.model, parent="v1", trigger="drift", reason="psi on a", meta={"rows": 9})
    core.maybe_snapshot(force=True)

    assert main(["models", str(path), "list"]) == 0
    out = capsys.readouterr().out
    assert "v1     champion" in out and "psi on a" in out and "latest snapshot: v1.1" in out
    assert main(["models", str(path), "show", "v2"]) == 0
    assert '"rows": 9' in capsys.readouterr().out
    assert main(["models", str(path), "promote", v2.id]) == 0
    assert registry.alias("champion") == "v2"
    assert main(["models", str(path), "rollback"]) == 0
    assert registry.alias("champion") == "v1"
    assert main(["models", str(path), "show", "v7"]) == 1
    assert "'v7' is unknown; known versions: v1, v2" in capsys.readouterr().err

    core.write_status(time.time())
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "champion: v1" in out and "latest snapshot: v1.1" in out
    assert "learner: version v1, 0 labels learned in all; this run: 0 seen, 0 learned;" in out
    assert "joins (this run): (none)" in out
