"""``retort up | status | down``: the local Ray head + Prometheus (+ Redis if configured)."""

from __future__ import annotations

import argparse
import json

DEFAULT_CONFIG = "configs/cluster/local.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the local Ray head + Prometheus (+ Redis if configured)")
    p.add_argument(
        "-c", "--config", default=None, help=f"cluster config (default: {DEFAULT_CONFIG} if present)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. ray.gcs_port=0 redis.enabled=true",
    )
    p.set_defaults(handler=run_up)
    p = sub.add_parser(
        "status",
        help="show what the local cluster runs and where",
        description="Exit code: 0 all up, 1 partially up, 3 nothing running.",
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=run_status)
    p = sub.add_parser("down", help="stop exactly what `retort up` started")
    p.set_defaults(handler=run_down)


def _config_path(arg: str | None) -> str | None:
    if arg is not None:
        return arg
    from cluster.jobs import REPO

    default = REPO / DEFAULT_CONFIG
    return str(default) if default.is_file() else None


def run_up(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.config.cluster import ClusterConfig
    from cluster.local_cluster import export_lines, up

    cfg = load_config(_config_path(args.config), ClusterConfig, args.overrides)
    state = up(cfg)
    print("clients of this cluster (ray job submit, serve deploy, ray.init) need:")
    for line in export_lines(state.get("env", {})):
        print(f"  {line}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from cluster.local_cluster import export_lines, state_path, status

    st = status()
    if st is None:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print(f"nothing is running (no {state_path()}); start it with `retort up`")
        return 3
    if args.json:
        print(
            json.dumps(
                {
                    "running": st.exit_code == 0,
                    "components": [c.__dict__ for c in st.components],
                    "serve_apps": st.serve_apps,
                    "env": st.env,
                },
                indent=2,
            )
        )
        return st.exit_code
    for c in st.components:
        print(f"{c.name:<10} {'up  ' if c.running else 'DOWN'} {c.url:<28} {c.detail}")
    if st.serve_apps:
        for name, a in st.serve_apps.items():
            print(f"serve app  {a['status']:<8} {name} (route {a['route_prefix']})")
    elif any(c.name == "ray" and c.running for c in st.components):
        print("serve apps: none")
    if st.exit_code != 0:
        print(f"the cluster is only partially up: `retort down` then `retort up` (state: {state_path()})")
    print("for clients:")
    for line in export_lines(st.env):
        print(f"  {line}")
    return st.exit_code


def run_down(args: argparse.Namespace) -> int:
    from cluster.local_cluster import down

    down()
    print("the cluster is down")
    return 0
