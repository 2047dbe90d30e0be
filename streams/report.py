"""``weir report``: a self-contained HTML report of a pipeline's quality and drift.

Reads the drift topic (statistics and decisions) and the training-log topic (every
joined example: what was served and the true label) from their beginning, and writes one
HTML file with the plots embedded: rolling online accuracy (or MAE) over event time with
drifts, retrains, promotions and rollbacks marked; drift statistics per feature over time;
and the table of every decision taken. No server is needed to open it.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

import orjson

from weir.settings import Settings
from weir.spec import PipelineSpec


def read_topic(
    settings: Settings, topic: str, timeout: float = 5.0, limit: int = 2_000_000
) -> list[dict[str, Any]]:
    """Every JSON record of ``topic`` from its beginning up to its current end."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            **settings.confluent_config(),
            "group.id": f"weir-report-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            return []
        ends: dict[int, int] = {}
        parts = []
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                parts.append(TopicPartition(topic, p, low))
        c.assign(parts)
        out: list[dict[str, Any]] = []
        deadline = time.time() + timeout + len(parts)
        while ends and len(out) < limit and time.time() < deadline + 60:
            for m in c.consume(5000, 0.5):
                if m.error():
                    continue
                part, offset = m.partition() or 0, m.offset() or 0
                if offset + 1 >= ends.get(part, 0):
                    ends.pop(part, None)
                try:
                    out.append(orjson.loads(m.value() or b"null"))
                except orjson.JSONDecodeError:
                    continue
        return [r for r in out if isinstance(r, dict)]
    finally:
        c.close()


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def _correct(rec: dict[str, Any]) -> float | None:
    y, p = rec.get("label"), rec.get("prediction")
    if y is None or p is None:
        return None
    return float(str(y).lower() == str(p).lower())


def build_report(
    spec: PipelineSpec, drift: list[dict[str, Any]], training: list[dict[str, Any]], window: int = 500
) -> str:
    """The report's HTML from drift records and training-log records (pure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    sections: list[str] = []
    decisions = [
        r for r in drift if r.get("kind") == "decision" and (r.get("drifted") or r.get("name") != "retrain")
    ]
    marks = [r for r in decisions if r.get("name") in ("retrain", "promotion", "rollback", "challenger")]
    detections = [r for r in drift if r.get("kind") == "performance" and r.get("drifted")]

    # 1. Online quality over time.
    if training:
        tl = pd.DataFrame(training)
        tl["t"] = pd.to_numeric(tl.get("label_ts", tl.get("ts")), errors="coerce")
        tl = tl.sort_values("t")
        fig, ax = plt.subplots(figsize=(10, 3.8))
        if spec.task == "regression":
            err = (
                pd.to_numeric(tl["label"], errors="coerce") - pd.to_numeric(tl["prediction"], errors="coerce")
            ).abs()
            ax.plot(pd.to_datetime(tl["t"], unit="s"), err.rolling(window, min_periods=20).mean(), lw=1.2)
            ax.set_ylabel(f"rolling MAE ({window} labels)")
        else:
            ok = tl.apply(_correct, axis=1).astype(float)
            ax.plot(pd.to_datetime(tl["t"], unit="s"), ok.rolling(window, min_periods=20).mean(), lw=1.2)
            ax.set_ylabel(f"rolling accuracy ({window} labels)")
            ax.set_ylim(0, 1)
        colors = {
            "retrain": "tab:orange",
            "challenger": "tab:orange",
            "promotion": "tab:green",
            "rollback": "tab:purple",
        }
        for r in detections:
            ax.axvline(pd.to_datetime(r["time"], unit="s"), color="tab:red", ls="--", lw=0.8)
        for r in marks:
            ax.axvline(
                pd.to_datetime(r["time"], unit="s"), color=colors.get(r["name"], "grey"), ls=":", lw=1.0
            )
        ax.set_title(
            "Online quality of the served predictions (red: performance drift; orange: retrain; "
            "green: promotion decision; purple: rollback decision)",
            fontsize=8,
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        sections.append(
            f"<h2>Online quality</h2><img src='data:image/png;base64,{_png(fig)}'/>"
            f"<p>{len(tl)} joined labels; {len(detections)} performance drift detection(s).</p>"
        )
        plt.close(fig)
    else:
        sections.append("<h2>Online quality</h2><p>No joined labels on the training-log topic yet.</p>")

    # 2. Drift statistics per feature.
    feats = [r for r in drift if r.get("kind") in ("feature", "prediction") and r.get("value") is not None]
    if feats:
        df = pd.DataFrame(feats)
        df["t"] = pd.to_datetime(df["time"], unit="s")
        names = sorted(df["name"].unique())
        fig, ax = plt.subplots(figsize=(10, 4))
        for name in names:
            d = df[df["name"] == name]
            ax.plot(d["t"], d["value"], lw=1, label=str(name))
        thr = float(df["threshold"].max())
        ax.axhline(thr, color="tab:red", ls="--", lw=0.8, label=f"threshold {thr:g}")
        ax.set_ylabel(f"{df['statistic'].iloc[0]}")
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        sections.append(f"<h2>Drift statistics</h2><img src='data:image/png;base64,{_png(fig)}'/>")
        plt.close(fig)
    else:
        sections.append("<h2>Drift statistics</h2><p>No drift statistics on the drift topic yet.</p>")

    # 3. Decisions.
    rows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(r["time"]))),
            html.escape(str(r.get("name"))),
            html.escape(str(r.get("statistic"))),
            html.escape(str(r.get("model_version"))),
            html.escape(str((r.get("detail") or {}).get("reason", ""))),
        )
        for r in decisions
    )
    sections.append(
        "<h2>Retrains, promotions and rollbacks</h2>"
        + (
            "<table><tr><th>time (UTC)</th><th>decision</th><th>outcome</th><th>champion</th>"
            f"<th>reason</th></tr>{rows}</table>"
            if rows
            else "<p>No decisions taken yet.</p>"
        )
    )
    style = (
        "body{font-family:sans-serif;max-width:1040px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Weir report: {html.escape(spec.name)}</title>"
        f"<style>{style}</style></head><body><h1>Weir report: {html.escape(spec.name)}</h1>"
        f"<p>Model {html.escape(spec.model.name)} ({spec.task}); generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>{''.join(sections)}</body></html>"
    )


def write_report(spec: PipelineSpec, settings: Settings, path: str | Path) -> Path:
    drift = read_topic(settings, spec.topics.drift)
    training = read_topic(settings, spec.topics.training_log)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(spec, drift, training))
    return out
