"""Serve HTTP overhead over a direct engine call, for a 1-token completion.

    python -m serve.bench_http [--requests 300] [--preset tiny]

The same checkpoint (a random ``--preset`` model with a small trained tokenizer, published to a
temporary registry) is measured twice, sequentially, on this machine:

* direct: ``LLMEngine.add_request`` + ``step()`` until finished, in-process (the floor);
* HTTP: ``POST /v1/completions`` (max_tokens=1, keep-alive client) through Serve's proxy, the
  ingress (validation, tokenization) and a streaming handle call to the model-server replica.

Prints p50/p99 of both and their ratio; the overhead is HTTP p50 minus direct p50.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "def add(a, b):\n    return a + b\n"
CORPUS = ("The quick brown fox jumps over the lazy dog. def add(a, b): return a + b\n"
          "class Point: pass. Sphinx of black quartz, judge my vow. 東京 naïve café 🙂\n") * 40


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def publish_random(root: Path, preset: str) -> Path:
    """A random ``preset`` model + tokenizer as ``bench:1@production`` in a registry at ``root``."""
    from cluster.config.model import preset as model_preset
    from cluster.model import Transformer
    from cluster.registry import open_registry
    from cluster.tokenizer import train_tokenizer

    src = root / "ckpt"
    cfg = model_preset(preset)
    tok = train_tokenizer([CORPUS], vocab_size=min(cfg.vocab_size, 512), out_dir=src)
    Transformer(cfg).init_weights(0).save_pretrained(src, extra_config={"eos_token_id": tok.eos_id})
    reg = open_registry(root=str(root / "registry"), cache_dir=str(root / "cache"))
    ref = reg.publish("bench", src, lineage={}, metrics={})
    reg.promote(ref.name, ref.version, "production")
    return reg.resolve(ref)


def bench_direct(model_dir: Path, engine_cfg: Any, n: int) -> list[float]:
    from cluster.tokenizer import load_tokenizer
    from serve.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_pretrained(model_dir, engine_cfg)
    ids = load_tokenizer(model_dir).encode(PROMPT)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    out = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        engine.add_request(f"r{i}", ids, params)
        while engine.has_unfinished():
            engine.step()
        if i >= 10:  # warm-up
            out.append(time.perf_counter() - t0)
    return out


def bench_http(url: str, n: int) -> list[float]:
    import httpx

    body = {"model": "bench", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    out = []
    with httpx.Client(timeout=60) as c:
        for i in range(n + 10):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/completions", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            if i >= 10:
                out.append(dt)
    return out


def measure_http_overhead(n: int = 300, preset: str = "tiny", prefix_caching: bool = False) -> dict[str, Any]:
    """p50/p99 (seconds) of a 1-token completion: direct engine call vs HTTP through Serve."""
    import ray
    from ray import serve

    from cluster.config.serve import ServeConfig
    from cluster.net import free_port
    from serve.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = publish_random(root, preset)
        port = free_port()
        cfg = ServeConfig.model_validate({
            "http": {"port": port}, "model": {"ref": "bench@production"},
            "engine": {"num_blocks": 256, "max_num_seqs": 8, "max_num_batched_tokens": 256, "dtype": "float32",
                       "device": "cpu", "enable_prefix_caching": prefix_caching},
            "registry": {"root": str(root / "registry"), "cache_dir": str(root / "cache")},
            "replica": {"num_cpus": 0.5, "torch_threads": 1}})
        import torch

        torch.set_num_threads(1)  # same as the replica
        direct = bench_direct(model_dir, cfg.engine, n)
        ray.init(num_cpus=4, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"serve_config": cfg.model_dump(mode="json")}), name="bench", route_prefix="/")
            http = bench_http(f"http://127.0.0.1:{port}", n)
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"n": n, "preset": preset,
            "direct_p50": _pct(direct, 0.5), "direct_p99": _pct(direct, 0.99), "direct_mean": statistics.mean(direct),
            "http_p50": _pct(http, 0.5), "http_p99": _pct(http, 0.99), "http_mean": statistics.mean(http)}


def format_table(r: dict[str, Any]) -> str:
    ms = 1000.0
    rows = [("direct engine call", r["direct_p50"], r["direct_p99"]), ("HTTP via Serve", r["http_p50"], r["http_p99"])]
    lines = [f"1-token completion, {r['preset']} model, {r['n']} sequential requests", "",
             f"{'path':<22}{'p50 ms':>10}{'p99 ms':>10}", "-" * 42]
    lines += [f"{name:<22}{p50 * ms:>10.2f}{p99 * ms:>10.2f}" for name, p50, p99 in rows]
    lines += ["-" * 42,
              f"{'ratio HTTP/direct':<22}{r['http_p50'] / r['direct_p50']:>9.1f}x{r['http_p99'] / r['direct_p99']:>9.1f}x",
              f"{'Serve overhead':<22}{(r['http_p50'] - r['direct_p50']) * ms:>10.2f}"
              f"{(r['http_p99'] - r['direct_p99']) * ms:>10.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench_http", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="measured requests per path (after 10 warm-up)")
    p.add_argument("--preset", default="tiny", help="model preset (random weights)")
    args = p.parse_args(argv)
    print(format_table(measure_http_overhead(args.requests, args.preset)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
