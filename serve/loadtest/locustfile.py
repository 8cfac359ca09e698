"""locust users for the OpenAI-compatible endpoint: completions and chat, streamed.

Run headless through ``retort loadtest -c configs/loadtest/<preset>.yaml``, or with the web UI::

    RETORT_LOADTEST_CONFIG=configs/loadtest/tiny.yaml locust -f serve/loadtest/locustfile.py

Configuration comes from the environment: ``RETORT_LOADTEST_CONFIG`` (a LoadTestConfig YAML, or
the resolved JSON the runner writes; default: the schema's defaults), ``RETORT_LOADTEST_SET``
(space-separated ``key.sub=value`` overrides), ``--host`` (overrides ``target.base_url``) and
``RETORT_LOADTEST_SAMPLES`` (a JSONL file receiving one exact record per request, which the
summary is computed from: locust rounds its own stats to whole milliseconds).

Besides the request itself (``POST /v1/completions``), every streamed request fires extra
locust events so stats, CSV and the web UI show them: ``TTFT``, ``TPOT``, ``ITL`` (one per gap),
``E2E`` (milliseconds) and ``TOKENS`` (response_length = output tokens). The load shape
(steady / ramp / spike / stages) is a ``LoadTestShape``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from locust import FastHttpUser, LoadTestShape, between, events, task  # noqa: E402

from serve.loadtest.shapes import stages, users_at  # noqa: E402
from serve.loadtest.sse import StreamResult, consume  # noqa: E402
from serve.loadtest.workloads import Workload  # noqa: E402

ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def load_settings() -> dict:
    """The resolved LoadTestConfig as a dict (JSON file from the runner, or YAML + overrides)."""
    path = os.environ.get("RETORT_LOADTEST_CONFIG")
    overrides = os.environ.get("RETORT_LOADTEST_SET", "").split()
    if path and path.endswith(".json") and not overrides:
        return json.loads(Path(path).read_text())
    from cluster.config.base import load_config
    from cluster.config.loadtest import LoadTestConfig

    return load_config(path, LoadTestConfig, overrides).model_dump(mode="json")


SETTINGS = load_settings()
_MODEL: dict[str, str] = {}
_SAMPLES = None


def served_model(base_url: str, headers: dict[str, str]) -> str:
    """``target.model`` or the first id of ``GET /v1/models`` (asked once per process)."""
    if SETTINGS["target"]["model"]:
        return SETTINGS["target"]["model"]
    if base_url not in _MODEL:
        req = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=headers)
        with urllib.request.urlopen(req, timeout=SETTINGS["target"]["connect_timeout_s"]) as r:
            _MODEL[base_url] = json.loads(r.read())["data"][0]["id"]
    return _MODEL[base_url]


def record(sample: dict) -> None:
    global _SAMPLES
    path = os.environ.get("RETORT_LOADTEST_SAMPLES")
    if not path:
        return
    if _SAMPLES is None:
        _SAMPLES = open(path, "a", buffering=1)  # noqa: SIM115 - closed at quit
    _SAMPLES.write(json.dumps(sample) + "\n")


@events.quitting.add_listener
def _close_samples(**_kw) -> None:
    if _SAMPLES is not None:
        _SAMPLES.close()


class OpenAIUser(FastHttpUser):
    """One client: sends the workload's next request, streamed, and reports its timings."""

    host = SETTINGS["target"]["base_url"]
    wait_time = between(*SETTINGS["workload"]["wait_s"])
    network_timeout = SETTINGS["target"]["request_timeout_s"]
    connection_timeout = SETTINGS["target"]["connect_timeout_s"]
    _count = 0

    def on_start(self) -> None:
        key = SETTINGS["target"]["api_key"] or os.environ.get("RETORT_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        OpenAIUser._count += 1
        model = served_model(self.host, self.headers)
        self.workload = Workload(SETTINGS["workload"], model, OpenAIUser._count)

    @task
    def generate(self) -> None:
        kind, body = self.workload.next()
        route = ROUTES[kind]
        t_wall, t0 = time.time(), time.perf_counter()
        with self.client.post(
            route, json=body, headers=self.headers, stream=body["stream"], catch_response=True, name=route
        ) as resp:
            if resp.status_code != 200:
                res = StreamResult(error=f"HTTP {resp.status_code}: {(resp.text or '')[:160]}")
            elif body["stream"]:
                res = consume(lambda: resp._response.readline(b"\n"), t0)
            else:
                res = self._unary(resp, t0)
            if res.ok:
                resp.success()
            else:
                resp.failure(res.error)
        record({"t": t_wall, "kind": kind, **res.to_dict()})
        if res.ok:
            self._fire(route, res)

    @staticmethod
    def _unary(resp, t0: float) -> StreamResult:
        try:
            usage = resp.json().get("usage") or {}
        except ValueError:
            return StreamResult(error="response is not JSON")
        e2e = time.perf_counter() - t0
        return StreamResult(ok=True, e2e_s=e2e, output_tokens=int(usage.get("completion_tokens") or 0))

    def _fire(self, route: str, res: StreamResult) -> None:
        def fire(rtype: str, seconds: float, length: int = 0) -> None:
            self.environment.events.request.fire(
                request_type=rtype,
                name=route,
                response_time=seconds * 1000.0,
                response_length=length,
                exception=None,
                context={},
            )

        if res.ttft_s is not None:
            fire("TTFT", res.ttft_s)
        if res.tpot_s is not None:
            fire("TPOT", res.tpot_s)
        for gap in res.itl_s:
            fire("ITL", gap)
        fire("E2E", res.e2e_s or 0.0, res.output_tokens)


class ConfiguredShape(LoadTestShape):
    """Users over time from ``shape`` (steady, ramp, spike or explicit stages)."""

    plan = stages(SETTINGS["shape"])

    def tick(self) -> tuple[int, float] | None:
        return users_at(self.plan, self.get_run_time())
