"""The KubeRay manifests, the cluster-launcher YAML and the local scripts point at things that exist."""

from __future__ import annotations

import ast
import importlib.metadata
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config, schema_for

REPO = Path(__file__).resolve().parents[3]
KUBERAY = REPO / "infra" / "kuberay"
pytest.importorskip("ray")  # checks manifests against the installed Ray
RAY_VERSION = importlib.metadata.version("ray")


def docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / name).read_text()))


def cluster_specs() -> list[tuple[str, dict]]:
    (rc,), (job,), (svc,) = docs("raycluster.yaml"), docs("rayjob-distill.yaml"), docs("rayservice.yaml")
    return [
        ("RayCluster", rc["spec"]),
        ("RayJob", job["spec"]["rayClusterSpec"]),
        ("RayService", svc["spec"]["rayClusterConfig"]),
    ]


@pytest.mark.parametrize("kind, spec", cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_clusters_use_token_auth_our_ray_version_and_export_metrics(kind, spec):
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
        for c in g["template"]["spec"]["containers"]:
            assert c["image"].startswith("retort:")
            assert any(p.get("containerPort") == 8080 for p in c.get("ports", []))


def test_rayjob_runs_the_distill_entrypoint_with_a_valid_config():
    (job,) = docs("rayjob-distill.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:5] == ["python", "-m", "train.distill", "-c", "configs/distill/base.yaml"]
    assert (REPO / "train" / "distill" / "__main__.py").is_file() or (REPO / "train" / "distill.py").is_file()
    cfg = load_config(REPO / argv[4], schema_for("distill"), argv[5:])
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.num_workers == workers["replicas"] and cfg.use_gpu


def test_rayservice_builds_our_app_from_a_valid_serve_config():
    (svc,) = docs("rayservice.yaml")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("serve.app", "build_app")
    tree = ast.parse((REPO / "serve" / "app.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == attr for n in tree.body)
    args = dict(app["args"])
    path = REPO / Path(args.pop("config")).relative_to("/app")
    cfg = load_config(path, schema_for("serve"), [f"{k}={v}" for k, v in args.items()])
    assert cfg.model.ref == "student@production"
    assert serve_cfg["http_options"]["port"] == 8000


def test_cluster_launcher_starts_an_authenticated_head_off_6379():
    conf = yaml.safe_load((REPO / "infra" / "ray" / "cluster-launcher.yaml").read_text())
    head = " ".join(conf["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--port=6390" in head and "--dashboard-host=127.0.0.1" in head
    assert "--metrics-export-port=8080" in head
    assert all("RAY_AUTH_MODE=token" in c for c in conf["worker_start_ray_commands"])
    assert conf["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_local_scripts_are_executable_shell(script):
    path = REPO / "infra" / "local" / script
    assert path.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_down_script_with_nothing_running_exits_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "RETORT_HOME": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run(
        [str(REPO / "infra" / "local" / "down.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "nothing is running" in out.stderr
