"""``weir dashboards publish|lint``: push the Grafana dashboards, or check them."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="publish the Grafana dashboards, or lint them")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    pub = actions.add_parser(
        "publish",
        help="create or update every dashboard in Grafana",
        description="Upsert every dashboard JSON through Grafana's HTTP API. Credentials come "
        "from GRAFANA_TOKEN (a service account token) or GRAFANA_USER and GRAFANA_PASSWORD.",
    )
    pub.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://localhost:3000")
    pub.add_argument("--folder", default="Weir", help="Grafana folder, created if missing (Weir)")
    pub.add_argument("--dir", default="dashboards", help="folder of dashboard *.json (dashboards)")
    pub.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds (10)")
    pub.set_defaults(func=run_publish)

    lint = actions.add_parser(
        "lint",
        help="check dashboard structure and that every metric named exists",
    )
    lint.add_argument("--dir", default="dashboards", help="folder of dashboard *.json (dashboards)")
    lint.add_argument(
        "--rules",
        default="deploy/prometheus/rules",
        help="folder of Prometheus rule *.yml to check as well (deploy/prometheus/rules)",
    )
    lint.set_defaults(func=run_lint)


def run_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weir.dashboards import credential_from_env, publish

    published = publish(
        args.url,
        Path(args.dir),
        folder=args.folder,
        credential=credential_from_env(),
        timeout=args.timeout,
    )
    for d in published:
        print(f"{d.title}: {d.url}")
    return 0


def run_lint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weir.dashboards import lint

    problems = lint(Path(args.dir), Path(args.rules))
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s)")
        return 1
    print(f"{args.dir}: ok")
    return 0
