"""Shared by the serving integration tests: a tiny random model + tokenizer in a temp registry,
and a running Serve app on free ports (one per test module)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
    "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!\n"
    "Unicode: naïve café, Grüße, 東京, Ελληνικά, emoji 🙂 and more text to learn merges from.\n"
)


def make_checkpoint(out: Path, seed: int = 0, max_seq_len: int | None = None) -> Path:
    """A tiny random Llama (vocab 512) with a byte-level BPE tokenizer trained on a few KB."""
    from cluster.config.model import preset
    from cluster.model import Transformer
    from cluster.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([CORPUS] * 20, vocab_size=400, out_dir=out)
    cfg = preset("tiny") if max_seq_len is None else preset("tiny", max_seq_len=max_seq_len)
    assert tok.vocab_size <= cfg.vocab_size
    model = Transformer(cfg).init_weights(seed)
    model.save_pretrained(out, extra_config={"eos_token_id": tok.eos_id})
    return out


def publish_tiny(
    registry_root: Path,
    work: Path,
    name: str = "student",
    alias: str = "production",
    seed: int = 0,
    max_seq_len: int | None = None,
) -> str:
    from cluster.registry import open_registry

    reg = open_registry(root=str(registry_root), cache_dir=str(registry_root / ".cache"))
    ref = reg.publish(
        name, make_checkpoint(work / f"{name}-{seed}", seed, max_seq_len), lineage={}, metrics={}
    )
    reg.promote(ref.name, ref.version, alias)
    return str(ref)


def serve_args(registry_root: Path, **overrides: Any) -> dict[str, Any]:
    """build_app args for configs/serve/tiny.yaml pointed at ``registry_root``."""
    repo = Path(__file__).resolve().parents[2]
    args: dict[str, Any] = {
        "config": str(repo / "configs/serve/tiny.yaml"),
        "registry.root": str(registry_root),
        "registry.cache_dir": str(registry_root / ".cache"),
    }
    args.update(overrides)
    return args


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


class ServeInstance:
    """Serve started on a free port of the session cluster; apps deployed with ``deploy``."""

    def __init__(self, ray_cluster: Any) -> None:
        import ray
        from ray import serve

        from cluster.net import free_port

        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.base = f"http://127.0.0.1:{self.port}"

    def deploy(self, args: dict[str, Any]) -> str:
        from ray import serve

        from serve.app import build_app, load_serve_config

        cfg = load_serve_config(args)
        serve.run(build_app(args), name=cfg.app_name, route_prefix=cfg.route_prefix)
        prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix
        return self.base + prefix

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        deadline = time.monotonic() + 20  # the proxy is gone when nothing listens on its port any more
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(self.port), f"Serve's proxy still listens on {self.port}"


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def model_server_stats(app_name: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", app_name=app_name).stats.remote().result(timeout_s=30)


def running_replicas(app_name: str, deployment: str = "ModelServer") -> int:
    from ray import serve

    status = serve.status().applications[app_name].deployments[deployment]
    return sum(int(n) for state, n in status.replica_states.items() if str(state).upper().endswith("RUNNING"))
