"""``weir dashboards publish`` against a recording stand-in for Grafana's HTTP API.

Grafana cannot be installed on this machine (no package reaches it and no
Docker engine runs), so a small ``http.server`` on 127.0.0.1 plays the parts of
the API that publish uses: folder lookup (GET /api/folders), folder creation
(POST /api/folders) and dashboard upsert (POST /api/dashboards/db). It records
every call, and can answer 401 or 403 to test the credential errors.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from weir.cli import main
from weir.dashboards import DashboardError, credential_from_env, publish

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
N_DASHBOARDS = len(list(DASHBOARDS.glob("*.json")))


@dataclass
class Call:
    method: str
    path: str
    body: Any
    authorization: str | None


@dataclass
class FakeGrafana:
    """State and call log of the stand-in."""

    folders: list[dict[str, Any]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    status: int = 200  # answer every request with this status when not 200
    url: str = ""

    def paths(self) -> list[str]:
        return [f"{c.method} {c.path}" for c in self.calls]


def _handler(state: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = json.loads(raw) if raw else None
            path = self.path.split("?")[0]
            state.calls.append(Call(method, path, body, self.headers.get("Authorization")))
            if state.status == 401:
                return self._reply(401, {"message": "Unauthorized"})
            if state.status == 403:
                return self._reply(403, {"message": "Access denied"})
            if method == "GET" and path == "/api/folders":
                return self._reply(200, state.folders)
            if method == "POST" and path == "/api/folders":
                folder = {"id": len(state.folders) + 1, "uid": f"f{len(state.folders) + 1}", **body}
                state.folders.append(folder)
                return self._reply(200, folder)
            if method == "POST" and path == "/api/dashboards/db":
                dash = body["dashboard"]
                if not dash.get("panels"):
                    return self._reply(400, {"message": "Dashboard has no panels"})
                uid = dash["uid"]
                return self._reply(
                    200,
                    {"id": 7, "uid": uid, "url": f"/d/{uid}/{uid}", "status": "success", "version": 1},
                )
            return self._reply(404, {"message": "Not found"})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_creates_folder_and_upserts_every_dashboard(grafana: FakeGrafana) -> None:
    published = publish(grafana.url, DASHBOARDS, folder="Weir", credential="glsa_token")
    assert (
        grafana.paths()
        == ["GET /api/folders", "POST /api/folders"] + ["POST /api/dashboards/db"] * N_DASHBOARDS
    )
    assert grafana.calls[1].body == {"title": "Weir"}
    for call in grafana.calls:
        assert call.authorization == "Bearer glsa_token"
    uploads = [c.body for c in grafana.calls[2:]]
    assert all(u["overwrite"] is True and u["folderUid"] == "f1" for u in uploads)
    assert all(u["dashboard"]["id"] is None for u in uploads)
    assert {u["dashboard"]["uid"] for u in uploads} == {p.uid for p in published}
    assert f"{grafana.url}/d/weir-overview/weir-overview" in [p.url for p in published]


def test_existing_folder_is_reused_and_basic_auth_sent(grafana: FakeGrafana) -> None:
    grafana.folders.append({"id": 3, "uid": "existing", "title": "Monitoring"})
    publish(grafana.url, DASHBOARDS, folder="Monitoring", credential=("admin", "secret"))
    assert "POST /api/folders" not in grafana.paths()
    assert grafana.calls[0].authorization == "Basic YWRtaW46c2VjcmV0"
    assert all(c.body["folderUid"] == "existing" for c in grafana.calls[1:])


def test_cli_prints_each_url_and_reads_token_from_env(
    grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", "from-env")
    monkeypatch.delenv("GRAFANA_USER", raising=False)
    monkeypatch.delenv("GRAFANA_PASSWORD", raising=False)
    code = main(["dashboards", "publish", "--url", grafana.url + "/", "--dir", str(DASHBOARDS)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Weir / Overview: " + grafana.url + "/d/weir-overview/weir-overview" in out
    assert len(out.strip().splitlines()) == N_DASHBOARDS
    assert grafana.calls[0].authorization == "Bearer from-env"


@pytest.mark.parametrize(("status", "word"), [(401, "rejected the credentials"), (403, "refused permission")])
def test_auth_failure_names_the_env_vars(grafana: FakeGrafana, status: int, word: str) -> None:
    grafana.status = status
    with pytest.raises(DashboardError, match=rf"{word} \({status}\).*set GRAFANA_TOKEN.*GRAFANA_USER"):
        publish(grafana.url, DASHBOARDS, credential="wrong")


def test_cli_reports_auth_failure_and_exits_1(
    grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    grafana.status = 401
    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert main(["dashboards", "publish", "--url", grafana.url, "--dir", str(DASHBOARDS)]) == 1
    assert "set GRAFANA_TOKEN" in capsys.readouterr().err


def test_unreachable_host_names_the_url() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(DashboardError, match=rf"cannot reach Grafana at {url}"):
        publish(url, DASHBOARDS, credential="t", timeout=2)


def test_bad_file_is_named_and_nothing_is_sent(grafana: FakeGrafana, tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text((DASHBOARDS / "weir-overview.json").read_text())
    (tmp_path / "b.json").write_text("{oops")
    with pytest.raises(DashboardError, match=r"b\.json: not valid JSON"):
        publish(grafana.url, tmp_path, credential="t")
    assert grafana.calls == []


def test_dashboard_grafana_refuses_is_named(grafana: FakeGrafana, tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text(json.dumps({"uid": "e", "title": "Empty", "panels": []}))
    with pytest.raises(DashboardError, match=r"empty\.json: Grafana at .* refused the dashboard \(400\)"):
        publish(grafana.url, tmp_path, credential="t")


def test_sub_path_url_keeps_its_prefix(grafana: FakeGrafana) -> None:
    with pytest.raises(DashboardError, match="answered 404"):
        publish(grafana.url + "/grafana", DASHBOARDS, credential="t")
    assert grafana.calls[0].path == "/grafana/api/folders"


def test_credentials_from_env() -> None:
    assert credential_from_env({"GRAFANA_TOKEN": "t", "GRAFANA_USER": "u"}) == "t"
    assert credential_from_env({"GRAFANA_USER": "u", "GRAFANA_PASSWORD": "p"}) == ("u", "p")
    assert credential_from_env({}) is None
    with pytest.raises(DashboardError, match="set GRAFANA_PASSWORD too"):
        credential_from_env({"GRAFANA_USER": "u"})


def test_bad_url_is_explained() -> None:
    with pytest.raises(DashboardError, match=r"--url must be an http\(s\) URL.*got 'localhost:3000'"):
        publish("localhost:3000", DASHBOARDS)
