"""Serve HTTP overhead over a direct engine call, for a short completion.

    python -m serve.bench_http [--requests 300] [--max-tokens 1] [--preset tiny] [--ingress proxy,haproxy]

The same checkpoint (a random ``--preset`` model with a small trained tokenizer, published to a
temporary registry), prompt and ``max_tokens`` are measured on this machine, one request at a time:

* direct: ``LLMEngine.add_request`` + ``step()`` until finished, in-process (the floor);
* Serve's own floor: a constant-returning deployment behind the same proxy (one proxy -> replica
  hop, no work) -- what no app on this Serve can go below; for a POST the replica also fetches
  the body from the proxy (``receive_asgi_messages``, one more actor call), so both are measured;
* both app topologies (``serve.app``), ``GET /health`` and ``POST /v1/completions`` non-streamed
  and streamed (the whole SSE response to ``[DONE]``), keep-alive client:
  ``split`` = proxy -> ingress replica -> model-server replica (DeploymentHandle);
  ``collocated`` = proxy -> model-server replica serving HTTP itself.

``--ingress proxy,haproxy`` (default ``proxy``) starts one Ray head (``ray start``, as
``retort up`` does) per ingress and measures all of them in the same run: ``proxy`` = Serve's proxy
actor -> replica; ``haproxy`` = Ray 2.60's HAProxy ingress (``retort up serve.ingress=haproxy``):
HAProxy -> the replica's own HTTP server (direct ingress), no actor call, no body fetch.
The proxy's hop is the cluster's setting: ``--proxy-grpc`` (default, what ``retort up`` sets)
starts the proxy head with ``RAY_SERVE_PROXY_USE_GRPC=1``, ``--no-proxy-grpc`` without it
(compare the two in separate runs). ``--replica-env KEY=VALUE`` (repeatable) measures every path a
second time in the same run, behind the same ingress, with Serve env vars on all its replicas
(runtime_env), e.g. ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``; each variant has its own floor.

The HTTP paths are measured in interleaved rounds so that load from other processes on a shared
machine falls on all of them alike; the load average is printed. Overhead = HTTP p50 - direct p50.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.ray_head import INGRESSES

PROMPT = "def add(a, b):\n    return a + b\n"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b\n"
    "class Point: pass. Sphinx of black quartz, judge my vow. 東京 naïve café 🙂\n"
) * 40
WARMUP = 10
ROUNDS = 5
FLOOR_GET = "serve floor: constant, GET"
FLOOR_POST = "serve floor: constant, POST body"
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"


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


def bench_direct(model_dir: Path, engine_cfg: Any, n: int, max_tokens: int) -> list[float]:
    from cluster.tokenizer import load_tokenizer
    from serve.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_pretrained(model_dir, engine_cfg)
    ids = load_tokenizer(model_dir).encode(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for i in range(n + WARMUP):
        t0 = time.perf_counter()
        engine.add_request(f"r{i}", ids, params)
        while engine.has_unfinished():
            engine.step()
        if i >= WARMUP:
            out.append(time.perf_counter() - t0)
    return out


def _paths(base: dict[str, str], max_tokens: int, variant: str) -> dict[str, tuple[str, str, dict | None]]:
    """name -> (method, url, json body) of every HTTP path measured for one variant's apps."""
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    paths: dict[str, tuple[str, str, dict | None]] = {
        f"[{variant}] {FLOOR_GET}": ("GET", base["const"] + "/", None),
        f"[{variant}] {FLOOR_POST}": ("POST", base["const"] + "/", body),
    }
    for topo in ("split", "collocated"):
        paths[f"[{variant}] {topo}: GET /health"] = ("GET", base[topo] + "/health", None)
        paths[f"[{variant}] {topo}: completions"] = ("POST", base[topo] + "/v1/completions", body)
        paths[f"[{variant}] {topo}: completions stream"] = (
            "POST",
            base[topo] + "/v1/completions",
            {**body, "stream": True},
        )
    return paths


def _once(client: Any, method: str, url: str, body: dict | None) -> float:
    t0 = time.perf_counter()
    r = client.request(method, url, json=body)  # reads the whole body (the SSE stream to [DONE] included)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{method} {url}: HTTP {r.status_code}: {r.text[:200]}")
    if body and body.get("stream") and not r.text.rstrip().endswith("data: [DONE]"):
        raise RuntimeError(f"{url}: stream did not end with [DONE]: {r.text[-200:]}")
    return dt


def bench_http(paths: dict[str, tuple[str, str, dict | None]], n: int) -> dict[str, list[float]]:
    """``n`` timed requests per path after a warm-up, in ``ROUNDS`` interleaved rounds."""
    import httpx

    times: dict[str, list[float]] = {name: [] for name in paths}
    with httpx.Client(timeout=60) as c:
        for method, url, body in paths.values():
            for _ in range(WARMUP):
                _once(c, method, url, body)
        per_round = -(-n // ROUNDS)
        for r in range(ROUNDS):
            names = list(paths)[r % len(paths) :] + list(paths)[: r % len(paths)]  # rotate the order
            for name in names:
                method, url, body = paths[name]
                times[name] += [
                    _once(c, method, url, body) for _ in range(min(per_round, n - len(times[name])))
                ]
    return times


def measure_http_overhead(
    n: int = 300,
    preset: str = "tiny",
    max_tokens: int = 1,
    prefix_caching: bool = False,
    proxy_grpc: bool = True,
    variants: dict[str, dict[str, str]] | None = None,
    ingresses: tuple[str, ...] = ("proxy",),
) -> dict[str, Any]:
    """Latencies (seconds) of one completion: direct engine call vs HTTP through Serve, both
    topologies, for each ingress (one Ray head each) and each variant (name -> env vars of its
    replicas; default: ``app``, none). Paths are keyed ``[<ingress> <variant>] <path>``."""
    import torch

    from cluster.config.serve import ServeConfig

    load_before = os.getloadavg()
    variants = variants if variants is not None else {"app": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = publish_random(root, preset)
        cfg = ServeConfig.model_validate(
            {
                "model": {"ref": "bench@production"},
                "engine": {
                    "num_blocks": 256,
                    "max_num_seqs": 8,
                    "max_num_batched_tokens": 256,
                    "dtype": "float32",
                    "device": "cpu",
                    "enable_prefix_caching": prefix_caching,
                },
                "registry": {"root": str(root / "registry"), "cache_dir": str(root / "cache")},
                "replica": {"num_cpus": 0.5, "torch_threads": 1},
            }
        )
        torch.set_num_threads(1)  # same as the replicas
        direct = bench_direct(model_dir, cfg.engine, n, max_tokens)
        heads: list[Any] = []
        paths: dict[str, tuple[str, str, dict | None]] = {}
        try:
            for ingress in ingresses:
                heads.append(_start_head(ingress, proxy_grpc))
                paths.update(_deploy(heads[-1], cfg, variants, max_tokens))
            http = bench_http(paths, n)
        finally:
            from cluster.ray_head import stop_head

            for head in heads:  # its processes (HAProxy, replicas) only; Serve needs no graceful end here
                stop_head(head)
                shutil.rmtree(head.temp_dir, ignore_errors=True)
    return {
        "n": n,
        "preset": preset,
        "max_tokens": max_tokens,
        "load": (load_before, os.getloadavg()),
        "cores": os.cpu_count(),
        "proxy_grpc": proxy_grpc,
        "variants": variants,
        "ingresses": list(ingresses),
        "direct": direct,
        **http,
    }


def _start_head(ingress: str, proxy_grpc: bool) -> Any:
    """A Ray head for ``ingress`` on free ports, as ``retort up`` starts one (``cluster.ray_head``)."""
    from cluster.ray_head import free_ray_ports, start_head

    temp_dir = Path(tempfile.mkdtemp(prefix="rtb-", dir="/tmp"))  # short: Ray's and HAProxy's socket paths
    saved = os.environ.get(PROXY_GRPC_ENV)
    os.environ[PROXY_GRPC_ENV] = "1" if proxy_grpc else "0"  # start_head passes it on to the proxy
    try:
        return start_head(
            temp_dir,
            temp_dir / "auth_token",
            free_ray_ports(),
            num_cpus=6,
            object_store_memory=256 * 1024**2,
            log=temp_dir / "ray-start.log",
            ingress=ingress,
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    finally:
        if saved is None:
            os.environ.pop(PROXY_GRPC_ENV)
        else:
            os.environ[PROXY_GRPC_ENV] = saved


def _deploy(
    head: Any, cfg: Any, variants: dict[str, dict[str, str]], max_tokens: int
) -> dict[str, tuple[str, str, dict | None]]:
    """Serve on ``head`` with the constant app and both topologies of ours for every variant; their paths."""
    import ray
    from ray import serve

    from cluster.net import free_port
    from cluster.ray_head import client_env
    from serve.app import build_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    paths: dict[str, tuple[str, str, dict | None]] = {}
    with client_env(head.env()):
        ray.init(address=head.gcs_address, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for variant, env in variants.items():
                slug = variant.replace(" ", "-")
                base = {"const": f"{url}/{slug}-const"}
                serve.run(_constant_app(env), name=f"{slug}-const", route_prefix=f"/{slug}-const")
                for topo in ("split", "collocated"):
                    name = f"{slug}-{topo}"
                    app_cfg = cfg.model_copy(
                        update={"app_name": name, "route_prefix": f"/{name}", "topology": topo}
                    )
                    app = build_app({"serve_config": app_cfg.model_dump(mode="json")})
                    serve.run(_with_env(app, env), name=name, route_prefix=f"/{name}")
                    base[topo] = f"{url}/{name}"
                paths.update(_paths(base, max_tokens, f"{head.ingress} {variant}"))
        finally:
            ray.shutdown()  # disconnect only: the apps keep serving until stop_head
    return paths


def _constant_app(env: dict[str, str]) -> Any:
    """Serve's floor: a FastAPI ingress (like ours; a plain ``__call__`` deployment measured slower
    here) whose routes answer a constant; the POST route reads the body first, as ours do. ``env``:
    env vars of the replica, as ``_with_env`` gives our app's replicas in the same variant."""
    from fastapi import (  # no `from __future__ import annotations` here: FastAPI reads the hints
        FastAPI,
        Request,
    )
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Constant", ray_actor_options=_actor_options_with_env({"num_cpus": 0.1}, env))
    @serve.ingress(api)
    class Constant:
        @api.get("/")
        async def get(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.post("/")
        async def post(self, request: Request) -> dict[str, str]:
            await request.body()  # a POST's body comes from the proxy in one more actor call
            return {"status": "ok"}

    return Constant.bind()


def _actor_options_with_env(actor_options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
    return {**actor_options, "runtime_env": runtime_env}


def _with_env(app: Any, env: dict[str, str]) -> Any:
    """The application graph ``app`` with ``env`` in every deployment's runtime_env (rebound as built)."""
    if not env:
        return app
    dep = app._bound_deployment
    args = [_with_env(a, env) if hasattr(a, "_bound_deployment") else a for a in dep.init_args]
    return dep.options(ray_actor_options=_actor_options_with_env(dep.ray_actor_options or {}, env)).bind(
        *args, **dep.init_kwargs
    )


def format_table(r: dict[str, Any]) -> str:
    ms = 1000.0
    d50, d99 = _pct(r["direct"], 0.5), _pct(r["direct"], 0.99)
    (b1, b5, b15), (a1, a5, a15) = r["load"]
    envs = "; ".join(
        f"[{name}] replicas: " + (" ".join(f"{k}={v}" for k, v in env.items()) or "none")
        for name, env in r["variants"].items()
    )
    hops = {
        "proxy": f"proxy actor -> replica over {'gRPC' if r['proxy_grpc'] else 'Ray actor calls'} "
        f"({PROXY_GRPC_ENV}={int(r['proxy_grpc'])})",
        "haproxy": "HAProxy -> the replica's own HTTP server (RAY_SERVE_ENABLE_HA_PROXY=1, direct ingress)",
    }
    lines = [
        f"{r['max_tokens']}-token completion, {r['preset']} model, {r['n']} sequential requests per path "
        f"({ROUNDS} interleaved rounds)",
        f"load average before {b1:.2f} {b5:.2f} {b15:.2f}, after {a1:.2f} {a5:.2f} {a15:.2f} ({r['cores']} cores)",
        *(f"[{ingress} ...]: {hops[ingress]}" for ingress in r["ingresses"]),
        envs,
        "",
        f"{'path':<58}{'p50 ms':>9}{'p99 ms':>9}{'p50 x direct':>14}{'p50 - direct':>14}{'p50 - floor':>13}",
        "-" * 117,
        f"{'direct engine call (in-process)':<58}{d50 * ms:>9.2f}{d99 * ms:>9.2f}{'1.0x':>14}{'-':>14}{'-':>13}",
    ]
    for ingress in r["ingresses"]:
        for variant in r["variants"]:
            tag = f"[{ingress} {variant}] "
            floors = {"GET": _pct(r[tag + FLOOR_GET], 0.5), "POST": _pct(r[tag + FLOOR_POST], 0.5)}
            for name, xs in r.items():
                if not isinstance(xs, list) or not name.startswith(tag):
                    continue
                p50, p99 = _pct(xs, 0.5), _pct(xs, 0.99)
                engine = name.endswith(("completions", "completions stream"))
                floor = floors["POST" if engine or name.endswith(FLOOR_POST) else "GET"]
                extra = (
                    f"{p50 / d50:>13.1f}x{(p50 - d50) * ms:>14.2f}{(p50 - d50 - floor) * ms:>13.2f}"
                    if engine
                    else f"{'':>14}{'':>14}{(p50 - floor) * ms:>13.2f}"
                )
                lines.append(f"{name:<58}{p50 * ms:>9.2f}{p99 * ms:>9.2f}{extra}")
    lines += [
        "-" * 117,
        "p50 - direct: the HTTP overhead over a direct engine call (goal <= 5 ms). p50 - floor: what is left",
        "after Serve's own ingress -> replica floor of the same ingress and variant (the constant deployment,",
        "GET or POST alike), i.e. what the app adds on top of Serve (for completions: on top of floor + direct).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.bench_http", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="measured requests per path (after 10 warm-up)")
    p.add_argument("--max-tokens", type=int, default=1, help="max_tokens of every request (ignore_eos)")
    p.add_argument("--preset", default="tiny", help="model preset (random weights)")
    p.add_argument(
        "--proxy-grpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"proxy -> replica over gRPC ({PROXY_GRPC_ENV}=1, as `retort up` sets) or Ray actor calls",
    )
    p.add_argument(
        "--replica-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also measure every path with this env var on all replicas (repeatable), same run",
    )
    p.add_argument(
        "--ingress",
        default="proxy",
        metavar="LIST",
        help=f"comma-separated, one Ray head each, measured in the same run: {', '.join(INGRESSES)}",
    )
    args = p.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1:
        p.error("--requests and --max-tokens must be >= 1")
    ingresses = tuple(dict.fromkeys(x.strip() for x in args.ingress.split(",")))
    unknown = [x for x in ingresses if x not in INGRESSES]
    if unknown:
        p.error(f"--ingress takes {', '.join(INGRESSES)} (comma-separated), got {unknown[0]!r}")
    bad = [kv for kv in args.replica_env if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        p.error(f"--replica-env takes KEY=VALUE, got {bad[0]!r}")
    variants = {"app": {}}
    if args.replica_env:
        variants["replica env"] = dict(kv.split("=", 1) for kv in args.replica_env)
    print(
        format_table(
            measure_http_overhead(
                args.requests,
                args.preset,
                args.max_tokens,
                proxy_grpc=args.proxy_grpc,
                variants=variants,
                ingresses=ingresses,
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
