"""Weir processes for integration tests: ``weir worker`` and ``weir monitor`` subprocesses.

Each runs in its own session with its log in a file, and stops with SIGTERM (SIGKILL
after 30 s). ``WEIR_METRICS*`` variables of the test's environment are not passed on:
a test gives each process its metrics port. The rest is (the session's ``WEIR_MODEL_KEY``
among them, see conftest.py); ``env`` overrides it, a None value unsets a variable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from weir.spec import PipelineSpec

REPO = Path(__file__).resolve().parents[2]


class WeirProcess:
    """``python -m weir.cli ARGS`` with its output in ``log_path``; :meth:`start` again
    after it exited restarts it (its output appended)."""

    def __init__(
        self, args: list[str], log_path: Path, data_dir: Path, env: dict[str, str | None] | None = None
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_METRICS")}
        for k, v in (env or {}).items():
            self.env.pop(k, None)
            if v is not None:
                self.env[k] = v
        self.env["WEIR_DATA_DIR"] = str(data_dir)
        #: wall-clock times of every start
        self.started_at: list[float] = []
        log_path.write_bytes(b"")
        self.start()

    def start(self) -> None:
        t = time.time()
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "weir.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
                start_new_session=True,
            )
        self.started_at.append(t)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return f"(no log at {self.log_path})"

    def stop(self) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return int(self.proc.returncode)


class Worker(WeirProcess):
    """``weir worker SPEC --role ROLE``; writes the spec to ``tmp/<name>.yaml`` first."""

    def __init__(
        self,
        spec: PipelineSpec,
        tmp: Path,
        role: str = "all",
        metrics_port: int = 0,
        env: dict[str, str | None] | None = None,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.spec_path = tmp / f"{spec.name}.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
        args = ["worker", str(self.spec_path), "--role", role, "--metrics-port", str(metrics_port)]
        args += ["--", "--without-web", "-l", "warn"]
        super().__init__(args, tmp / f"{spec.name}-{role}.log", tmp / "data", env)


class Monitor(WeirProcess):
    """``weir monitor SPEC`` on a spec file a :class:`Worker` wrote."""

    def __init__(
        self,
        spec_path: Path,
        tmp: Path,
        metrics_port: int = 0,
        check_every: int = 250,
        env: dict[str, str | None] | None = None,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        args = ["monitor", str(spec_path), "--metrics-port", str(metrics_port)]
        args += ["--check-every", str(check_every)]
        super().__init__(args, tmp / "monitor.log", tmp / "data", env)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process's /metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str, **labels: str) -> float | None:
    """The sum of the samples ``name`` at ``127.0.0.1:port/metrics`` whose labels include
    ``labels``; None when the endpoint does not answer or has no such sample."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    return float(sum(values)) if values else None


def assigned_members(settings: Any, group: str) -> int:
    """Members of a consumer group that hold at least one partition."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.confluent_config())
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return sum(1 for m in desc.members if m.assignment and m.assignment.topic_partitions)
