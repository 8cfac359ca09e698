"""The Serve app over real HTTP on the session Ray cluster: the openai client, streaming, stop
strings, logprobs, every bad input's status code, auth on every route, timeouts, backpressure,
client disconnect, metrics. One Serve instance for the module, four apps: for each topology
(``split``: ingress -> model server through a handle; ``collocated``: the model server serves HTTP)
a main one with auth and a "strict" one with a tiny timeout and queue. Most tests run on both."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serve_support import ServeInstance, model_server_stats, publish_tiny, serve_args

pytestmark = pytest.mark.integration

KEY = "sk-test-6f1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
# tiny-model steps take ~0.5-2 ms: 240 tokens outlast the strict apps' 0.1 s timeout
LONG = {"max_tokens": 240, "ignore_eos": True, "temperature": 0}
# the apps' model has a 2,048-token context: a disconnected request of 2,000 tokens runs for seconds,
# so its abort is observed even when the machine is busy (240 tokens could finish before it)
CONTEXT = 2048
DISCONNECT = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}
TOPOLOGIES = ("split", "collocated")


@dataclass
class App:
    url: str  # the main app (auth) of the topology under test
    strict_url: str
    name: str  # its Serve application name
    topology: str
    tokenizer_dir: Path
    metrics_port: int


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_app")
    registry = tmp / "registry"
    publish_tiny(registry, tmp, max_seq_len=CONTEXT)
    inst = ServeInstance(ray_cluster)
    try:
        out = {}
        for topo, name, prefix in (("split", "retort", ""), ("collocated", "colo", "/colo")):
            url = inst.deploy(
                serve_args(
                    registry,
                    **{
                        "app_name": name,
                        "route_prefix": prefix or "/",
                        "topology": topo,
                        "auth.api_keys": [KEY],
                        "autoscaling.max_replicas": 1,
                    },
                )
            )
            strict = inst.deploy(
                serve_args(
                    registry,
                    **{
                        "app_name": f"{name}-strict",
                        "route_prefix": f"{prefix}/strict",
                        "topology": topo,
                        "limits.request_timeout_s": 0.1,
                        "limits.max_ongoing_requests": 1,
                        "limits.max_queued_requests": 1,
                        "autoscaling.max_replicas": 1,
                        "replica.num_cpus": 0.25,
                    },
                )
            )
            out[topo] = App(url, strict, name, topo, tmp / "student-0", ray_cluster.metrics_export_port)
        yield out
    finally:
        inst.close()


@pytest.fixture(scope="module", params=TOPOLOGIES)
def app(apps, request):
    return apps[request.param]


@pytest.fixture(scope="module")
def client(app):
    import openai

    return openai.OpenAI(base_url=app.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url: str, body, headers=None, **kw) -> httpx.Response:
    headers = {**AUTH, **(headers or {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(
            url, content=body, headers={"content-type": "application/json", **headers}, timeout=60, **kw
        )
    return httpx.post(url, json=body, headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# --- the openai client ----------------------------------------------------------------------------


def test_completion_with_openai_client(client, app):
    from cluster.tokenizer import load_tokenizer

    c = client.completions.create(
        model="student", prompt="Hello world", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert c.object == "text_completion" and len(c.choices) == 1
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 6
    assert c.usage.prompt_tokens == len(load_tokenizer(app.tokenizer_dir).encode("Hello world"))
    assert c.usage.total_tokens == c.usage.prompt_tokens + 6
    again = client.completions.create(
        model="student", prompt="Hello world", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == c.choices[0].text  # greedy is deterministic


def test_chat_with_openai_client(client):
    c = client.chat.completions.create(
        model="student",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert isinstance(c.choices[0].message.content, str)
    assert c.usage.completion_tokens == 5 and c.usage.prompt_tokens > 5


def test_streaming_matches_non_streaming(client):
    kw = dict(
        model="student",
        prompt="def add(a, b):",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_chat_streaming(client):
    kw = dict(
        model="student",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_wire_format_ends_with_done(app):
    with httpx.stream(
        "POST",
        app.url + "/v1/completions",
        headers=AUTH,
        timeout=60,
        json={"model": "student", "prompt": "x", "max_tokens": 3, "stream": True, "ignore_eos": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_string_cuts_output(client):
    kw = dict(
        model="student",
        prompt="The quick brown",
        temperature=0,
        max_tokens=24,
        extra_body={"ignore_eos": True},
    )
    text = client.completions.create(**kw).choices[0].text
    assert len(text) >= 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.find(stop)]
    got = client.completions.create(stop=[stop], **kw).choices[0]
    assert got.text == expected and got.finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == expected


def test_logprobs(client):
    c = client.completions.create(
        model="student",
        prompt="abc",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    # greedy: the sampled token is the most likely one (byte-level tokens may share a display string,
    # so the legacy dict can hold fewer entries; the chat list below has no such collisions)
    assert all(x >= max(t.values()) - 1e-4 for x, t in zip(lp.token_logprobs, lp.top_logprobs, strict=True))
    chat = client.chat.completions.create(
        model="student",
        messages=[{"role": "user", "content": "a"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(abs(c.logprob - max(t.logprob for t in c.top_logprobs)) < 1e-4 for c in content)


def test_models_health_and_request_id(app):
    models = httpx.get(app.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["student"] and models["data"][0]["root"] == "student:1"
    assert httpx.get(app.url + "/health").json() == {"status": "ok"}
    r = post(
        app.url + "/v1/completions",
        {"model": "student", "prompt": "x", "max_tokens": 1},
        headers={"X-Request-ID": "my-req-42"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req-42"
    r = post(app.url + "/v1/completions", {"model": "student", "prompt": "x", "max_tokens": 1})
    assert r.headers.get("x-request-id")


# --- auth ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/nope"),
        ("GET", "/v1/completions"),
    ],
)
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", "Basic " + KEY, KEY, "Bearer", "Bearer  " + KEY + "x"]
)
def test_every_route_but_health_needs_the_key(app, method, path, auth):
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.request(method, app.url + path, headers=headers, json={"model": "student", "prompt": "x"})
    err = assert_error(r, 401)
    assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


def test_health_is_open_and_key_unlocks(app):
    assert httpx.get(app.url + "/health").status_code == 200
    assert httpx.get(app.url + "/v1/models", headers=AUTH).status_code == 200
    assert_error(httpx.get(app.url + "/nope", headers=AUTH), 404)
    assert_error(httpx.get(app.url + "/v1/completions", headers=AUTH), 405)


# --- bad input: status codes, never a 500, and the app keeps serving -------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "student", "prompt": "hello", "max_tokens": 2}
MSG = [{"role": "user", "content": "hi"}]

BAD = [
    ("invalid json", C, b"{not json", 400),
    ("truncated json", C, b'{"model": "student", "prompt": ', 400),
    ("json array", C, b"[1, 2, 3]", 400),
    ("json string", C, b'"hello"', 400),
    ("NaN literal", C, b'{"model": "student", "prompt": "x", "temperature": NaN}', 400),
    ("invalid utf-8", C, b'{"model": "student", "prompt": "\xff\xfe"}', 400),
    ("deep nesting", C, b"[" * 50000, 400),
    ("missing prompt", C, {"model": "student"}, 400),
    ("missing model", C, {"prompt": "x"}, 400),
    ("wrong type prompt", C, {**OK, "prompt": 12}, 400),
    ("wrong type max_tokens", C, {**OK, "max_tokens": "ten"}, 400),
    ("float max_tokens", C, {**OK, "max_tokens": 2.5}, 400),
    ("huge max_tokens", C, {**OK, "max_tokens": 10**30}, 400),
    ("max_tokens over context", C, {**OK, "max_tokens": 100000}, 400),
    ("max_tokens zero", C, {**OK, "max_tokens": 0}, 400),
    ("negative max_tokens", C, {**OK, "max_tokens": -1}, 400),
    ("temperature too high", C, {**OK, "temperature": 9}, 400),
    ("top_p zero", C, {**OK, "top_p": 0}, 400),
    ("n=2", C, {**OK, "n": 2}, 400),
    ("n=0", C, {**OK, "n": 0}, 400),
    ("logprobs 6", C, {**OK, "logprobs": 6}, 400),
    ("too many stops", C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("empty stop", C, {**OK, "stop": [""]}, 400),
    ("huge seed", C, {**OK, "seed": 2**80}, 400),
    ("unknown field", C, {**OK, "frobnicate": True}, 400),
    ("empty prompt", C, {**OK, "prompt": ""}, 400),
    ("empty token list", C, {**OK, "prompt": []}, 400),
    ("negative token id", C, {**OK, "prompt": [1, -3]}, 400),
    ("out-of-vocab token id", C, {**OK, "prompt": [1, 512]}, 400),
    ("huge token id", C, {**OK, "prompt": [10**30]}, 400),
    ("prompt over context", C, {**OK, "prompt": [7] * (CONTEXT + 50)}, 400),
    ("batch of prompts", C, {**OK, "prompt": ["a", "b"]}, 400),
    ("stop token out of vocab", C, {**OK, "stop_token_ids": [99999]}, 400),
    ("unknown model", C, {**OK, "model": "gpt-4"}, 404),
    ("chat no messages", CHAT, {"model": "student", "messages": []}, 400),
    ("chat bad role", CHAT, {"model": "student", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("chat content type", CHAT, {"model": "student", "messages": [{"role": "user", "content": 5}]}, 400),
    ("chat unknown model", CHAT, {"model": "nope", "messages": MSG}, 404),
    ("chat over context", CHAT, {"model": "student", "messages": MSG, "max_tokens": 10**6}, 400),
    ("chat tools", CHAT, {"model": "student", "messages": MSG, "tools": []}, 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_status(app, name, path, body, status):
    err = assert_error(post(app.url + path, body), status)
    if status == 400:
        assert err["type"] == "invalid_request_error"


def test_unicode_prompts_are_fine(client):
    for prompt in ("東京 🙂 naïve", "\u0000\u200b\ufeff", "ℌ" * 50):
        c = client.completions.create(model="student", prompt=prompt, max_tokens=2)
        assert c.usage.completion_tokens <= 2


def test_body_too_large(app):
    big = json.dumps({**OK, "prompt": "x" * 300_000}).encode()  # tiny.yaml: max_body_bytes 262144
    assert_error(post(app.url + C, big), 413)

    def chunked():  # no Content-Length: the size is checked while reading
        for _ in range(40):
            yield b" " * 10_000
        yield json.dumps(OK).encode()

    r = httpx.post(
        app.url + C, content=chunked(), headers={**AUTH, "content-type": "application/json"}, timeout=60
    )
    assert_error(r, 413)
    assert_error(post(app.url + C, b"{}", headers={"content-type": "text/plain"}), 415)


def test_app_keeps_serving_after_garbage(app, client):
    for _, path, body, _ in BAD[:8]:  # the raw-bytes garbage once more, back to back
        post(app.url + path, body)
    assert httpx.get(app.url + "/health").status_code == 200
    assert (
        client.completions.create(
            model="student", prompt="still alive?", max_tokens=3
        ).usage.completion_tokens
        <= 3
    )
    assert model_server_stats(app.name)["healthy"]


# --- limits: timeout, backpressure, disconnect -------------------------------------------------------


def test_timeout_is_408(app):
    err = assert_error(post(app.strict_url + C, {**OK, **LONG}), 408)
    assert err["code"] == "timeout"


def test_backpressure_is_503_with_retry_after(app):
    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[c.post(app.strict_url + C, json={**OK, **LONG}) for _ in range(8)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {408, 503}, codes
    overloaded = [r for r in responses if r.status_code == 503]
    assert overloaded, codes
    assert all(r.headers.get("retry-after") for r in overloaded)
    assert all(
        r.json()["error"]["code"] == "overloaded" for r in overloaded
    )  # OpenAI-style body, not Serve's text
    # recovers (a 1-token request fits the 0.1 s timeout; a loaded machine may need another try)
    assert any(post(app.strict_url + C, {**OK, "max_tokens": 1}).status_code == 200 for _ in range(5))


def _wait_aborted(name: str, before: int) -> dict:
    deadline = time.monotonic() + 20
    stats = model_server_stats(name)
    while time.monotonic() < deadline and not (stats["num_aborted"] > before and stats["num_running"] == 0):
        time.sleep(0.2)
        stats = model_server_stats(name)
    return stats


def test_client_disconnect_aborts_generation(app):
    before = model_server_stats(app.name)["num_aborted"]
    with httpx.stream(
        "POST",
        app.url + C,
        headers=AUTH,
        timeout=60,
        json={**OK, **DISCONNECT, "prompt": "a long one", "stream": True},
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        next(lines)
    # the connection is closed: Serve cancels the ingress call, which cancels the model-server call
    stats = _wait_aborted(app.name, before)
    assert stats["num_aborted"] > before and stats["num_running"] == 0, stats


def test_client_disconnect_aborts_a_non_streamed_generation(app):
    """The non-streamed path is one unary call (split) or an in-process call (collocated): a client
    that goes away still cancels it and frees the engine request."""
    before = model_server_stats(app.name)["num_aborted"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(
            app.url + C,
            headers=AUTH,
            json={**OK, **DISCONNECT, "prompt": "another long one"},
            timeout=httpx.Timeout(60, read=0.05),
        )
    stats = _wait_aborted(app.name, before)
    assert stats["num_aborted"] > before and stats["num_running"] == 0, stats


def test_metrics_are_exported(app, client):
    """Every serving metric reaches Ray's Prometheus endpoint with our names and tags. (Values are
    exported periodically, so only presence is asserted, not counts.)"""
    from cluster import metrics as M

    client.completions.create(model="student", prompt="metrics", max_tokens=3)
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    wanted = [
        M.exported(M.TTFT, "_bucket"),
        M.exported(M.E2E, "_count"),
        M.exported(M.PROMPT_TOKENS),
        M.exported(M.GENERATION_TOKENS),
        M.exported(M.RESPONSES),
        M.exported(M.KV_USAGE),
        M.exported(M.RUNNING),
        M.exported(M.DEPLOYED_VERSION),
    ]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(1)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    # other apps of the session's cluster export the same metric under their own model names
    responses = [
        line
        for line in text.splitlines()
        if line.startswith(M.exported(M.RESPONSES)) and 'model="student"' in line
    ]
    assert responses and all("status=" in line and "route=" in line for line in responses)
    version = [line for line in text.splitlines() if line.startswith(M.exported(M.DEPLOYED_VERSION))]
    assert any('ref="student:1"' in line and line.endswith(" 1.0") for line in version), version
