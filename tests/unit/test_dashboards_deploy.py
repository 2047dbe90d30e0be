"""deploy/docker-compose.yml and the Grafana provisioning, checked without Docker.

No Docker engine runs on this machine, so the compose file cannot be started
here: these tests check that it loads, that every file it mounts or copies
exists, and that Prometheus, Grafana and the Weir services agree on names,
ports and paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from weir.cli import build_parser
from weir.dashboards import DATASOURCE_UID
from weir.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
WEIR_SERVICES = ("weir-scorer", "weir-learner", "weir-monitor")


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
    build = compose["services"]["weir-scorer"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert "dockerfile_inline" not in build
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (context / src).exists(), f"COPY {src}: missing in {context}"


def test_weir_services_listen_where_prometheus_scrapes(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.compose.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for name in WEIR_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["WEIR_METRICS_HOST"] == "0.0.0.0", "127.0.0.1 cannot be scraped from another container"
        port = env["WEIR_METRICS_PORT"]
        if name == "weir-scorer":
            # Replicas: one target per replica, found through compose's DNS.
            (sd,) = jobs[name]["dns_sd_configs"]
            assert (sd["names"], sd["type"], str(sd["port"])) == ([name], "A", port)
        else:
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


# -- hardening (issue #13 point 4): closed by default, secrets required, a real image ----------

SECRET_VARS = ("REDIS_PASSWORD", "WEIR_MODEL_KEY", "GRAFANA_ADMIN_PASSWORD")
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op and op.endswith("?") and empty:
            raise MissingVariable(f"{name}: {arg}")
        if op and op.endswith("-") and empty:
            return arg
        return value or ""

    return _VAR.sub(sub, text)


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports") or []]


def test_kafka_and_redis_are_not_published_by_default(compose: dict[str, Any]) -> None:
    for name in ("kafka", "redis"):
        assert not _published(compose["services"][name]), f"{name} is published to the host"
    for name, service in compose["services"].items():
        for port in _published(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
            assert not port.endswith((":6379", ":9092", ":9093", ":19092")), f"{name} publishes {port}"


def test_the_expose_override_publishes_them_on_loopback_only() -> None:
    override = yaml.safe_load((DEPLOY / "docker-compose.expose.yml").read_text())
    assert _published(override["services"]["kafka"]) == ["127.0.0.1:9092:9092"]
    assert _published(override["services"]["redis"]) == ["127.0.0.1:6379:6379"]


def test_secrets_have_no_default_and_are_required() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    for var in SECRET_VARS:
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses, f"{var} is not used"
        for use in uses:
            assert use.startswith(":?") and "deploy/.env" in use, (
                f"${{{var}{use}}}: use :? naming deploy/.env"
            )
    # No secret-looking variable has a default (the old ${GRAFANA_PASSWORD:-admin}).
    assert not re.search(r"\$\{\w*(PASSWORD|KEY|TOKEN|SECRET)\w*:?-", text)
    # The example env file gives every required variable, each empty: a copy left unfilled
    # fails exactly as no file does.
    example = _env_file(DEPLOY / ".env.example")
    for var in SECRET_VARS:
        assert example.get(var) == "", f"deploy/.env.example: {var} must be listed, empty"
        with pytest.raises(MissingVariable, match=var):
            interpolate(text, {**{v: "x" for v in SECRET_VARS}, var: ""})
        with pytest.raises(MissingVariable, match=var):
            interpolate(text, {v: "x" for v in SECRET_VARS if v != var})
    with pytest.raises(MissingVariable):
        interpolate(text, example)


def test_weir_and_grafana_use_the_secrets_from_the_env_file() -> None:
    env = {"REDIS_PASSWORD": "r-pw", "WEIR_MODEL_KEY": "m-key", "GRAFANA_ADMIN_PASSWORD": "g-pw"}
    doc = yaml.safe_load(interpolate((DEPLOY / "docker-compose.yml").read_text(), env))
    for name in ("weir-producer", *WEIR_SERVICES):
        service_env = doc["services"][name]["environment"]
        assert service_env["WEIR_REDIS_PASSWORD"] == "r-pw"
        assert service_env["WEIR_MODEL_KEY"] == "m-key"
        assert "@" not in service_env["WEIR_REDIS_URL"], "the password stays out of the shown URL"
    grafana = doc["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "g-pw"
    assert grafana["GF_SECURITY_ADMIN_USER"] == "admin"
    assert str(grafana["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "false"
    redis = doc["services"]["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == "r-pw"
    command = " ".join(redis["command"])
    # The secret reaches redis.conf through the container's environment, not the command line.
    assert "requirepass" in command and '"$REDIS_PASSWORD"' in command and "r-pw" not in command
    assert "redis-server /tmp/redis.conf" in command and "docker-entrypoint.sh" in command
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])


def test_secrets_stay_out_of_git_and_the_build_context() -> None:
    assert "deploy/.env" in (REPO / ".gitignore").read_text().splitlines()
    assert "deploy/.env" in (REPO / ".dockerignore").read_text().splitlines()


def _stages(dockerfile: str) -> list[list[str]]:
    stages: list[list[str]] = []
    for raw in re.sub(r"\\\n", " ", dockerfile).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_and_installs_from_the_lock() -> None:
    stages = _stages((DEPLOY / "Dockerfile").read_text())
    assert len(stages) >= 2, "a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    assert " AS build" in build[0] and " AS runtime" in runtime[0]
    installs = [line for line in build if "pip install" in line and "requirements.lock" in line]
    assert installs and all("--require-hashes" in line for line in installs)
    assert any(line.startswith("COPY deploy/requirements.lock") for line in build)
    # The runtime stage takes the virtualenv from the build stage, installs nothing itself.
    assert any(line.startswith("COPY --from=build /opt/weir") for line in runtime)
    assert not any("pip install" in line for line in runtime)
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"
    assert any(f"--uid {user}" in line for line in runtime if "useradd" in line)
    cmd = next(line for line in runtime if line.startswith("CMD "))
    assert cmd.startswith('CMD ["weir"'), "compose's commands start with `weir`"


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            spec, *hashes = line.split()
            name, _, version = spec.partition("==")
            out[name.lower().replace("_", "-")] = (version, [h for h in hashes if h.startswith("--hash=")])
    return out


@pytest.mark.parametrize("lock", ["requirements.lock", "build.lock"])
def test_lock_files_pin_every_package_with_hashes(lock: str) -> None:
    pins = _lock(DEPLOY / lock)
    assert pins
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"[\w.]+", version), f"{lock}: {name} is not pinned exactly ({version!r})"
        assert hashes and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_matches_pyproject() -> None:
    import tomllib

    pins = _lock(DEPLOY / "requirements.lock")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        name, _, version = dep.partition("==")
        key = name.strip().lower().replace("_", "-")
        assert key in pins, f"{name} is missing from deploy/requirements.lock; regenerate it"
        assert pins[key][0] == version.strip(), (
            f"deploy/requirements.lock pins {key}=={pins[key][0]}, pyproject.toml {dep}; regenerate it"
        )
    build = _lock(DEPLOY / "build.lock")
    assert {"setuptools", "wheel"} <= set(build)
