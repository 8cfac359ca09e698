"""``retort serve deploy | status | shutdown``: the Serve app on the cluster started by ``retort up``.

``deploy`` validates the config, pins ``model.ref`` to the registry version it names now, builds
a Ray Serve deploy config (``import_path: serve.app:build_app`` with the whole resolved config as
``args``) and PUTs it to the dashboard's Serve REST API, the same call ``serve deploy`` makes.
Running it again after ``retort registry promote`` changes the pinned version, so Serve rolls the
replicas over to the new weights without dropping requests. ``--print-config`` writes that Serve
config instead, for ``serve deploy FILE`` or a KubeRay RayService. Nothing here imports ``serve``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from cluster.errors import JobFailed, RetortError

IMPORT_PATH = "serve.app:build_app"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="deploy | status | shutdown the model-serving app (Ray Serve)")
    actions = p.add_subparsers(dest="serve_action", metavar="ACTION")
    p.set_defaults(handler=lambda a: (p.print_help(), 2)[1])

    d = actions.add_parser(
        "deploy", help="deploy (or roll over) the app: waits until RUNNING, prints the URL"
    )
    d.add_argument("-c", "--config", required=True, help="serve config (configs/serve/<preset>.yaml)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    d.add_argument("--address", default=None, help="Ray dashboard URL (default: the cluster of `retort up`)")
    d.add_argument(
        "--print-config", action="store_true", help="print the Serve deploy config (YAML) and exit"
    )
    d.add_argument("--no-wait", action="store_true", help="return once the config is accepted")
    d.set_defaults(handler=deploy)

    s = actions.add_parser("status", help="Serve apps, their status and replicas")
    s.add_argument("--address", default=None, help="Ray dashboard URL")
    s.set_defaults(handler=status)

    x = actions.add_parser("shutdown", help="remove the app (other Serve apps keep running)")
    x.add_argument("--app", default=None, help="app name (default: app_name of -c, else 'retort')")
    x.add_argument("-c", "--config", default=None, help="serve config whose app_name to remove")
    x.add_argument("--address", default=None, help="Ray dashboard URL")
    x.set_defaults(handler=shutdown)


# --- the Serve config ---------------------------------------------------------------------------------


def load_pinned(config: str, overrides: list[str]):
    """The validated ServeConfig with ``model.ref`` pinned to ``name:version`` (printed)."""
    from cluster.config import load_config
    from cluster.config.serve import ServeConfig
    from cluster.registry import open_registry

    cfg = load_config(config, ServeConfig, overrides)
    reg = open_registry(cfg.registry)
    ref = reg.ref(cfg.model.ref)
    # replicas run in the cluster's environment, not this shell's: pin the root this CLI resolved
    # (RETORT_REGISTRY or config) into the app's arguments, as the version is pinned below
    cfg.registry.root = reg.root
    if cfg.model.tokenizer is None and "tokenizer.json" not in reg.manifest(ref).get("files", {}):
        raise RetortError(
            f"{ref} has no tokenizer.json; publish the model with its tokenizer or set model.tokenizer"
        )
    if cfg.model.served_name is None:
        cfg.model.served_name = cfg.model.public_name
    if str(ref) != cfg.model.ref:
        print(f"model {cfg.model.ref} -> {ref}", flush=True)
    cfg.model.ref = str(ref)
    return cfg


def app_entry(cfg) -> dict[str, Any]:
    return {
        "name": cfg.app_name,
        "route_prefix": cfg.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {"serve_config": cfg.model_dump(mode="json")},
    }


def deploy_config(cfg, others: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Ray Serve config file (``serve deploy`` schema) with this app plus ``others``."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [*(others or []), app_entry(cfg)],
    }


# --- talking to the cluster ---------------------------------------------------------------------------


def _client(address: str | None):
    """A ServeSubmissionClient for the dashboard (token auth from the cluster's client env)."""
    url = address or _env_url("RAY_API_SERVER_ADDRESS") or _env_url("RAY_ADDRESS")
    if url is None:
        from cluster.local_cluster import client_env, dashboard_url

        url = dashboard_url()
        for k, v in client_env().items():
            os.environ.setdefault(k, v)
    if url is None:
        raise RetortError("no Ray cluster is running: start one with `retort up` or pass --address")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(url)
    except Exception as e:  # noqa: BLE001 - connection/auth failure: one line
        raise RetortError(f"cannot reach the Ray dashboard at {url}: {str(e).splitlines()[0]}") from None


def _env_url(name: str) -> str | None:
    v = os.environ.get(name, "")
    return v if v.startswith("http") else None


def _other_apps(details: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Declaratively deployed apps other than ``name`` (a PUT replaces the whole set)."""
    apps = details.get("applications") or {}
    return [a["deployed_app_config"] for n, a in apps.items() if n != name and a.get("deployed_app_config")]


def deploy(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_pinned(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(deploy_config(cfg), sort_keys=False), end="")
        return 0
    client = _client(args.address)
    body = deploy_config(cfg, _other_apps(client.get_serve_details(), cfg.app_name))
    try:
        client.deploy_applications(body)
    except Exception as e:  # noqa: BLE001 - the REST API refused the config
        raise JobFailed(f"Serve refused the deploy: {str(e).splitlines()[0]}") from None
    print(f"deploying app {cfg.app_name!r} ({cfg.model.ref})", flush=True)
    if not args.no_wait:
        wait_running(client, cfg.app_name, app_entry(cfg)["args"], cfg.deploy_timeout_s)
    details = client.get_serve_details()
    http = details.get("http_options") or {}
    prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix
    print(f"http://{http.get('host', cfg.http.host)}:{http.get('port', cfg.http.port)}{prefix}")
    return 0


def failure_reason(app: dict[str, Any]) -> str:
    """The most specific line Serve has: a deployment's exception (last traceback line), else the app's message."""
    for dep in (app.get("deployments") or {}).values():
        lines = [ln.strip() for ln in (dep.get("message") or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
        if errors:
            return errors[-1]
    lines = [ln.strip() for ln in (app.get("message") or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown reason"


def wait_running(client, name: str, args: dict[str, Any], timeout_s: float) -> None:
    """Until the app runs *this* config: RUNNING with our args (a rollover passes DEPLOYING)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        app = (client.get_serve_details().get("applications") or {}).get(name) or {}
        st = app.get("status", "")
        ours = (app.get("deployed_app_config") or {}).get("args") == args
        if (
            ours
            and st == "RUNNING"
            and all(d.get("status") == "HEALTHY" for d in app.get("deployments", {}).values())
        ):
            return
        if ours and st == "DEPLOY_FAILED":
            raise JobFailed(
                f"app {name} failed to deploy: {failure_reason(app)} (details: retort serve status)"
            )
        if st != last:
            print(f"  {name}: {st or 'pending'}", flush=True)
            last = st
        time.sleep(1.0)
    raise JobFailed(
        f"app {name} not RUNNING after {timeout_s:g} s (last status {last or 'unknown'}); see `retort serve status`"
    )


def status(args: argparse.Namespace) -> int:
    details = _client(args.address).get_serve_details()
    apps = details.get("applications") or {}
    http = details.get("http_options") or {}
    if not apps:
        print("no Serve apps")
        return 0
    for name, app in apps.items():
        prefix = app.get("route_prefix") or ""
        print(
            f"{name}: {app.get('status')}  http://{http.get('host')}:{http.get('port')}{'' if prefix == '/' else prefix}"
        )
        serve_cfg = ((app.get("deployed_app_config") or {}).get("args") or {}).get("serve_config") or {}
        if serve_cfg:
            print(f"  model {serve_cfg.get('model', {}).get('ref')}")
        for dname, dep in (app.get("deployments") or {}).items():
            states: dict[str, int] = {}
            for r in dep.get("replicas") or []:
                states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
            reps = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) or "no replicas"
            print(f"  {dname}: {dep.get('status')} ({reps})")
    return 0


def shutdown(args: argparse.Namespace) -> int:
    name = args.app
    if name is None and args.config:
        from cluster.config import load_config
        from cluster.config.serve import ServeConfig

        name = load_config(args.config, ServeConfig).app_name
    name = name or "retort"
    client = _client(args.address)
    details = client.get_serve_details()
    if name not in (details.get("applications") or {}):
        print(f"no Serve app {name!r}")
        return 0
    others = _other_apps(details, name)
    if others:
        client.deploy_applications(
            {**{k: details[k] for k in ("proxy_location",) if k in details}, "applications": others}
        )
    else:
        client.delete_applications()
    deadline = time.monotonic() + 120
    while name in (client.get_serve_details().get("applications") or {}) and time.monotonic() < deadline:
        time.sleep(1.0)
    print(f"removed Serve app {name!r}")
    return 0
