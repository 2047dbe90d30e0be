"""Grafana dashboards and Prometheus rules: load, lint, and publish.

The dashboards in ``dashboards/*.json`` and the rules in
``deploy/prometheus/rules/*.yml`` may only name metrics that
:mod:`weir.metrics` (or :mod:`weir.resilience`) exports, Prometheus built-ins, or
recording rules:
:func:`lint` checks that and the dashboards' structure, and ``weir dashboards
lint`` runs it. :func:`publish` upserts the dashboards through Grafana's HTTP
API (``weir dashboards publish``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from weir.errors import WeirError
from weir.redact import redact_url

#: uid of the Prometheus data source that deploy/grafana provisions.
DATASOURCE_UID = "weir-prometheus"
#: How a panel names its data source: the dashboard's ``datasource`` variable.
DATASOURCE_REFS = frozenset({"${datasource}", "$datasource", DATASOURCE_UID})

#: Variables Grafana defines itself (https://grafana.com/docs/grafana/latest/dashboards/variables/).
GRAFANA_BUILTINS = frozenset(
    {
        "__interval",
        "__interval_ms",
        "__rate_interval",
        "__rate_interval_ms",
        "__range",
        "__range_s",
        "__range_ms",
        "__from",
        "__to",
        "__dashboard",
        "__org",
        "__user",
        "__name",
        "__timezone",
        "timeFilter",
    }
)

#: Series Prometheus makes itself rather than scraping them.
PROMETHEUS_BUILTINS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)

_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)

_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((.*)\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((.*)\)\s*$", re.S)


class DashboardError(WeirError):
    """A dashboard file is invalid, or Grafana refused or could not be reached."""


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it was found (for error messages)."""

    where: str
    expr: str


# -- PromQL ------------------------------------------------------------------------------


def grafana_variables(text: str) -> set[str]:
    """Names of the Grafana variables used in ``text`` (``$x``, ``${x}``, ``${x:csv}``, ``[[x]]``).

    Examples:
        >>> sorted(grafana_variables('rate(x{p=~"$pipeline"}[$__rate_interval]) + ${model:regex}'))
        ['__rate_interval', 'model', 'pipeline']
    """
    return {next(g for g in m.groups() if g) for m in _GRAFANA_VAR.finditer(text)}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels or keywords).

    A light scanner, not a parser: strings, label matchers, ranges and grouping
    clauses are removed, and what is left that looks like an identifier and is
    not called like a function is a metric name. ``{__name__="x"}`` counts as ``x``.

    Examples:
        >>> sorted(metric_names(
        ...     'histogram_quantile(0.99, sum by (pipeline, le) '
        ...     '(rate(weir_event_to_prediction_seconds_bucket{pipeline=~"$pipeline"}[5m])))'
        ... ))
        ['weir_event_to_prediction_seconds_bucket']
        >>> sorted(metric_names('a - ignoring(window) b{window="all"} > 0.05 and on(x) c offset 5m'))
        ['a', 'b', 'c']
    """
    names = {m.group(1) for m in _NAME_MATCHER.finditer(expr)}
    text = _GRAFANA_VAR.sub(" ", expr)
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    text = re.sub(r"@\s*(?:start\(\)|end\(\)|[0-9.]+)", " ", text)
    for m in _IDENT.finditer(text):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(ident)
    return names


def variable_query_expr(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query, or None if it has none.

    Examples:
        >>> variable_query_expr('label_values(weir_events_total{pipeline=~"$p"}, pipeline)')
        'weir_events_total{pipeline=~"$p"}'
        >>> variable_query_expr("label_values(pipeline)") is None
        True
    """
    m = _QUERY_RESULT.match(query)
    if m:
        return m.group(1).strip()
    m = _LABEL_VALUES.match(query)
    if not m:
        return None
    inner = m.group(1)
    depth, in_str, cut = 0, "", -1
    for i, ch in enumerate(inner):  # the last top-level comma separates the label
        if in_str:
            if ch == in_str and inner[i - 1] != "\\":
                in_str = ""
        elif ch in "\"'":
            in_str = ch
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            cut = i
    return inner[:cut].strip() if cut >= 0 else None


# -- the metric catalogue and the rules ----------------------------------------------------


def catalogue_metric_names() -> set[str]:
    """Every sample name the three metric classes of :mod:`weir.metrics` export, and the
    dependency health (:class:`weir.resilience.DependencyHealth`) every process adds.

    Built on fresh registries; names come from each family's type, because a
    labelled metric has no samples until a child exists.
    """
    from prometheus_client import CollectorRegistry

    from weir.metrics import LearnerMetrics, MonitorMetrics, WorkerMetrics
    from weir.resilience import DependencyHealth

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "unknown": ("",),
    }
    names: set[str] = set()
    for build in (WorkerMetrics, LearnerMetrics, MonitorMetrics, lambda r: DependencyHealth(r, "p")):
        registry = CollectorRegistry()
        build(registry)
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


def load_rule_groups(rules_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """``(file, rule)`` for every rule in every ``*.yml`` of ``rules_dir``."""
    import yaml

    out: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(Path(rules_dir).glob("*.yml")):
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DashboardError(f"{path}: not valid YAML: {exc}") from exc
        for group in doc.get("groups") or []:
            out.extend((path, rule) for rule in group.get("rules") or [])
    return out


def rule_queries(rules_dir: Path) -> list[Query]:
    """Every rule expression, named by its alert or recorded series."""
    return [
        Query(f"{path.name}: {rule.get('alert') or rule.get('record')}", str(rule["expr"]))
        for path, rule in load_rule_groups(rules_dir)
    ]


def recorded_names(rules_dir: Path) -> set[str]:
    """Names of the series the recording rules in ``rules_dir`` define."""
    return {rule["record"] for _, rule in load_rule_groups(rules_dir) if "record" in rule}


# -- dashboards ------------------------------------------------------------------------------


def load_dashboard(path: Path) -> dict[str, Any]:
    """One dashboard JSON file; a :class:`DashboardError` naming the file if it is unusable."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise DashboardError(f"{path}: cannot read dashboard: {exc}") from exc
    except ValueError as exc:
        raise DashboardError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DashboardError(f"{path}: a dashboard must be a JSON object, got {type(doc).__name__}")
    for key in ("uid", "title"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise DashboardError(f"{path}: dashboard needs a non-empty string {key!r}")
    return doc


def load_dashboards(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``*.json`` dashboard in ``directory``, sorted by file name."""
    directory = Path(directory)
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DashboardError(
            f"no dashboard *.json files in {directory}; pass --dir with the dashboards folder"
        )
    return [(f, load_dashboard(f)) for f in files]


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """PromQL of every panel target and every Prometheus annotation."""
    title = dashboard.get("title", "?")
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets") or []:
            if target.get("expr"):
                where = f"{title} / panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}"
                out.append(Query(where, target["expr"]))
    for ann in (dashboard.get("annotations") or {}).get("list") or []:
        if ann.get("expr"):
            out.append(Query(f"{title} / annotation {ann.get('name')!r}", ann["expr"]))
    return out


def variable_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    """PromQL selectors inside the dashboard's query variables (``label_values(expr, label)``)."""
    out = []
    for var in (dashboard.get("templating") or {}).get("list") or []:
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        expr = variable_query_expr(text)
        if expr:
            out.append(Query(f"{dashboard.get('title')} / variable ${var.get('name')}", expr))
    return out


def _ds_uid(ds: Any) -> str | None:
    if isinstance(ds, dict):
        return ds.get("uid")
    return ds if isinstance(ds, str) else None


def lint_dashboard(path: Path, dashboard: Mapping[str, Any]) -> list[str]:
    """Structure problems of one dashboard, one line each (empty if none)."""
    problems: list[str] = []
    name = Path(path).name

    def bad(msg: str) -> None:
        problems.append(f"{name}: {msg}")

    uid = dashboard.get("uid")
    if not isinstance(uid, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid):
        bad(f"uid must be 1-40 letters, digits, '-' or '_', got {uid!r}")
    if not isinstance(dashboard.get("schemaVersion"), int):
        bad("schemaVersion must be set (an integer)")
    variables = (dashboard.get("templating") or {}).get("list") or []
    defined = {v.get("name") for v in variables}
    ds_vars = [v for v in variables if v.get("name") == "datasource"]
    if not ds_vars or ds_vars[0].get("type") != "datasource" or ds_vars[0].get("query") != "prometheus":
        bad("needs a templating variable 'datasource' of type datasource with query 'prometheus'")
    seen_ids: set[int] = set()
    for panel in iter_panels(dashboard):
        pid, ptitle = panel.get("id"), panel.get("title")
        label = f"panel {pid} {ptitle!r}"
        if not isinstance(pid, int):
            bad(f"{label}: id must be an integer")
        elif pid in seen_ids:
            bad(f"{label}: duplicate panel id {pid}")
        else:
            seen_ids.add(pid)
        if panel.get("type") == "row":
            continue
        if _ds_uid(panel.get("datasource")) not in DATASOURCE_REFS:
            bad(
                f"{label}: datasource must be {{'type': 'prometheus', 'uid': '${{datasource}}'}}, "
                f"got {panel.get('datasource')!r}"
            )
        targets = panel.get("targets") or []
        if not any(t.get("expr") for t in targets):
            bad(f"{label}: needs at least one target with an expr")
        for t in targets:
            if "datasource" in t and _ds_uid(t["datasource"]) not in DATASOURCE_REFS:
                bad(
                    f"{label} target {t.get('refId')}: datasource must be ${{datasource}}, "
                    f"got {t['datasource']!r}"
                )
        if not ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit"):
            bad(f"{label}: set fieldConfig.defaults.unit (e.g. 's', 'ops', 'short', 'percentunit')")
    for ann in (dashboard.get("annotations") or {}).get("list") or []:
        if ann.get("expr") and _ds_uid(ann.get("datasource")) not in DATASOURCE_REFS:
            bad(f"annotation {ann.get('name')!r}: datasource must be ${{datasource}}")
    texts = dashboard_queries(dashboard)
    for var in variables:
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        texts.append(Query(f"variable ${var.get('name')}", text))
    for q in texts:
        for v in sorted(grafana_variables(q.expr) - defined - GRAFANA_BUILTINS):
            bad(f"{q.where}: uses ${v}, which is neither a templating variable nor a Grafana built-in")
    return problems


def unknown_metric_problems(queries: Iterable[Query], known: set[str]) -> list[str]:
    """One line per metric name in ``queries`` that ``known`` does not contain."""
    return [
        f"{q.where}: unknown metric {name!r} (not in weir/metrics.py, not a Prometheus built-in, "
        f"not a recording rule)"
        for q in queries
        for name in sorted(metric_names(q.expr) - known)
    ]


def lint(dashboards_dir: Path, rules_dir: Path | None = None) -> list[str]:
    """All problems of the dashboards (and the rules, if ``rules_dir`` exists)."""
    loaded = load_dashboards(dashboards_dir)
    problems: list[str] = []
    uids: dict[str, Path] = {}
    for path, dash in loaded:
        problems += lint_dashboard(path, dash)
        uid = dash["uid"]
        if uid in uids:
            problems.append(f"{path.name}: uid {uid!r} is also used by {uids[uid].name}")
        uids.setdefault(uid, path)
    known = catalogue_metric_names() | PROMETHEUS_BUILTINS
    queries = [q for _, d in loaded for q in dashboard_queries(d) + variable_queries(d)]
    if rules_dir is not None and Path(rules_dir).is_dir():
        known |= recorded_names(rules_dir)
        queries += rule_queries(rules_dir)
    problems += unknown_metric_problems(queries, known)
    return problems


# -- publishing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A dashboard Grafana accepted."""

    title: str
    uid: str
    url: str


Credential = str | tuple[str, str]


def credential_from_env(env: Mapping[str, str] | None = None) -> Credential | None:
    """``GRAFANA_TOKEN`` (a service account token) or ``GRAFANA_USER``/``GRAFANA_PASSWORD``."""
    env = os.environ if env is None else env
    if env.get("GRAFANA_TOKEN"):
        return env["GRAFANA_TOKEN"]
    user, password = env.get("GRAFANA_USER"), env.get("GRAFANA_PASSWORD")
    if user and password:
        return (user, password)
    if user or password:
        missing = "GRAFANA_PASSWORD" if user else "GRAFANA_USER"
        raise DashboardError(f"GRAFANA_USER and GRAFANA_PASSWORD go together; set {missing} too")
    return None


_AUTH_HINT = (
    "set GRAFANA_TOKEN to a service account token with the Editor role (or GRAFANA_USER and GRAFANA_PASSWORD)"
)


def _api_url(url: str) -> tuple[str, str]:
    """(URL for grafana-client, base URL for links without credentials)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DashboardError(
            f"--url must be an http(s) URL like http://localhost:3000, got {redact_url(url)!r}"
        )
    # grafana-client appends "api" to the path as is: a sub-path needs its trailing slash.
    path = parts.path.rstrip("/")
    path = path + "/" if path else ""
    api = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return api, urlunsplit((parts.scheme, host, "", "", ""))


def publish(
    url: str,
    dashboards_dir: Path,
    folder: str = "Weir",
    credential: Credential | None = None,
    timeout: float = 10.0,
) -> list[Published]:
    """Create ``folder`` if missing and upsert (``overwrite: true``) every dashboard into it.

    Every file is loaded before the first API call, so a bad file changes nothing.
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    dashboards = load_dashboards(dashboards_dir)
    api_url, base = _api_url(url)
    url = redact_url(url)  # messages name the server, never its password
    grafana = GrafanaApi.from_url(api_url, credential=credential, timeout=timeout)
    current = "looking up folders"

    def fail(exc: Exception) -> DashboardError:
        status = getattr(exc, "status_code", None)
        if status in (401, 403):
            what = "rejected the credentials" if status == 401 else "refused permission"
            return DashboardError(f"Grafana at {url} {what} ({status}) while {current}: {_AUTH_HINT}")
        if isinstance(exc, GrafanaException) and status:
            return DashboardError(f"Grafana at {url} answered {status} while {current}: {exc}")
        return DashboardError(
            f"cannot reach Grafana at {url} while {current}: {exc}; check --url and that Grafana runs"
        )

    try:
        folders = grafana.folder.get_all_folders()
        match = [f for f in folders if f.get("title") == folder]
        if match:
            folder_uid = match[0]["uid"]
        else:
            current = f"creating folder {folder!r}"
            folder_uid = grafana.folder.create_folder(title=folder)["uid"]
        published = []
        for path, dash in dashboards:
            current = f"publishing {path}"
            payload = {
                "dashboard": {**dash, "id": None},
                "folderUid": folder_uid,
                "overwrite": True,
                "message": "weir dashboards publish",
            }
            try:
                resp = grafana.dashboard.update_dashboard(payload)
            except GrafanaClientError as exc:
                if exc.status_code in (401, 403):
                    raise
                raise DashboardError(
                    f"{path}: Grafana at {url} refused the dashboard ({exc.status_code}): {exc}"
                ) from exc
            link = str(resp.get("url") or f"/d/{dash['uid']}")
            if not link.startswith(("http://", "https://")):
                link = base + link
            published.append(Published(dash["title"], str(resp.get("uid") or dash["uid"]), link))
    except DashboardError:
        raise
    except (GrafanaException, OSError) as exc:
        raise fail(exc) from exc
    return published
