"""promtool accepts the Prometheus configurations and rules, and the rule unit tests pass.

promtool is Debian's ``prometheus`` package; a missing promtool fails these
tests (never skips), naming the install command.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"
LOCAL_TEMPLATE = REPO / "deploy" / "local" / "prometheus.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install -y prometheus", pytrace=False)
    return path


def _run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"`{' '.join(argv)}` failed (exit {res.returncode}):\n{out}"
    return out


def test_check_compose_config(promtool: str) -> None:
    out = _run(promtool, "check", "config", str(PROM / "prometheus.compose.yml"))
    assert "1 rule files found" in out  # rules/*.yml resolved next to the config


def test_check_local_stack_config(promtool: str, tmp_path: Path) -> None:
    """The local stack's template, rendered the way deploy/local/stack.py renders it."""
    assert LOCAL_TEMPLATE.exists(), f"{LOCAL_TEMPLATE} is missing: deploy/local/stack.py renders it"
    text = LOCAL_TEMPLATE.read_text().replace("${STATE}", str(tmp_path)).replace("${REPO}", str(REPO))
    (tmp_path / "prometheus" / "targets").mkdir(parents=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    out = _run(promtool, "check", "config", str(config))
    assert "weir.rules.yml" in out  # the local stack loads our rules


def test_check_rules(promtool: str) -> None:
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert files, "no rule files in deploy/prometheus/rules"
    _run(promtool, "check", "rules", *files)


def test_rule_unit_tests(promtool: str) -> None:
    files = sorted(str(p) for p in (PROM / "tests").glob("*.test.yml"))
    assert files, "no promtool tests in deploy/prometheus/tests"
    out = _run(promtool, "test", "rules", *files)
    assert "FAILED" not in out
