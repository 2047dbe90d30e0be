"""deploy/docker-compose.yml and the Grafana provisioning, checked without Docker.

No Docker engine runs on this machine, so the compose file cannot be started
here: these tests check that it loads, that every file it mounts or copies
exists, and that Prometheus, Grafana and the Weir services agree on names,
ports and paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from weir.cli import build_parser
from weir.dashboards import DATASOURCE_UID
from weir.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
WEIR_SERVICES = ("weir-worker", "weir-learner", "weir-monitor")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for vol in service.get("volumes") or []:
        source, target = vol.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def test_services(compose: dict[str, Any]) -> None:
    assert {"kafka", "redis", "prometheus", "grafana", *WEIR_SERVICES} <= set(compose["services"])
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    mounts = [(name, src) for name, svc in compose["services"].items() for src, _ in _bind_mounts(svc)]
    assert mounts, "expected bind mounts for the Prometheus and Grafana configuration"
    for name, source in mounts:
        assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"


def test_weir_image_builds_from_existing_paths(compose: dict[str, Any]) -> None:
    build = compose["services"]["weir-worker"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    for line in build["dockerfile_inline"].splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (context / src).exists(), f"COPY {src}: missing in {context}"
    assert "pip install" in build["dockerfile_inline"]


def test_weir_services_listen_where_prometheus_scrapes(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.compose.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for name in WEIR_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["WEIR_METRICS_HOST"] == "0.0.0.0", "127.0.0.1 cannot be scraped from another container"
        port = env["WEIR_METRICS_PORT"]
        assert jobs[name]["static_configs"][0]["targets"] == [f"{name}:{port}"]
        assert name.startswith("weir"), "the WeirTargetDown alert matches job=~'weir.*'"
        env_names = [k for k in env if k.startswith("WEIR_")]
        known = {f"WEIR_{f.upper()}" for f in Settings.model_fields}
        assert set(env_names) <= known, "the settings loader rejects unknown WEIR_* variables"
    assert "prometheus" in jobs


def test_prometheus_mounts_config_and_rules(compose: dict[str, Any]) -> None:
    mounts = dict(_bind_mounts(compose["services"]["prometheus"]))
    assert mounts["./prometheus/prometheus.compose.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./prometheus/rules"] == "/etc/prometheus/rules"
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.compose.yml").read_text())
    assert prom["rule_files"] == ["rules/*.yml"]  # relative to /etc/prometheus


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    mounts = dict(_bind_mounts(compose["services"]["grafana"]))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/weir.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts["../dashboards"] == provider["options"]["path"]
    assert sorted((DEPLOY / "../dashboards").glob("*.json")), "no dashboards to provision"


@pytest.mark.parametrize("service", ["weir-producer", *WEIR_SERVICES])
def test_weir_commands_exist(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    assert command[0] == "weir"
    assert (REPO / command[2]).exists(), f"{service}: spec {command[2]} missing"
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert isinstance(subcommands, dict)
    assert command[1] in subcommands, f"`weir {command[1]}` does not exist; {service} needs it"
    parser.parse_args(command[1:])
