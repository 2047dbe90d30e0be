"""deploy/docker-compose.yml for scale (issue #15 point 6), checked without Docker.

- The file, as compose reads it (variables substituted from deploy/.env.example with the
  secrets filled in), is valid against the Compose Specification's JSON Schema, vendored in
  tests/unit/schemas/ (source and licence in its README); so is the expose override.
- It runs N scorer replicas, one learner and one monitor, each with a healthcheck, all from
  deploy/Dockerfile.
- Every Weir service's command is a real ``weir`` subcommand whose arguments parse with
  weir/cli.py's own parser.
- The healthcheck's script, run against a real /metrics endpoint of Weir's metrics, passes
  while every dependency is up and fails when one is down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from tests.unit.test_dashboards_deploy import SECRET_VARS, _env_file, interpolate
from weir.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"
LONG_RUNNING = ("weir-scorer", "weir-learner", "weir-monitor")
RAW_WEIR_SERVICES = sorted(
    name
    for name, service in yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"].items()
    if service.get("image") == "weir:local"
)


def _as_compose_reads_it(path: Path, **env: str) -> dict[str, Any]:
    values = {**_env_file(DEPLOY / ".env.example"), **{v: "x" * 16 for v in SECRET_VARS}, **env}
    doc = yaml.safe_load(interpolate(path.read_text(), values))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _as_compose_reads_it(DEPLOY / "docker-compose.yml")


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def _errors(validator: Draft7Validator, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.expose.yml"])
def test_compose_files_follow_the_compose_spec(validator: Draft7Validator, name: str) -> None:
    doc = _as_compose_reads_it(DEPLOY / name)
    assert _errors(validator, doc) == []


def test_the_schema_catches_a_broken_service(validator: Draft7Validator, compose: dict[str, Any]) -> None:
    """The validation has teeth: typos compose would refuse are refused here too."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["weir-scorer"]["deploy"]["replicaz"] = 3
    broken["services"]["weir-learner"]["healthcheck"]["interval"] = ["15s"]
    errors = _errors(validator, broken)
    assert any("replicaz" in e for e in errors), errors
    assert any(e.startswith("services/weir-learner/healthcheck/interval") for e in errors), errors


def test_n_scorers_one_learner_one_monitor(compose: dict[str, Any]) -> None:
    services = compose["services"]
    scorer = services["weir-scorer"]
    assert int(scorer["deploy"]["replicas"]) == 3, "SCORER_REPLICAS defaults to 3"
    scaled = _as_compose_reads_it(DEPLOY / "docker-compose.yml", SCORER_REPLICAS="6")
    assert int(scaled["services"]["weir-scorer"]["deploy"]["replicas"]) == 6
    # Replicas cannot share a container name or a host port.
    assert "container_name" not in scorer and not scorer.get("ports")
    assert scorer["command"][scorer["command"].index("--role") + 1] == "scorer"
    assert services["weir-learner"]["command"][-2:] == ["--role", "learner"]
    assert services["weir-monitor"]["command"][:2] == ["weir", "monitor"]
    for name in ("weir-learner", "weir-monitor"):
        assert int(services[name].get("deploy", {}).get("replicas", 1)) == 1, f"{name} must stay single"
    roles = [
        (n, s["command"]) for n, s in services.items() if s.get("command", [None])[:2] == ["weir", "worker"]
    ]
    assert sorted(n for n, _ in roles) == ["weir-learner", "weir-scorer"], (
        "one scorer and one learner service"
    )


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_weir_services_have_healthchecks_and_use_the_dockerfile(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    check = service["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1] == "python"
    assert "9300/metrics" in check["test"][-1]
    assert service["environment"]["WEIR_METRICS_PORT"] == "9300"
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def _weir_services(compose: dict[str, Any]) -> list[str]:
    return sorted(n for n, s in compose["services"].items() if s.get("image") == "weir:local")


def test_every_weir_service_is_found(compose: dict[str, Any]) -> None:
    assert _weir_services(compose) == RAW_WEIR_SERVICES == sorted(["weir-producer", *LONG_RUNNING])


@pytest.mark.parametrize("name", RAW_WEIR_SERVICES)
def test_every_weir_command_parses(compose: dict[str, Any], name: str) -> None:
    command = compose["services"][name]["command"]
    assert command[0] == "weir", f"{name}: the image's entry point is `weir`, got {command[0]!r}"
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert isinstance(subcommands, dict)
    assert command[1] in subcommands, (
        f"{name}: `weir {command[1]}` is no weir command; use one of {sorted(subcommands)}"
    )
    try:
        args = parser.parse_args(command[1:])
    except SystemExit as exc:
        pytest.fail(f"{name}: `{' '.join(command)}` does not parse (argparse exit {exc.code})")
    assert callable(args.func)
    # The spec is a path in the image: deploy/Dockerfile copies examples/ to /app/examples.
    spec = command[2]
    assert spec.startswith("examples/") and (REPO / spec).exists(), f"{name}: spec {spec} is not in the image"


def test_a_bad_argument_would_be_caught() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "examples/demo.yaml", "--role", "scorers"])


def _health_script(compose: dict[str, Any]) -> str:
    test = compose["services"]["weir-scorer"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return str(test[3])


def test_healthcheck_passes_when_up_and_fails_when_a_dependency_is_down(compose: dict[str, Any]) -> None:
    from prometheus_client import CollectorRegistry

    from weir.metrics import MetricsServer
    from weir.resilience import DependencyHealth

    registry = CollectorRegistry()
    health = DependencyHealth(registry, "demo")
    server = MetricsServer(registry, "127.0.0.1", 0)
    script = _health_script(compose).replace("127.0.0.1:9300", f"127.0.0.1:{server.port}")
    assert script != _health_script(compose)

    def run() -> int:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30).returncode

    try:
        assert run() == 0
        health.failed("redis")
        assert run() == 1
        health.ok("redis")
        assert run() == 0
    finally:
        server.stop()
    assert run() != 0, "no /metrics answering: unhealthy"
