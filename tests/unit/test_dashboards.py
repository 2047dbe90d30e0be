"""Structure of the Grafana dashboards in dashboards/*.json (no Grafana needed)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from weir.dashboards import (
    DATASOURCE_REFS,
    GRAFANA_BUILTINS,
    DashboardError,
    dashboard_queries,
    grafana_variables,
    iter_panels,
    lint,
    lint_dashboard,
    load_dashboard,
    load_dashboards,
    metric_names,
    variable_query_expr,
)

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"
FILES = sorted(DASHBOARDS.glob("*.json"))
EXPECTED = {"weir-overview.json", "weir-model-quality.json", "weir-drift.json", "weir-features.json"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_the_four_dashboards_exist() -> None:
    assert {f.name for f in FILES} >= EXPECTED


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_valid_json_with_uid_title_schema_version(path: Path) -> None:
    dash = _load(path)
    assert isinstance(dash["uid"], str) and 0 < len(dash["uid"]) <= 40
    assert dash["title"].startswith("Weir / ")
    assert isinstance(dash["schemaVersion"], int)
    assert dash.get("id") is None, "an exported id breaks import into another Grafana"


def test_uids_unique_across_dashboards() -> None:
    uids = [_load(f)["uid"] for f in FILES]
    assert len(uids) == len(set(uids)), uids


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_panel_ids_unique(path: Path) -> None:
    ids = [p["id"] for p in iter_panels(_load(path))]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_panel_uses_the_datasource_variable(path: Path) -> None:
    dash = _load(path)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in iter_panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in DATASOURCE_REFS, (panel["title"], target)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_panel_has_a_query_and_a_unit(path: Path) -> None:
    for panel in iter_panels(_load(path)):
        if panel["type"] == "row":
            continue
        assert any(t.get("expr") for t in panel["targets"]), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel.get("description"), panel["title"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_variable_used_is_defined(path: Path) -> None:
    dash = _load(path)
    defined = {v["name"] for v in dash["templating"]["list"]}
    texts = [q.expr for q in dashboard_queries(dash)]
    texts += [json.dumps(v.get("query")) for v in dash["templating"]["list"]]
    for text in texts:
        assert grafana_variables(text) <= defined | GRAFANA_BUILTINS, text


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_templated_by_pipeline(path: Path) -> None:
    dash = _load(path)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["pipeline"]["type"] == "query"
    assert variable_query_expr(variables["pipeline"]["definition"])
    for q in dashboard_queries(dash):
        if q.expr.startswith("count by (role, version) (weir_build_info)") or "up{" in q.expr:
            continue  # process-level panels: these series carry no pipeline label
        assert 'pipeline=~"$pipeline"' in q.expr, q.where


def test_model_variable_where_metrics_have_a_model_label() -> None:
    for name in ("weir-overview.json", "weir-model-quality.json", "weir-drift.json"):
        dash = _load(DASHBOARDS / name)
        assert "model" in {v["name"] for v in dash["templating"]["list"]}, name
        assert any("$model" in q.expr for q in dashboard_queries(dash)), name


def test_drift_dashboard_annotates_promotions_rollbacks_and_retrains() -> None:
    anns = _load(DASHBOARDS / "weir-drift.json")["annotations"]["list"]
    exprs = " ".join(a["expr"] for a in anns)
    for metric in ("weir_promotions_total", "weir_rollbacks_total", "weir_retrains_total"):
        assert f"increase({metric}" in exprs


def test_lint_passes_on_the_repository() -> None:
    assert lint(DASHBOARDS, REPO / "deploy/prometheus/rules") == []


# -- the checks catch what they should -----------------------------------------------------


@pytest.fixture
def overview() -> dict[str, Any]:
    return _load(DASHBOARDS / "weir-overview.json")


def test_lint_flags_duplicate_panel_id(overview: dict[str, Any]) -> None:
    overview["panels"][1]["id"] = overview["panels"][0]["id"]
    assert any("duplicate panel id" in p for p in lint_dashboard(Path("x.json"), overview))


def test_lint_flags_hard_coded_datasource(overview: dict[str, Any]) -> None:
    overview["panels"][0]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    assert any("datasource must be" in p for p in lint_dashboard(Path("x.json"), overview))


def test_lint_flags_undefined_variable(overview: dict[str, Any]) -> None:
    overview["panels"][0]["targets"][0]["expr"] = 'sum(rate(weir_events_total{pipeline=~"$pipe"}[5m]))'
    problems = lint_dashboard(Path("x.json"), overview)
    assert any("uses $pipe" in p for p in problems), problems


def test_lint_flags_panel_without_query_or_unit(overview: dict[str, Any]) -> None:
    overview["panels"][0]["targets"] = []
    del overview["panels"][1]["fieldConfig"]["defaults"]["unit"]
    problems = lint_dashboard(Path("x.json"), overview)
    assert any("at least one target" in p for p in problems)
    assert any("unit" in p for p in problems)


def test_lint_flags_duplicate_uid_across_files(tmp_path: Path, overview: dict[str, Any]) -> None:
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(overview))
    assert any("also used by a.json" in p for p in lint(tmp_path))


def test_lint_flags_unknown_metric(tmp_path: Path, overview: dict[str, Any]) -> None:
    broken = copy.deepcopy(overview)
    broken["panels"][0]["targets"][0]["expr"] = 'rate(weir_event_total{pipeline=~"$pipeline"}[5m])'
    (tmp_path / "a.json").write_text(json.dumps(broken))
    problems = lint(tmp_path)
    assert problems == [
        "Weir / Overview / panel 1 'Events / s' A: unknown metric 'weir_event_total' "
        "(not in weir/metrics.py, not a Prometheus built-in, not a recording rule)"
    ]


def test_bad_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DashboardError, match=r"broken\.json: not valid JSON"):
        load_dashboard(bad)
    bad.write_text("[]")
    with pytest.raises(DashboardError, match=r"broken\.json: a dashboard must be a JSON object"):
        load_dashboard(bad)
    bad.write_text('{"title": "x"}')
    with pytest.raises(DashboardError, match=r"broken\.json: dashboard needs a non-empty string 'uid'"):
        load_dashboard(bad)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="no dashboard"):
        load_dashboards(tmp_path)


# -- the PromQL scanner ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job=~"weir.*"} == 0', {"up"}),
        (
            "time() - max by (pipeline) (weir_feature_last_event_timestamp_seconds)",
            {"weir_feature_last_event_timestamp_seconds"},
        ),
        (
            'a / ignoring(window) b{metric!~"(?i).*(loss|error).*"} > 1.25 and on (x) c > 1e-3',
            {"a", "b", "c"},
        ),
        ("sum without (instance) (rate(x_total[$__rate_interval])) * 60", {"x_total"}),
        ('{__name__="weir_events_total", pipeline="demo"}', {"weir_events_total"}),
        ("pipeline:weir_events:rate5m offset 1h", {"pipeline:weir_events:rate5m"}),
        ('count_values("version", weir_build_info)', {"weir_build_info"}),
        ("vector(1) + scalar(foo)", {"foo"}),
        ("max_over_time(x[1h:5m]) @ end()", {"x"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_variable_query_expr() -> None:
    assert variable_query_expr("label_values(weir_events_total, pipeline)") == "weir_events_total"
    assert variable_query_expr('label_values(x{a="1,2"}, b)') == 'x{a="1,2"}'
    assert variable_query_expr("query_result(sum by (p) (x))") == "sum by (p) (x)"
    assert variable_query_expr("label_values(pipeline)") is None
    assert variable_query_expr("metrics(weir_.*)") is None
