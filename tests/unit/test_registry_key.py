"""The model key: WEIR_MODEL_KEY, WEIR_MODEL_KEY_FILE, the default key file, insecure mode."""

from __future__ import annotations

import logging
import multiprocessing
import stat
from pathlib import Path
from typing import Any

import pytest

from models.registry import ModelKey, key_id, registry_key
from weir.errors import ConfigError
from weir.settings import Settings


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WEIR_MODEL_KEY", "WEIR_MODEL_KEY_FILE", "WEIR_MODEL_INSECURE", "WEIR_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def _settings(**over: Any) -> Settings:
    return Settings(**over)


def test_default_key_file_is_created_0600_and_reused(tmp_path: Path, caplog: Any) -> None:
    data = tmp_path / "data"  # does not exist yet
    with caplog.at_level(logging.WARNING, "weir.registry"):
        first = registry_key(_settings(data_dir=str(data)))
    path = data / "model.key"
    assert first is not None and first.source == f"key file {path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bytes(first) == path.read_bytes().strip() and len(first) == 64
    assert "created a new model key" in caplog.text and "same key" in caplog.text
    assert bytes(first) not in caplog.text.encode()  # the key itself is never logged
    again = registry_key(_settings(data_dir=str(data)))
    assert again == first  # read back, not replaced
    assert list(data.iterdir()) == [path]  # no temporary file left behind
    other = registry_key(_settings(data_dir=str(tmp_path / "elsewhere")))
    assert other is not None and other != first  # another data dir, another key


def _race(data_dir: str, start: Any, out: Any) -> None:
    start.wait()
    key = registry_key(Settings(data_dir=data_dir))
    out.put(bytes(key) if key is not None else b"")


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, out)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    keys = {out.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(keys) == 1 and b"" not in keys
    assert keys == {(tmp_path / "model.key").read_bytes().strip()}


def test_weir_model_key_wins_and_names_its_source(tmp_path: Path) -> None:
    key = registry_key(_settings(model_key="s3cret-key-value", data_dir=str(tmp_path)))
    assert key == b"s3cret-key-value" and isinstance(key, ModelKey)
    assert key.source == "WEIR_MODEL_KEY" and "s3cret" not in repr(key) and "s3cret" not in str(key)
    assert not (tmp_path / "model.key").exists()  # no key file when the key is given


def test_key_file_setting(tmp_path: Path) -> None:
    f = tmp_path / "shared.key"
    f.write_text("abcdef0123456789\n")
    f.chmod(0o600)
    key = registry_key(_settings(model_key_file=str(f), data_dir=str(tmp_path / "d")))
    assert key == b"abcdef0123456789" and key is not None and str(f) in key.source
    assert not (tmp_path / "d").exists()


def test_missing_key_file_setting_is_refused_with_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=r"WEIR_MODEL_KEY_FILE=.*nope.key.*no such file.*openssl rand"):
        registry_key(_settings(model_key_file=str(missing)))
    assert not missing.exists()  # an explicit file is never invented


def test_empty_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WEIR_MODEL_KEY is set but empty"):
        registry_key(_settings(model_key="  ", data_dir=str(tmp_path)))
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"empty.key is empty"):
        registry_key(_settings(model_key_file=str(empty)))
    with pytest.raises(ConfigError, match="set only one of them"):
        registry_key(_settings(model_key="k", model_key_file=str(empty)))


def test_no_key_and_no_writable_data_dir_refuses_to_run(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a data dir under a file cannot be created, not even by root
    with pytest.raises(ConfigError, match=r"cannot create the model key file.*WEIR_MODEL_KEY"):
        registry_key(_settings(data_dir=str(blocker / "data")))


def test_insecure_only_when_asked_and_loudly(tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, "weir.registry"):
        assert registry_key(_settings(model_insecure=True, data_dir=str(tmp_path))) is None
    assert any(r.levelno == logging.ERROR and "NOT signed" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "model.key").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "weir.registry"):
        key = registry_key(_settings(model_insecure=True, model_key="k-1234"))
    assert key == b"k-1234" and "WEIR_MODEL_INSECURE=1 is ignored" in caplog.text


def test_insecure_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_MODEL_INSECURE", "1")
    monkeypatch.setenv("WEIR_MODEL_KEY_FILE", "/x/y")
    s = Settings()
    assert s.model_insecure is True and s.model_key_file == "/x/y"


def test_key_file_content_is_redacted(tmp_path: Path) -> None:
    from weir import redact

    key = registry_key(_settings(data_dir=str(tmp_path)))
    assert key is not None
    assert redact.redact_text(f"oops {key.decode()}") == "oops ***"


def test_key_id_is_a_fingerprint_not_the_key() -> None:
    assert key_id(b"a") == key_id(b"a") != key_id(b"b")
    assert len(key_id(b"a")) == 12 and "s3cret-key" not in key_id(b"s3cret-key")
