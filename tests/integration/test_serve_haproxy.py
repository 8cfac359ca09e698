"""The Serve app behind Ray 2.60's HAProxy ingress (``retort up serve.ingress=haproxy``): a Ray head
of its own started by ``cluster.ray_head.start_head(ingress="haproxy")``, both topologies, real HTTP
with the ``openai`` client. HAProxy (not Serve's proxy actor) answers Serve's port and forwards to
the ingress replicas' own HTTP servers; the app must behave as behind the proxy: OpenAI responses and
SSE, OpenAI-style 4xx bodies, client disconnect cancelling the generation.

The whole Serve suite runs on such a head too: ``RETORT_SERVE_INGRESS=haproxy pytest tests/integration``
(the session ``ray_cluster`` is then an HAProxy head)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from serve_support import ServeInstance, model_server_stats, publish_tiny, serve_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "sk-haproxy-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": "student", "prompt": "def add(a, b):", "max_tokens": 4}
C = "/v1/completions"
DISCONNECT = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}  # runs for seconds: its abort is seen


@pytest.fixture(scope="module")
def head():
    """A Ray head with the HAProxy ingress, in a ``/tmp/rt-*`` dir that the session fixture's orphan
    reaper knows (``owner.json``); this process is its client while the module runs."""
    import os

    from cluster.ray_head import client_env, free_ray_ports, start_head, stop_head

    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    (temp_dir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "pgid": 0}))
    h = start_head(
        temp_dir,
        temp_dir / "auth_token",
        free_ray_ports(),
        num_cpus=4,
        object_store_memory=300 * 1024**2,
        log=temp_dir / "ray-start.log",
        ingress="haproxy",
    )
    (temp_dir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "pgid": h.pgid}))
    try:
        with client_env(h.env()):
            yield h
    finally:
        stop_head(h)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def apps(head, tmp_path_factory):
    """Topology -> (base URL, Serve app name), both behind one HAProxy."""
    tmp = tmp_path_factory.mktemp("serve_haproxy")
    registry = tmp / "registry"
    publish_tiny(registry, tmp, max_seq_len=2048)
    inst = ServeInstance(head)
    try:
        out = {}
        for topo, name, prefix in (("split", "hsplit", "/hsplit"), ("collocated", "hcolo", "/hcolo")):
            url = inst.deploy(
                serve_args(
                    registry,
                    **{
                        "app_name": name,
                        "route_prefix": prefix,
                        "topology": topo,
                        "auth.api_keys": [KEY],
                        "autoscaling.max_replicas": 1,
                    },
                )
            )
            out[topo] = (url, name)
        out["port"] = inst.port
        yield out
    finally:
        inst.close()  # also asserts that nothing listens on Serve's port afterwards (HAProxy stopped)


@pytest.fixture(params=("split", "collocated"))
def app(apps, request):
    return apps[request.param]


def test_haproxy_answers_serves_port(head, apps):
    """Serve's HTTP port is HAProxy's, with one backend server per ingress replica (its own port):
    without the ingress env the proxy actor (a Ray worker) would listen there."""
    import psutil

    port = apps["port"]
    listeners = [
        c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port
    ]
    assert listeners, f"nothing listens on {port}"
    assert {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}
    cfgs = list((Path(head.temp_dir) / "h").rglob("haproxy.cfg"))
    assert cfgs, "no HAProxy config under the head's own dir"
    text = cfgs[0].read_text()
    assert f":{port}" in text and "/hcolo" in text and "/hsplit" in text
    assert text.count("    server ") >= 2  # an ingress replica of each app


def test_openai_client_completion_chat_and_stream(app):
    import openai

    url, _ = app
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    kw = dict(
        model="student", prompt="def add(a, b):", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    out = client.completions.create(**kw)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model="student",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert (
        "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    )  # same greedy tokens
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_errors_are_openai_bodies_and_app_keeps_serving(app):
    url, _ = app
    r = httpx.post(url + C, json={**OK, "max_tokens": -1}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(url + C, json=OK, timeout=60)  # no key
    assert r.status_code == 401 and "error" in r.json(), r.text
    r = httpx.post(
        url + C, content=b"{not json", headers={**AUTH, "content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 400 and "error" in r.json(), r.text
    r = httpx.post(url + C, json=OK, headers={**AUTH, "X-Request-ID": "hap-1"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "hap-1", r.text


def test_client_disconnect_aborts_generation(app):
    """HAProxy passes the client's close on (``option abortonclose``); the replica's direct-ingress
    server sees it and cancels the request, which frees the engine's."""
    url, name = app
    before = model_server_stats(name)["num_aborted"]
    with httpx.stream(
        "POST",
        url + C,
        headers=AUTH,
        timeout=60,
        json={**OK, **DISCONNECT, "prompt": "a long one", "stream": True},
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        next(lines)
    deadline = time.monotonic() + 20
    stats = model_server_stats(name)
    while time.monotonic() < deadline and not (stats["num_aborted"] > before and stats["num_running"] == 0):
        time.sleep(0.2)
        stats = model_server_stats(name)
    assert stats["num_aborted"] > before and stats["num_running"] == 0, stats
