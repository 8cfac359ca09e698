"""``retort dashboards push | snapshot``: Grafana dashboards through its API, or PNGs from Prometheus.

push: creates or updates the Prometheus datasource, the Retort folder and every dashboard of
``infra/grafana/dashboards`` (idempotent: prints created / updated / unchanged per item).
snapshot: renders every dashboard from Prometheus over the last ``--since`` as one PNG each
(for people without Grafana; the pipeline report uses the same ``cluster.dashboards.snapshot``).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from cluster.errors import RetortError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="push Grafana dashboards | render them as PNGs from Prometheus")
    actions = p.add_subparsers(dest="dashboards_action", metavar="ACTION")
    p.set_defaults(handler=lambda a: (p.print_help(), 2)[1])

    s = actions.add_parser(
        "push", help="create/update the datasource, the Retort folder and the dashboards in Grafana"
    )
    s.add_argument(
        "--grafana-url",
        default=os.environ.get("GRAFANA_URL"),
        help="Grafana base URL, e.g. http://127.0.0.1:3000 (default: $GRAFANA_URL)",
    )
    s.add_argument(
        "--token",
        default=os.environ.get("GRAFANA_TOKEN"),
        help="service-account token (default: $GRAFANA_TOKEN)",
    )
    s.add_argument("--user", default=None, help="basic-auth user (instead of a token)")
    s.add_argument("--password", default=os.environ.get("GRAFANA_PASSWORD"), help="basic-auth password")
    s.add_argument(
        "--prometheus-url",
        default=None,
        help="URL Grafana reaches Prometheus at (default: the cluster of `retort up`)",
    )
    s.add_argument("--dir", default=None, help="dashboard JSON folder (default: infra/grafana/dashboards)")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per Grafana API call")
    s.set_defaults(handler=push)

    n = actions.add_parser("snapshot", help="render every dashboard as a PNG from Prometheus")
    n.add_argument(
        "--prometheus-url", default=None, help="Prometheus URL (default: the cluster of `retort up`)"
    )
    n.add_argument("--since", default="15m", help="time range ending now: 90s, 15m, 2h (default 15m)")
    n.add_argument(
        "--step", type=float, default=None, help="resolution in seconds (default: range / 120, >= 1)"
    )
    n.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="template variable value (regex), e.g. --var application=retort (default: all)",
    )
    n.add_argument("--out", default=None, help="output folder (default: runs/dashboards/<UTC time>)")
    n.add_argument("--dir", default=None, help="dashboard JSON folder (default: infra/grafana/dashboards)")
    n.set_defaults(handler=snapshot)


def _prometheus_url(given: str | None) -> str:
    if given:
        if not re.match(r"^https?://[^/\s]+", given):
            raise RetortError(f"--prometheus-url must look like http://host:9090 (got {given!r})")
        return given.rstrip("/")
    from cluster.local_cluster import prometheus_url

    url = prometheus_url()
    if not url:
        raise RetortError("no Prometheus: pass --prometheus-url or start the cluster with `retort up`")
    return url


def parse_duration(text: str) -> float:
    """``90s`` / ``15m`` / ``2h`` / ``1d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text or "")
    if not m:
        raise RetortError(f"--since must look like 90s, 15m, 2h or 1d (got {text!r})")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def push(args: argparse.Namespace) -> int:
    from cluster import dashboards as D

    if not args.grafana_url:
        raise RetortError("--grafana-url is required (or set GRAFANA_URL)")
    dashboards = D.load_all(Path(args.dir) if args.dir else D.DASHBOARDS_DIR)
    prom = _prometheus_url(args.prometheus_url)
    api = D.grafana_api(args.grafana_url, args.token, args.user, args.password, args.timeout)
    results = D.push(api, args.grafana_url, prom, dashboards)
    for r in results:
        print(r)
    changed = sum(r.action != "unchanged" for r in results)
    print(f"{changed} changed, {len(results) - changed} unchanged at {args.grafana_url}")
    return 0


def snapshot(args: argparse.Namespace) -> int:
    from cluster import dashboards as D

    span = parse_duration(args.since)
    step = args.step or max(span / 120.0, 1.0)
    if step <= 0:
        raise RetortError(f"--step must be > 0 (got {step})")
    variables = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RetortError(f"--var {item!r} must look like NAME=VALUE")
        variables[name.strip()] = value
    prom = _prometheus_url(args.prometheus_url)
    out = (
        Path(args.out)
        if args.out
        else Path("runs/dashboards") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    )
    end = time.time()
    paths = D.snapshot(
        prom, Path(args.dir) if args.dir else D.DASHBOARDS_DIR, out, end - span, end, step, variables
    )
    for p in paths:
        print(p)
    return 0
