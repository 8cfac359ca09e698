"""ClusterConfig, the Prometheus config it renders, Ray's SD-file rewrite, and port checks (no processes)."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from cluster.config.cluster import ClusterConfig
from cluster.errors import ConfigError, RetortError

REPO = Path(__file__).resolve().parents[3]
LOCAL = REPO / "configs" / "cluster" / "local.yaml"


def test_shipped_local_config_validates_with_safe_defaults():
    cfg = load_config(LOCAL, ClusterConfig)
    assert cfg.ray.gcs_port != 6379 and cfg.redis.port != 6379
    assert cfg.ray.dashboard_host == "127.0.0.1" and cfg.prometheus.host == "127.0.0.1"
    assert (cfg.ray.dashboard_port, cfg.prometheus.port, cfg.serve.http_port) == (8265, 9090, 8000)
    assert (
        cfg.model_dump() == load_config(None, ClusterConfig).model_dump()
    )  # the file spells out the defaults


def test_every_field_is_described():
    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(ClusterConfig)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ray.gcs_port=70000", "ray.gcs_port: Input should be less than or equal to 65535"),
        ("ray.colour=blue", "unknown field 'ray.colour'"),
        ("redis.maxmemory=lots", "redis.maxmemory"),
        ("prometheus.retention=forever", "prometheus.retention"),
        (
            "ray.temp_dir=/tmp/a-very-long-temporary-directory-name-for-ray",
            "temp_dir must be at most 40 characters",
        ),
        ("ray.object_store_memory=1000", "ray.object_store_memory"),
    ],
)
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(LOCAL, ClusterConfig, [override])
    assert "\n" not in str(e.value) and str(LOCAL) in str(e.value)


def test_overrides_enable_redis_and_free_ports():
    cfg = load_config(LOCAL, ClusterConfig, ["redis.enabled=true", "ray.gcs_port=0", "prometheus.port=0"])
    assert cfg.redis.enabled and cfg.ray.gcs_port == 0 and cfg.prometheus.port == 0


def test_taken_port_is_refused(monkeypatch, tmp_path):
    from cluster.local_cluster import _resolve_ports

    monkeypatch.setenv("RETORT_HOME", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = load_config(
            None,
            ClusterConfig,
            [
                f"prometheus.port={port}",
                "ray.gcs_port=0",
                "ray.dashboard_port=0",
                "ray.metrics_export_port=0",
                "ray.client_server_port=0",
            ],
        )
        with pytest.raises(RetortError, match=rf"port {port} \(prometheus.port\) is already in use"):
            _resolve_ports(cfg)


def test_zero_ports_become_distinct_free_ports():
    from cluster.local_cluster import _resolve_ports

    cfg = load_config(
        None,
        ClusterConfig,
        [
            "ray.gcs_port=0",
            "ray.dashboard_port=0",
            "ray.metrics_export_port=0",
            "ray.client_server_port=0",
            "prometheus.port=0",
            "redis.enabled=true",
            "redis.port=0",
        ],
    )
    ports, prom, red = _resolve_ports(cfg)
    singles = [v for k, v in vars(ports).items() if k not in ("min_worker", "max_worker")] + [prom, red]
    assert all(singles) and len(set(singles)) == len(singles)
    assert ports.max_worker - ports.min_worker == 199 and ports.max_worker < 32768
    assert not set(singles) & set(range(ports.min_worker, ports.max_worker + 1))


def test_same_port_twice_is_refused():
    from cluster.local_cluster import _resolve_ports

    cfg = load_config(
        None,
        ClusterConfig,
        [
            "ray.gcs_port=0",
            "ray.dashboard_port=0",
            "ray.metrics_export_port=0",
            "ray.client_server_port=0",
            "prometheus.port=45678",
            "redis.enabled=true",
            "redis.port=45678",
        ],
    )
    with pytest.raises(RetortError, match="same port"):
        _resolve_ports(cfg)


def test_prometheus_config_renders_and_promtool_accepts_it(tmp_path):
    from cluster import prometheus

    ray_sd, extra_sd = tmp_path / "ray_targets.json", tmp_path / "extra.json"
    prometheus.write_file_sd(ray_sd, ["127.0.0.1:8080", "127.0.0.1:44217"])
    prometheus.write_file_sd(extra_sd, [])
    out = prometheus.render_config(
        tmp_path / "prometheus.yml",
        scrape_interval="5s",
        cluster_name="test",
        prometheus_address="127.0.0.1:9090",
        ray_targets_file=ray_sd,
        extra_targets_file=extra_sd,
    )
    conf = yaml.safe_load(out.read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [str(ray_sd)]
    assert conf["global"]["scrape_interval"] == "5s"
    assert "${" not in out.read_text()
    promtool = Path("/usr/bin/promtool")
    if promtool.exists():
        res = subprocess.run([str(promtool), "check", "config", str(out)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_write_file_sd_reports_changes(tmp_path):
    from cluster.prometheus import write_file_sd

    f = tmp_path / "sd.json"
    assert write_file_sd(f, ["127.0.0.1:1", "127.0.0.1:2"])
    assert not write_file_sd(f, ["127.0.0.1:2", "127.0.0.1:1"])
    assert json.loads(f.read_text()) == [{"targets": ["127.0.0.1:1", "127.0.0.1:2"], "labels": {}}]


def test_ray_sd_targets_are_rewritten_to_loopback(tmp_path):
    from cluster.ray_head import SD_FILE, RayHead, RayPorts, metrics_targets

    ports = RayPorts(*range(50001, 50010), 20000, 20099, 50010, 50011)
    head = RayHead(temp_dir=str(tmp_path), token_path=str(tmp_path / "t"), ports=ports)
    assert metrics_targets(head) == ["127.0.0.1:50003"]  # before Ray writes its file: the export port
    (tmp_path / SD_FILE).write_text(
        json.dumps(
            [{"labels": {"job": "ray"}, "targets": ["192.0.2.2:50003", "192.0.2.2:50010", "10.1.2.3:50011"]}]
        )
    )
    assert metrics_targets(head) == ["127.0.0.1:50003", "127.0.0.1:50010", "127.0.0.1:50011"]
    assert RayHead.from_dict(head.to_dict()) == head


def test_ray_head_env_covers_every_client(tmp_path):
    from cluster.ray_head import RayHead, RayPorts

    head = RayHead(
        temp_dir="/tmp/x", token_path=str(tmp_path / "tok"), ports=RayPorts(*range(50001, 50010), 1, 2)
    )
    assert head.env() == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok"),
        "RAY_ADDRESS": "127.0.0.1:50001",
        "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:50002",
        "RAY_DASHBOARD_ADDRESS": "http://127.0.0.1:50002",
    }


def test_token_is_created_private_and_reused(tmp_path):
    import stat

    from cluster.ray_head import ensure_token

    p = tmp_path / "sub" / "auth_token"
    tok = ensure_token(p)
    assert len(tok) == 64 and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert ensure_token(p) == tok


def test_nothing_running(monkeypatch, tmp_path):
    from cluster import local_cluster

    monkeypatch.setenv("RETORT_HOME", str(tmp_path))
    assert local_cluster.status() is None
    assert local_cluster.dashboard_url() is None and local_cluster.prometheus_url() is None
    assert local_cluster.redis_url() is None and local_cluster.client_env() == {}
    with pytest.raises(RetortError, match="nothing is running") as e:
        local_cluster.down()
    assert e.value.exit_code == 2


def test_corrupt_state_is_a_clear_error(monkeypatch, tmp_path):
    from cluster import local_cluster

    monkeypatch.setenv("RETORT_HOME", str(tmp_path))
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "state.json").write_text("{not json")
    with pytest.raises(RetortError, match="state.json is corrupt"):
        local_cluster.status()


def test_default_temp_dir_is_short_and_per_home(monkeypatch, tmp_path):
    from cluster import local_cluster

    monkeypatch.setenv("RETORT_HOME", str(tmp_path / "a"))
    a = local_cluster.default_temp_dir()
    monkeypatch.setenv("RETORT_HOME", str(tmp_path / "b"))
    b = local_cluster.default_temp_dir()
    assert a != b and len(str(a)) <= 40


def test_ray_start_command_pins_every_port_and_marks_its_processes(tmp_path):
    from cluster.procs import MARKER_ENV
    from cluster.ray_head import RayHead, RayPorts, _start_cmd, _start_env

    ports = RayPorts(*range(50001, 50010), 20000, 20099, 50010, 50011)
    cmd = _start_cmd(tmp_path, ports, 4, 300 * 1024**2, "127.0.0.1")
    flags = dict(zip(cmd[3:-1:2], cmd[4:-1:2], strict=True))
    assert (
        cmd[1:3] == ["start", "--head"]
        and flags["--port"] == "50001"
        and flags["--dashboard-host"] == "127.0.0.1"
    )
    assert {str(p) for p in range(50001, 50010)} <= set(flags.values()) and flags["--temp-dir"] == str(
        tmp_path
    )
    env = _start_env(RayHead(temp_dir=str(tmp_path), token_path=str(tmp_path / "tok"), ports=ports))
    assert env[MARKER_ENV] == f"ray:{tmp_path}" and env["RAY_AUTH_MODE"] == "token"
    assert (env["AUTOSCALER_METRIC_PORT"], env["DASHBOARD_METRIC_PORT"]) == ("50010", "50011")
    assert "RAY_ADDRESS" not in env and env["PATH"].split(":")[0].endswith(".venv/bin")
