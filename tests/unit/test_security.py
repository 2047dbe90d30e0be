"""Security checks that need no server (issue #13 points 1 and 2, issue #18 point 6).

* A spec names only allowed classes (``river.`` plus ``WEIR_MODEL_ALLOW``), checked
  before anything is imported or called, through the real ``weir validate`` too.
* Secrets are masked in ``weir config``, error messages, tracebacks and log records.
* A command whose output is closed exits quietly.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.factory import build_component, build_model, check_allowed
from weir import redact
from weir.cli import EXIT_BROKEN_PIPE, main
from weir.errors import ConfigError, ModelError
from weir.settings import get_settings, load_settings
from weir.spec import ComponentSpec, ModelSpec

REPO = Path(__file__).resolve().parents[2]
WEIR = [sys.executable, "-m", "weir.cli"]


def _model(steps: list[Any]) -> ModelSpec:
    return ModelSpec.model_validate({"steps": steps})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIR_", "GRAFANA_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


# -- 1. model steps: an allowlist checked before any import ---------------------------------


@pytest.fixture
def marker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A package whose import writes a marker file: proof of whether it was imported."""
    name = f"weir_marker_{os.getpid()}"
    marker = tmp_path / "imported"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nBoom = dict\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


def test_outside_river_is_refused_before_import(marker_module: tuple[str, Path]) -> None:
    name, marker = marker_module
    spec = _model([{"class": f"{name}.Boom", "params": {}}])
    with pytest.raises(
        ModelError, match=r"model\.steps\[0\]\.class: .*is not allowed.*'river\.'.*WEIR_MODEL_ALLOW"
    ):
        build_model(spec, ["river."])
    assert not marker.exists(), "the module was imported before the allowlist refused it"
    assert name not in sys.modules


def test_every_refused_path_is_listed_and_nothing_runs(marker_module: tuple[str, Path]) -> None:
    name, marker = marker_module
    # The first step is fine and the bad one is nested: still nothing is imported.
    spec = _model(
        [
            "river.preprocessing.StandardScaler",
            {
                "class": "river.linear_model.LogisticRegression",
                "params": {
                    "optimizer": {"class": f"{name}.Boom", "params": {"lr": [{"class": "os.system"}]}}
                },
            },
        ]
    )
    with pytest.raises(ModelError) as info:
        check_allowed(spec, ["river."])
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"model.steps[1].params.optimizer.class: '{name}.Boom' is not allowed")
    assert lines[1].startswith("model.steps[1].params.optimizer.params.lr[0].class: 'os.system'")
    assert not marker.exists()


def test_subprocess_run_is_refused() -> None:
    spec = _model([{"class": "subprocess.run", "params": {"args": ["touch", "pwned"]}}])
    with pytest.raises(ModelError, match=r"'subprocess\.run' is not allowed.*WEIR_MODEL_ALLOW=subprocess\."):
        build_model(spec, ["river."])


def test_private_and_reexported_names_are_refused() -> None:
    with pytest.raises(ModelError, match=r"private attribute"):
        build_component(ComponentSpec.model_validate({"class": "river.base._Something"}), "c", ["river."])
    # river.base.ensemble imports random.Random: allowed by its path, defined elsewhere.
    with pytest.raises(ModelError, match=r"defined in 'random', outside the allowed 'river\.'"):
        build_component(
            ComponentSpec.model_validate({"class": "river.base.ensemble.Random"}), "c", ["river."]
        )


def test_river_functions_are_not_steps() -> None:
    iter_csv = ComponentSpec.model_validate(
        {"class": "river.stream.iter_csv", "params": {"filepath_or_buffer": "/etc/passwd"}}
    )
    with pytest.raises(ModelError, match=r"'river\.stream\.iter_csv' is a function, not a class"):
        build_component(iter_csv, "c", ["river."])


def test_extra_prefix_allows_a_package(marker_module: tuple[str, Path]) -> None:
    name, marker = marker_module
    pkg = Path(marker.parent) / name
    (pkg / "linear.py").write_text(
        "from river import linear_model\n\nclass MyLR(linear_model.LogisticRegression):\n    pass\n"
    )
    spec = _model([f"{name}.linear.MyLR"])
    model = build_model(spec, ["river.", f"{name}."])
    assert type(model).__name__ == "MyLR" and marker.exists()
    # A prefix without its dot covers that module and below, not a longer name.
    check_allowed(spec, ["river.", f"{name}.linear"])
    with pytest.raises(ModelError, match="is not allowed"):
        check_allowed(spec, ["river.", f"{name}.lin"])


def test_setting_model_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_MODEL_ALLOW", " mypkg.models., other ")
    assert load_settings().model_allow_prefixes() == ("river.", "mypkg.models.", "other")
    monkeypatch.setenv("WEIR_MODEL_ALLOW", "my pkg.")
    with pytest.raises(ConfigError, match=r"WEIR_MODEL_ALLOW: .*dotted module path.*'my pkg\.'"):
        load_settings()
    monkeypatch.delenv("WEIR_MODEL_ALLOW")
    assert load_settings().model_allow_prefixes() == ("river.",)


def _evil_spec(tmp_path: Path, steps: list[Any]) -> Path:
    doc = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
    doc["model"] = {"steps": steps}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_weir_validate_refuses_subprocess_run(tmp_path: Path) -> None:
    spec = _evil_spec(tmp_path, [{"class": "subprocess.run", "params": {"args": ["touch", "pwned"]}}])
    done = subprocess.run(
        [*WEIR, "validate", str(spec)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert not (tmp_path / "pwned").exists(), "the spec ran subprocess.run"
    assert "model.steps[0].class: 'subprocess.run' is not allowed" in done.stderr
    assert "'river.'" in done.stderr and "WEIR_MODEL_ALLOW" in done.stderr
    assert "Traceback" not in done.stderr


def test_weir_validate_with_an_allowed_package(tmp_path: Path) -> None:
    pkg = tmp_path / "lib" / "mymodels"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            from river import linear_model

            open({str(marker)!r}, "w").close()

            class MyLR(linear_model.LogisticRegression):
                pass
            """
        )
    )
    spec = _evil_spec(tmp_path, ["mymodels.MyLR"])
    path = os.pathsep.join([str(tmp_path / "lib"), str(REPO)])
    refused = subprocess.run(
        [*WEIR, "validate", str(spec)],
        cwd=tmp_path,
        env=_env(PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "'mymodels.MyLR' is not allowed" in refused.stderr
    assert not marker.exists()
    allowed = subprocess.run(
        [*WEIR, "validate", str(spec)],
        cwd=tmp_path,
        env=_env(PYTHONPATH=path, WEIR_MODEL_ALLOW="other.,mymodels."),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert ": ok" in allowed.stdout and marker.exists()


# -- 2. secrets are masked ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw@h/1", "rediss://user:***@h/1"),
        ("http://admin:s3cret@grafana:3000/x?y=1", "http://admin:***@grafana:3000/x?y=1"),
        ("http://[::1]:9090", "http://[::1]:9090"),
        ("http://u:p@[::1]:9090/", "http://u:***@[::1]:9090/"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("kafka://broker:9092", "kafka://broker:9092"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact.redact_url(url) == shown


def test_redact_text_masks_url_passwords_and_registered_secrets() -> None:
    redact.register_env_secrets({"WEIR_MODEL_KEY": "k3y-value-91", "X_URL": "redis://:urlpw-77@h:1/0"})
    text = "key k3y-value-91 in redis://:other-pw@h:1/0, raw urlpw-77, http://h:3000/a@b"
    assert redact.redact_text(text) == "key *** in redis://:***@h:1/0, raw ***, http://h:3000/a@b"


def test_log_records_are_redacted_at_creation() -> None:
    redact.register_secret("log-secret-55")
    redact.install_log_redaction()
    redact.install_log_redaction()  # idempotent
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    logger = logging.getLogger("weir.test_security")
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("connecting to %s with %s", "redis://:pw-in-url@h:6379/0", "log-secret-55")
        try:
            raise RuntimeError("failed with log-secret-55")
        except RuntimeError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(seen)
    assert "connecting to redis://:***@h:6379/0 with ***" in text
    assert "RuntimeError: failed with ***" in text
    assert "pw-in-url" not in text and "log-secret-55" not in text


def test_safe_dump_masks_the_redis_url_password() -> None:
    s = load_settings(redis_url="redis://weir:urlpw-42@cache:6379/0", model_key="mk-1234")
    dump = s.safe_dump()
    assert dump["redis_url"] == "redis://weir:***@cache:6379/0"
    assert dump["model_key"] == "**********"
    assert "urlpw-42" not in repr(dump) and "mk-1234" not in repr(dump)


def test_cli_masks_secrets_in_errors_and_tracebacks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("GRAFANA_TOKEN", "glsa-token-3141")
    assert main(["dashboards", "publish", "--url", "ftp://admin:url-pw-2718@grafana"]) == 1
    err = capsys.readouterr().err
    assert "ftp://admin:***@grafana" in err and "url-pw-2718" not in err

    import weir.commands.config as config_cmd

    def broken(args: Any) -> int:
        raise RuntimeError("token glsa-token-3141 rejected by http://u:pw-1618@h")

    monkeypatch.setattr(config_cmd, "run", broken)
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: token *** rejected by http://u:***@h" in err
    assert "glsa-token-3141" not in err and "pw-1618" not in err


# -- #18 point 6: a closed output ends a command quietly -------------------------------------------


@pytest.mark.parametrize(
    ("argv", "codes"),
    [
        (["config", "--markdown"], {EXIT_BROKEN_PIPE}),
        (["config"], {EXIT_BROKEN_PIPE}),
        (["--help"], {0, EXIT_BROKEN_PIPE}),  # argparse exits 0 before the write may fail
    ],
)
def test_closed_output_exits_quietly(argv: list[str], codes: set[int], tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*WEIR, *argv], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes anything
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == ""
    assert code in codes


def test_closed_output_midway_through_head(tmp_path: Path) -> None:
    # The shell's `weir config --markdown | head -1`: the reader leaves after one line.
    done = subprocess.run(
        f"{sys.executable} -m weir.cli config --markdown | head -1",
        shell=True,
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == "| Variable | Default | Meaning |\n"
    assert done.stderr == ""


def test_a_thread_traceback_is_redacted(tmp_path: Path) -> None:
    # Python prints a thread's uncaught exception itself, past logging: the CLI's hook redacts it.
    code = (
        "import sys, threading\n"
        "import weir.commands.config as c\n"
        "def run(args):\n"
        "    t = threading.Thread(target=lambda: (_ for _ in ()).throw("
        "RuntimeError('redis://:thread-pw-99@h:1 token glsa-thread-77')))\n"
        "    t.start(); t.join(); return 0\n"
        "c.run = run\n"
        "from weir.cli import main\n"
        "sys.argv = ['weir', 'config']\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(GRAFANA_TOKEN="glsa-thread-77"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Exception in thread" in done.stderr and "RuntimeError: redis://:***@h:1 token ***" in done.stderr
    assert "thread-pw-99" not in done.stderr and "glsa-thread-77" not in done.stderr
