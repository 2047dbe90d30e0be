"""The /metrics server of every Weir process."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from weir.errors import ConfigError
from weir.metrics import MetricsServer


def test_a_metrics_port_in_use_is_a_config_error_naming_the_option() -> None:
    """A scorer and a learner started on one host with the default port: the second said
    only ``OSError: [Errno 98] Address already in use`` in a traceback."""
    first = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
    try:
        taken = rf"127\.0\.0\.1:{first.port}.*--metrics-port N or WEIR_METRICS_PORT"
        with pytest.raises(ConfigError, match=taken):
            MetricsServer(CollectorRegistry(), "127.0.0.1", first.port)
    finally:
        first.stop()


def test_the_worker_command_says_so_without_a_traceback() -> None:
    """From outside: ``weir worker`` on a taken port exits 1 with the message."""
    registry = CollectorRegistry()
    Counter("held", "a process holding the port", registry=registry).inc()
    first = MetricsServer(registry, "127.0.0.1", 0)
    try:
        assert b"held_total 1.0" in urllib.request.urlopen(first.url, timeout=5).read()
        run = subprocess.run(
            [sys.executable, "-m", "weir.cli", "worker", "examples/loan-lr.yaml", "--role", "learner"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "WEIR_METRICS_PORT": str(first.port)},
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        first.stop()
    assert run.returncode == 1, run.stderr
    assert "weir: error: cannot serve /metrics" in run.stderr and "--metrics-port" in run.stderr
    assert "Traceback" not in run.stderr
