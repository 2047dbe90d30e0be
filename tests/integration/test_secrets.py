"""No secret reaches a terminal or a log (issue #13 point 2), with real servers.

Every secret-bearing variable is set to a distinctive value: the Redis URL's password
(a private ``redis-server`` with ``requirepass`` that Weir must really use),
``WEIR_REDIS_PASSWORD``, ``WEIR_KAFKA_SASL_PASSWORD``, ``WEIR_MODEL_KEY``,
``GRAFANA_TOKEN``/``GRAFANA_PASSWORD`` and a Grafana URL with ``user:pass``. Then every
command that prints the configuration or connects runs as a real subprocess: ``weir
config``, ``validate``, a worker for real on the shared Kafka, ``produce``, ``status``,
``models``, ``retrain``, ``report``, and their error paths (a closed port, a wrong
password). Their stdout, stderr and every file they left (the report, ``WEIR_DATA_DIR``,
the worker's log) are searched for each secret. Also ``weir status SPEC`` into a closed
pipe (issue #18 point 6).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.integration.private_redis import PrivateRedis
from tests.integration.processes import free_port
from weir.spec import load_spec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WEIR = [sys.executable, "-m", "weir.cli"]

URL_PASSWORD = "urlpw-Zk41rT9"
SECRETS = {
    "WEIR_REDIS_URL password": URL_PASSWORD,
    "WEIR_REDIS_PASSWORD": "redispw-Qm82sY4",
    "WEIR_KAFKA_SASL_PASSWORD": "saslpw-Hx93uV6",
    "WEIR_MODEL_KEY": "modelkey-Vb57wX2",
    "GRAFANA_TOKEN": "glsa-tok-Np66aB8",
    "GRAFANA_PASSWORD": "grafpw-Lt24cD1",
    "Grafana URL password": "grafurlpw-Rc19eF3",
}


@pytest.fixture
def secure_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server that refuses clients without the URL's password."""
    server = PrivateRedis(tmp_path / "redis", password=URL_PASSWORD)
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.get("x")
        anonymous.close()
        yield server
    finally:
        server.stop()


def _closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


class Runner:
    """Runs ``weir`` subprocesses with the secrets set and keeps everything they print."""

    def __init__(self, tmp: Path, kafka: str, redis_url: str) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.data_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIR_", "GRAFANA_"))}
        env.update(
            PYTHONPATH=str(REPO),
            WEIR_KAFKA_BOOTSTRAP=kafka,
            WEIR_REDIS_URL=redis_url,
            WEIR_REDIS_PASSWORD=SECRETS["WEIR_REDIS_PASSWORD"],
            WEIR_KAFKA_SASL_USERNAME="weir",
            WEIR_KAFKA_SASL_PASSWORD=SECRETS["WEIR_KAFKA_SASL_PASSWORD"],
            WEIR_MODEL_KEY=SECRETS["WEIR_MODEL_KEY"],
            WEIR_DATA_DIR=str(self.data_dir),
            WEIR_METRICS_PORT="0",
            GRAFANA_TOKEN=SECRETS["GRAFANA_TOKEN"],
            GRAFANA_USER="admin",
            GRAFANA_PASSWORD=SECRETS["GRAFANA_PASSWORD"],
        )
        self.env = env
        self.outputs: list[tuple[str, str]] = []

    def run(self, *args: str, timeout: float = 180.0, **env: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*WEIR, *args],
            cwd=self.tmp,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.outputs.append((f"weir {' '.join(args)} {env or ''}", done.stdout + done.stderr))
        return done

    def fails(self, *args: str, **env: str) -> str:
        """Run a command that must fail with one ``weir: error:`` line; returns its stderr."""
        done = self.run(*args, timeout=180.0, **env)
        assert done.returncode == 1, f"weir {' '.join(args)}: {done.returncode}\n{done.stderr}"
        assert "weir: error:" in done.stderr and "Traceback" not in done.stderr, done.stderr
        return done.stderr

    def assert_no_secret(self) -> None:
        # Every file the commands left in their working directory and WEIR_DATA_DIR (the
        # report, Faust's data dir, the worker's log), not the test's own redis.conf.
        texts = list(self.outputs)
        files = [p for p in sorted(self.tmp.rglob("*")) if p.is_file() and "redis" not in p.parts]
        assert self.tmp / "report.html" in files
        for path in files:
            if path.stat().st_size < 50_000_000:
                texts.append((str(path), path.read_bytes().decode(errors="replace")))
        for where, text in texts:
            for what, secret in SECRETS.items():
                assert secret not in text, f"{what} appears in {where}:\n{text[-3000:]}"


def _spec_file(tmp: Path, make_topics: Any) -> tuple[Path, Any]:
    spec = make_topics.for_spec(load_spec(REPO / "examples/demo.yaml"))
    path = tmp / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)))
    return path, spec


def test_no_secret_is_shown_or_logged(
    stack: Any, secure_redis: PrivateRedis, make_topics: Any, consume_all: Any, tmp_path: Path
) -> None:
    path, spec = _spec_file(tmp_path, make_topics)
    weir = Runner(tmp_path, stack.kafka_bootstrap, secure_redis.url)
    spec_arg = str(path)

    # -- what prints the configuration ---------------------------------------------------
    config = weir.run("config")
    assert config.returncode == 0, config.stderr
    assert f"WEIR_REDIS_URL=redis://:***@127.0.0.1:{secure_redis.port}/0" in config.stdout
    assert "WEIR_MODEL_KEY=**********" in config.stdout
    assert "WEIR_KAFKA_SASL_PASSWORD=**********" in config.stdout
    validate = weir.run("validate", spec_arg)
    assert validate.returncode == 0 and ": ok" in validate.stdout, validate.stderr

    # -- a worker for real: Kafka, and the Redis that needs the URL's password -----------------
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [*WEIR, "worker", spec_arg, "--role", "all", "--", "--without-web", "-l", "info"],
            cwd=tmp_path,
            env=weir.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            produced = weir.run(
                "produce",
                spec_arg,
                "river:synth.Agrawal?seed=7",
                "--limit",
                "300",
                "--label-delay",
                "0.5",
                "--no-progress",
            )
            assert produced.returncode == 0, produced.stderr
            predictions = consume_all(spec.topics.predictions, 300, timeout=240)
            assert len(predictions) == 300, log_path.read_text(errors="replace")[-3000:]
            for args in (
                ("status", spec_arg),
                ("status", spec_arg, "--json"),
                ("models", spec_arg, "list"),
                ("retrain", spec_arg, "--reason", "secrets test"),
                ("report", spec_arg, "--out", str(tmp_path / "report.html")),
            ):
                done = weir.run(*args)
                assert done.returncode == 0, f"{args}: {done.stderr}"
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(10)
    worker_log = log_path.read_text(errors="replace")
    weir.outputs.append(("the worker's stdout and stderr", worker_log))
    assert "Traceback" not in worker_log, worker_log[-3000:]

    # The URL's password was really used: the worker's state is in the protected Redis.
    client = redis.Redis(host="127.0.0.1", port=secure_redis.port, password=URL_PASSWORD)
    try:
        assert client.dbsize() > 0, "the worker wrote nothing to the password-protected Redis"
    finally:
        client.close()

    # -- #18 point 6: `weir status SPEC` into a pipe its reader closed ---------------------------
    proc = subprocess.Popen(
        [*WEIR, "status", spec_arg],
        cwd=tmp_path,
        env=weir.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141 and err == "", err

    # -- error paths: the server named, its password not ------------------------------------
    dead = _closed_port()
    dead_redis = f"redis://:{URL_PASSWORD}@127.0.0.1:{dead}/0"
    for args in (("status", spec_arg), ("models", spec_arg, "list"), ("worker", spec_arg)):
        err = weir.fails(*args, WEIR_REDIS_URL=dead_redis)
        assert f"redis://:***@127.0.0.1:{dead}/0" in err, err
    wrong = f"redis://:{SECRETS['WEIR_REDIS_PASSWORD']}@127.0.0.1:{secure_redis.port}/0"
    err = weir.fails("status", spec_arg, WEIR_REDIS_URL=wrong)
    assert "refused the credentials" in err and f"redis://:***@127.0.0.1:{secure_redis.port}/0" in err
    dead_kafka = f"127.0.0.1:{_closed_port()}"
    kafka_commands: list[tuple[str, ...]] = [
        ("produce", spec_arg, "river:synth.Agrawal", "--limit", "5", "--no-progress"),
        ("report", spec_arg),
        ("retrain", spec_arg),
        ("worker", spec_arg),
    ]
    for kafka_args in kafka_commands:
        err = weir.fails(*kafka_args, WEIR_KAFKA_BOOTSTRAP=dead_kafka)
        assert dead_kafka in err, err
    grafana = f"http://admin:{SECRETS['Grafana URL password']}@127.0.0.1:{_closed_port()}"
    err = weir.fails("dashboards", "publish", "--url", grafana, "--dir", str(REPO / "dashboards"))
    assert "http://admin:***@127.0.0.1:" in err, err
    err = weir.fails(
        "dashboards", "publish", "--url", grafana, "--dir", str(REPO / "dashboards"), GRAFANA_TOKEN=""
    )
    assert "http://admin:***@127.0.0.1:" in err, err

    weir.assert_no_secret()
