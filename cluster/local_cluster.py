"""The local cluster: ``up(cfg)`` starts a Ray head, Prometheus and (optionally) Redis as plain
processes on 127.0.0.1; ``status()`` says what runs and where; ``down()`` stops exactly that.

State (pids, ports, URLs, the client environment) is in ``$RETORT_HOME/cluster/state.json``
(``RETORT_HOME`` defaults to ``~/.retort``); logs are next to it. Nothing here calls ``ray stop``
(it kills every Ray cluster on the machine): see ``cluster.procs`` for how processes are scoped.
Other modules ask ``dashboard_url()``, ``prometheus_url()``, ``redis_url()``, ``serve_http_port()``
and ``client_env()`` about the running cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config.cluster import ClusterConfig
from cluster.errors import RetortError
from cluster.net import free_port_range, free_ports, port_is_free
from cluster.procs import MARKER_ENV, alive, scope_processes, spawn, stop_scope, terminate
from cluster.ray_head import RayHead, RayPorts, dashboard_get, start_head, wait_for_sd_file


def retort_home() -> Path:
    return Path(os.environ.get("RETORT_HOME") or "~/.retort").expanduser().resolve()


def state_dir() -> Path:
    return retort_home() / "cluster"


def state_path() -> Path:
    return state_dir() / "state.json"


def load_state() -> dict | None:
    try:
        return json.loads(state_path().read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RetortError(f"{state_path()} is corrupt ({e}); remove it after checking nothing runs") from None


def _save_state(state: dict) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_path())


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialize up/down for one RETORT_HOME."""
    state_dir().mkdir(parents=True, exist_ok=True)
    with open(state_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- what runs -------------------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    url: str
    running: bool
    detail: str = ""


@dataclass
class ClusterStatus:
    components: list[Component] = field(default_factory=list)
    serve_apps: dict[str, dict] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 everything up, 1 partially up (or nothing recorded is alive)."""
        return 0 if self.components and all(c.running for c in self.components) else 1


def _head(state: dict | None) -> RayHead | None:
    return RayHead.from_dict(state["ray"]) if state and state.get("ray") else None


def ray_alive(head: RayHead) -> bool:
    """GCS and raylet processes of this head run, and its dashboard answers (with the token)."""
    names = set()
    for p in scope_processes(head.scope, [head.pgid]):
        with contextlib.suppress(Exception):
            names.add(p.name())
    return {"gcs_server", "raylet"} <= names and dashboard_get(head, "/api/version", 3.0)[0] == 200


def status() -> ClusterStatus | None:
    """What the state file records and whether it is alive; None when nothing was started."""
    from cluster import prometheus

    state = load_state()
    if state is None:
        return None
    st = ClusterStatus(env=state.get("env", {}))
    head = _head(state)
    if head is not None:
        up = ray_alive(head)
        st.components.append(
            Component("ray", head.dashboard_url, up, f"GCS {head.gcs_address}, temp dir {head.temp_dir}")
        )
        if up:
            st.serve_apps = serve_applications(head)
    prom = state.get("prometheus")
    if prom:
        up = alive(prom["pid"]) and prometheus.api_get(prom["url"], "/-/ready", 3.0)[0] == 200
        detail = f"pid {prom['pid']}"
        if up:
            if head is not None:
                refresh_ray_targets(state)
            ts = [t for t in prometheus.targets(prom["url"]) if t["job"] == "ray"]
            detail += f", ray targets up {sum(t['health'] == 'up' for t in ts)}/{len(ts)}"
        st.components.append(Component("prometheus", prom["url"], up, detail))
    red = state.get("redis")
    if red:
        st.components.append(
            Component(
                "redis",
                red["url"],
                alive(red["pid"]) and _redis_ping(red["host"], red["port"]),
                f"pid {red['pid']}, maxmemory {red['maxmemory']}",
            )
        )
    return st


def serve_applications(head: RayHead) -> dict[str, dict]:
    """Serve apps from the dashboard's REST API (with the bearer token): name -> {status, route_prefix}."""
    code, body = dashboard_get(head, "/api/serve/applications/", 10.0)
    if code != 200:
        return {}
    apps = json.loads(body).get("applications") or {}
    return {
        name: {"status": a.get("status", ""), "route_prefix": a.get("route_prefix")}
        for name, a in apps.items()
    }


def dashboard_url() -> str | None:
    """The running cluster's dashboard / Jobs API URL, or None."""
    state = load_state()
    head = _head(state)
    if head is None or not scope_processes(head.scope, [head.pgid]):
        return None
    return head.dashboard_url


def prometheus_url() -> str | None:
    state = load_state()
    prom = (state or {}).get("prometheus")
    return prom["url"] if prom and alive(prom["pid"]) else None


def redis_url() -> str | None:
    state = load_state()
    red = (state or {}).get("redis")
    return red["url"] if red and alive(red["pid"]) else None


def serve_http_port() -> int | None:
    """The Serve HTTP port this cluster was configured with (Serve itself starts on the first deploy)."""
    state = load_state()
    return int(state["serve"]["http_port"]) if state and state.get("serve") else None


def client_env() -> dict[str, str]:
    """Environment for Ray clients of the running cluster (auth + addresses); {} if none runs."""
    state = load_state()
    return dict(state.get("env", {})) if state else {}


def export_lines(env: dict[str, str]) -> list[str]:
    return [f"export {k}={v}" for k, v in env.items()]


# ---- up ---------------------------------------------------------------------------------------------


def _resolve_ports(cfg: ClusterConfig) -> tuple[RayPorts, int, int]:
    """Turn 0 into free ports; refuse (exit 2) a fixed port that is taken."""
    r = cfg.ray
    fixed = {
        "ray.gcs_port": r.gcs_port,
        "ray.dashboard_port": r.dashboard_port,
        "ray.metrics_export_port": r.metrics_export_port,
        "ray.client_server_port": r.client_server_port,
        "ray.node_manager_port": r.node_manager_port,
        "ray.object_manager_port": r.object_manager_port,
        "ray.dashboard_agent_listen_port": r.dashboard_agent_listen_port,
        "ray.dashboard_agent_grpc_port": r.dashboard_agent_grpc_port,
        "ray.runtime_env_agent_port": r.runtime_env_agent_port,
        "ray.autoscaler_metrics_port": r.autoscaler_metrics_port,
        "ray.dashboard_metrics_port": r.dashboard_metrics_port,
        "prometheus.port": cfg.prometheus.port if cfg.prometheus.enabled else None,
        "redis.port": cfg.redis.port if cfg.redis.enabled else None,
    }
    used = [v for v in fixed.values() if v]
    if len(used) != len(set(used)):
        raise RetortError(f"two components are configured on the same port: {fixed}")
    for key, port in fixed.items():
        if port and not port_is_free(port):
            raise RetortError(
                f"port {port} ({key}) is already in use; choose another, e.g. `retort up {key}=0` (0 = any free port)"
            )
    spare = iter(free_ports(len(fixed)))
    v = {k: (p if p else next(spare)) for k, p in fixed.items()}
    if r.min_worker_port and r.max_worker_port:
        if r.max_worker_port < r.min_worker_port:
            raise RetortError(
                f"ray.max_worker_port ({r.max_worker_port}) < ray.min_worker_port ({r.min_worker_port})"
            )
        lo, hi = r.min_worker_port, r.max_worker_port
    else:
        lo, hi = free_port_range(200)
    ports = RayPorts(
        gcs=v["ray.gcs_port"],
        dashboard=v["ray.dashboard_port"],
        metrics_export=v["ray.metrics_export_port"],
        client_server=v["ray.client_server_port"],
        node_manager=v["ray.node_manager_port"],
        object_manager=v["ray.object_manager_port"],
        dashboard_agent_listen=v["ray.dashboard_agent_listen_port"],
        dashboard_agent_grpc=v["ray.dashboard_agent_grpc_port"],
        runtime_env_agent=v["ray.runtime_env_agent_port"],
        min_worker=lo,
        max_worker=hi,
        autoscaler_metrics=v["ray.autoscaler_metrics_port"],
        dashboard_metrics=v["ray.dashboard_metrics_port"],
    )
    return ports, v["prometheus.port"] or 0, v["redis.port"] or 0


def _binary(name: str, what: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if not found:
        raise RetortError(
            f"{what} executable {name!r} not found; install it (make system-deps) or set its `binary` in the config"
        )
    return found


def default_temp_dir() -> Path:
    """Short (socket paths <= 107 bytes) and stable per RETORT_HOME."""
    digest = hashlib.sha1(str(retort_home()).encode()).hexdigest()[:8]
    return Path(f"/tmp/retort-{os.getuid()}-{digest}")


def up(cfg: ClusterConfig, log=print) -> dict:
    """Start the cluster (or report that it runs). Returns the state."""
    with _locked():
        state = load_state()
        if state is not None:
            st = status()
            if st is not None and st.exit_code == 0:
                log(f"the cluster is already running (state: {state_path()})")
                return state
            log("a previous cluster is partially up: stopping what is left of it first")
            _stop(state, log)
        return _start(cfg, log)


def _start(cfg: ClusterConfig, log) -> dict:
    prom_bin = _binary(cfg.prometheus.binary, "Prometheus") if cfg.prometheus.enabled else ""
    redis_bin = _binary(cfg.redis.binary, "Redis") if cfg.redis.enabled else ""
    ports, prom_port, redis_port = _resolve_ports(cfg)
    sdir = state_dir()
    temp_dir = Path(cfg.ray.temp_dir).expanduser() if cfg.ray.temp_dir else default_temp_dir()
    token = (
        Path(cfg.ray.auth_token_path).expanduser()
        if cfg.ray.auth_token_path
        else Path.home() / ".ray" / "auth_token"
    )
    state: dict = {
        "started_at": time.time(),
        "home": str(retort_home()),
        "config": cfg.model_dump(mode="json"),
        "serve": {"http_host": cfg.serve.http_host, "http_port": cfg.serve.http_port or free_ports(1)[0]},
    }
    t0 = time.time()
    try:
        head = start_head(
            temp_dir,
            token,
            ports,
            cfg.ray.num_cpus,
            cfg.ray.object_store_memory,
            sdir / "logs" / "ray-start.log",
            dashboard_host=cfg.ray.dashboard_host,
            timeout_s=cfg.ray.startup_timeout_s,
            ingress=cfg.serve.ingress,
        )
        state["ray"] = head.to_dict()
        state["env"] = head.env()
        _save_state(state)
        log(
            f"ray        up in {time.time() - t0:4.1f} s  dashboard {head.dashboard_url}  GCS {head.gcs_address}"
        )
        if cfg.prometheus.enabled:
            t1 = time.time()
            state["prometheus"] = _start_prometheus(cfg, prom_bin, prom_port, head, sdir)
            _save_state(state)
            from cluster import prometheus

            ts = prometheus.wait_targets_up(state["prometheus"]["url"], "ray", timeout_s=20.0)
            n_up = sum(t["health"] == "up" for t in ts)
            log(
                f"prometheus up in {time.time() - t1:4.1f} s  {state['prometheus']['url']}  "
                f"(ray targets up {n_up}/{len(ts)}: {', '.join(state['prometheus']['ray_targets'])})"
            )
        if cfg.redis.enabled:
            t1 = time.time()
            state["redis"] = _start_redis(cfg, redis_bin, redis_port, sdir)
            _save_state(state)
            log(f"redis      up in {time.time() - t1:4.1f} s  {state['redis']['url']}")
    except BaseException:
        log("start failed: stopping what was started")
        _stop(state, log=lambda *_: None)
        raise
    return state


def refresh_ray_targets(state: dict) -> list[str]:
    """Rewrite Ray's SD file (host IP) into our file_sd file (127.0.0.1); Prometheus picks it up."""
    from cluster import prometheus
    from cluster.ray_head import metrics_targets

    head = _head(state)
    prom = state.get("prometheus")
    if head is None or not prom:
        return []
    ts = metrics_targets(head)
    prometheus.write_file_sd(Path(prom["ray_targets_file"]), ts)
    return ts


def _start_prometheus(cfg: ClusterConfig, binary: str, port: int, head: RayHead, sdir: Path) -> dict:
    from cluster import prometheus

    p = cfg.prometheus
    data_dir = Path(p.data_dir).expanduser() if p.data_dir else retort_home() / "prometheus"
    data_dir.mkdir(parents=True, exist_ok=True)
    address = f"{p.host}:{port}"
    ray_file, extra_file = sdir / "ray_targets.json", sdir / "extra_targets.json"
    ray_targets = wait_for_sd_file(head, 30.0)
    prometheus.write_file_sd(ray_file, ray_targets)
    prometheus.write_file_sd(extra_file, p.extra_targets)
    conf = prometheus.render_config(
        sdir / "prometheus.yml",
        scrape_interval=p.scrape_interval,
        cluster_name=socket.gethostname(),
        prometheus_address=address,
        ray_targets_file=ray_file,
        extra_targets_file=extra_file,
    )
    scope = f"prometheus:{data_dir}"
    proc = spawn(
        [
            binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={data_dir}",
            f"--storage.tsdb.retention.time={p.retention}",
            f"--web.listen-address={address}",
            "--web.enable-lifecycle",
        ],
        sdir / "logs" / "prometheus.log",
        {**os.environ, MARKER_ENV: scope},
    )
    url = f"http://{address}"
    if not prometheus.wait_ready(url, p.startup_timeout_s, alive=lambda: proc.poll() is None):
        stop_scope(scope, [proc.pid])
        raise RetortError(
            f"Prometheus did not become ready at {url} (log: {sdir / 'logs' / 'prometheus.log'})", 1
        )
    return {
        "pid": proc.pid,
        "scope": scope,
        "url": url,
        "config_file": str(conf),
        "data_dir": str(data_dir),
        "ray_targets_file": str(ray_file),
        "ray_targets": ray_targets,
    }


def _redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(cfg: ClusterConfig, binary: str, port: int, sdir: Path) -> dict:
    r = cfg.redis
    scope = f"redis:{sdir}"
    proc = spawn(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            r.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--maxmemory",
            r.maxmemory,
            "--maxmemory-policy",
            r.maxmemory_policy,
            "--dir",
            str(sdir),
        ],
        sdir / "logs" / "redis.log",
        {**os.environ, MARKER_ENV: scope},
    )
    deadline = time.time() + r.startup_timeout_s
    while not _redis_ping(r.host, port):
        if proc.poll() is not None or time.time() > deadline:
            stop_scope(scope, [proc.pid])
            raise RetortError(
                f"redis-server did not answer PING on {r.host}:{port} (log: {sdir / 'logs' / 'redis.log'})", 1
            )
        time.sleep(0.1)
    return {
        "pid": proc.pid,
        "scope": scope,
        "host": r.host,
        "port": port,
        "url": f"redis://{r.host}:{port}",
        "maxmemory": r.maxmemory,
    }


# ---- down -------------------------------------------------------------------------------------------


def _scopes(state: dict) -> dict[str, tuple[str, list[int]]]:
    """component -> (scope marker, process-group ids) for everything ``state`` records."""
    out = {
        name: (state[name]["scope"], [state[name]["pid"]])
        for name in ("redis", "prometheus")
        if state.get(name)
    }
    head = _head(state)
    if head is not None:
        out["ray"] = (head.scope, [head.pgid])
    return out


def _stop(state: dict, log) -> None:
    """SIGTERM every recorded component at once, SIGKILL what is left after a few seconds
    (Ray's gcs_server and raylet linger ~10 s on SIGTERM; nothing here needs a graceful exit
    except Prometheus, which exits within a second)."""
    found = {name: scope_processes(scope, pgids) for name, (scope, pgids) in _scopes(state).items()}
    terminate([p for procs in found.values() for p in procs], grace_s=5.0)
    for name, (scope, pgids) in _scopes(state).items():
        stop_scope(scope, pgids, grace_s=3.0)  # stragglers forked while we were stopping
        n = len(found[name])
        where = f"; logs kept in {state['ray']['temp_dir']}" if name == "ray" else ""
        log(f"{name:<10} stopped ({n} process{'es' if n != 1 else ''}{where})")
    with contextlib.suppress(FileNotFoundError):
        state_path().unlink()


def down(log=print) -> None:
    """Stop what ``up`` started. Raises RetortError (exit 2) when nothing is recorded as running."""
    with _locked():
        state = load_state()
        if state is None:
            raise RetortError(f"nothing is running (no cluster state in {state_dir()})")
        _stop(state, log)
