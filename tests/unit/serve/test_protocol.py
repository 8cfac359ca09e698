"""Request validation, error bodies, detokenization/stop strings, auth and app args (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config.base import load_config
from cluster.config.serve import ServeConfig
from cluster.errors import ConfigError
from serve.auth import APIKeys
from serve.autoscale import autoscaling_config, ingress_options, model_server_options
from serve.detokenizer import IncrementalDetokenizer, StopChecker
from serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_logprobs,
    parse_json,
    validate_request,
)

REPO = Path(__file__).resolve().parents[3]


def _err(cls, data) -> APIError:
    with pytest.raises(APIError) as e:
        validate_request(cls, data)
    assert e.value.status == 400
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return e.value


def test_valid_completion_defaults():
    r = validate_request(CompletionRequest, {"model": "m", "prompt": "hi"})
    assert r.max_tokens is None and r.temperature == 1.0 and r.n == 1 and r.stop is None
    assert r.single_prompt() == "hi"
    assert validate_request(CompletionRequest, {"model": "m", "prompt": [1, 2]}).single_prompt() == [1, 2]
    assert validate_request(CompletionRequest, {"model": "m", "prompt": ["x"]}).single_prompt() == "x"
    assert validate_request(CompletionRequest, {"model": "m", "prompt": "a", "stop": "x"}).stop == ["x"]


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),  # strict: no string coercion
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"prompt": None}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"model": ""}, "model"),
        ({"stream_options": {"include_usage": True}}, None),  # only with stream
        ({"echo": True}, None),
        ({"presence_penalty": 0.5}, None),
    ],
)
def test_bad_completion_fields(patch, param):
    err = _err(CompletionRequest, {"model": "m", "prompt": "hi", **patch})
    if param is not None:
        assert err.param is not None and err.param.startswith(param)


def test_missing_fields_and_non_objects():
    assert "model" in _err(CompletionRequest, {"prompt": "x"}).message
    for data in ([], "x", 3, None):
        with pytest.raises(APIError) as e:
            validate_request(CompletionRequest, data)
        assert e.value.status == 400


def test_batch_prompts_rejected():
    r = validate_request(CompletionRequest, {"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(APIError, match="one prompt"):
        r.single_prompt()
    with pytest.raises(APIError, match="empty"):
        validate_request(CompletionRequest, {"model": "m", "prompt": []}).single_prompt()


def test_chat_request():
    r = validate_request(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_completion_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert r.messages[1].text() == "hi there" and r.requested_max_tokens() == 4 and r.num_logprobs() == 2
    assert (
        validate_request(
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        ).num_logprobs()
        == 0
    )
    _err(ChatCompletionRequest, {"model": "m", "messages": []})
    _err(ChatCompletionRequest, {"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    _err(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user"}]})
    _err(
        ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    )
    _err(
        ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    )


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b'{"a": NaN}', b'{"a": Infinity}', b"", b"[" * 100000])
def test_parse_json_rejects_garbage(raw):
    with pytest.raises(APIError) as e:
        parse_json(raw)
    assert e.value.status == 400 and e.value.code == "invalid_json"


def test_parse_json_unicode():
    assert parse_json(json.dumps({"p": "東京 🙂"}).encode()) == {"p": "東京 🙂"}


def test_logprob_layout_is_json_safe():
    lp = completion_logprobs(
        ["a", "bc"], [-0.5, float("-inf")], [[("a", -0.5), ("a", -0.7)], [("bc", float("-inf"))]], 0
    )
    assert lp["text_offset"] == [0, 1] and lp["token_logprobs"][1] == -9999.0
    assert lp["top_logprobs"][0] == {"a": -0.5}  # same text: the best one is kept
    json.dumps(lp, allow_nan=False)


# --- detokenization and stop strings ---------------------------------------------------------


class ByteTok:
    """Each id is one UTF-8 byte (ids >= 256 are a 'special' token): the worst case for
    piecewise decoding, since multi-byte characters span ids."""

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _stream(text: str, stops=None, chunk=1, prompt=b"> "):
    tok = ByteTok()
    detok = IncrementalDetokenizer(tok, list(prompt), skip_ids={300})
    stop = StopChecker(stops)
    ids = list(text.encode()) + [300]
    out = ""
    for i in range(0, len(ids), chunk):
        out += stop.feed(detok.push(ids[i : i + chunk]))
        if stop.stopped:
            return out, True
    out += stop.feed(detok.flush()) + stop.finish()
    return out, stop.stopped


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_incremental_detokenizer_multibyte(chunk):
    text = "naïve café — 東京 🙂 end"
    out, stopped = _stream(text, chunk=chunk)
    assert out == text and not stopped


@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_strings_cut_and_never_leak(chunk):
    out, stopped = _stream("hello world. STOP and more", stops=["STOP"], chunk=chunk)
    assert stopped and out == "hello world. "
    out, stopped = _stream("abc東京def", stops=["京d", "zzz"], chunk=chunk)
    assert stopped and out == "abc東"
    out, stopped = _stream("no stop here", stops=["xyz"], chunk=chunk)
    assert not stopped and out == "no stop here"


def test_stop_checker_holds_back_partial_match():
    s = StopChecker(["END"])
    assert s.feed("abcE") == "ab"  # the last len("END") - 1 = 2 characters are held back
    assert s.feed("N") == "c"
    assert s.feed("D tail") == ""  # "EN" was never sent
    assert s.stopped and s.text == "abc" and s.finish() == ""


# --- auth ------------------------------------------------------------------------------------


def test_api_keys():
    from cluster.config.serve import AuthConfig

    off = APIKeys.from_config(AuthConfig(), environ={})
    assert not off.enabled and off.check(None)
    keys = APIKeys.from_config(AuthConfig(api_keys=["k1"]), environ={"RETORT_API_KEYS": "k2, k3 ,"})
    assert keys.enabled
    for good in ("Bearer k1", "bearer k2", "Bearer k3"):
        assert keys.check(good)
    for bad in (None, "", "Bearer", "Bearer ", "Basic k1", "Bearer k4", "k1", "Bearer k1x", "Bearer \udcff"):
        assert not keys.check(bad)


# --- config and app args -----------------------------------------------------------------------


def test_shipped_serve_configs_validate():
    for name in ("tiny", "small", "base"):
        cfg = load_config(REPO / f"configs/serve/{name}.yaml", ServeConfig)
        opts = model_server_options(cfg)
        assert opts["max_ongoing_requests"] == cfg.limits.max_ongoing_requests
        assert ingress_options(cfg)["max_ongoing_requests"] >= cfg.limits.max_ongoing_requests


def test_serve_config_defaults_and_errors():
    cfg = ServeConfig()
    assert cfg.http.host == "127.0.0.1" and cfg.http.port == 8000
    assert cfg.model.public_name == "student" and cfg.model.registry_name == "student"
    assert ServeConfig.model_validate({"model": {"ref": "m:3", "served_name": "x"}}).model.public_name == "x"
    assert autoscaling_config(cfg) is None and model_server_options(cfg)["num_replicas"] == 1
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"limits": {"bogus": 1}})
    auto = autoscaling_config(
        ServeConfig.model_validate({"autoscaling": {"max_replicas": 3, "upscale_delay_s": 1}})
    )
    assert auto["max_replicas"] == 3 and auto["upscale_delay_s"] == 1


def test_build_app_args_merge():
    from serve.app import load_serve_config

    cfg = load_serve_config(
        {
            "config": str(REPO / "configs/serve/tiny.yaml"),
            "model.ref": "student:3",
            "limits.max_queued_requests": "7",
            "autoscaling": {"max_replicas": 1},
        }
    )
    assert cfg.model.ref == "student:3" and cfg.limits.max_queued_requests == 7
    assert cfg.autoscaling.max_replicas == 1 and cfg.engine.block_size == 16
    inline = load_serve_config({"serve_config": cfg.model_dump(mode="json")})
    assert inline == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        load_serve_config({"nonsense": "1"})
    with pytest.raises(ConfigError):
        load_serve_config({"config": "/nonexistent.yaml"})


def test_deploy_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from cluster.commands.serve import IMPORT_PATH, deploy_config
    from serve.app import load_serve_config

    cfg = load_config(
        REPO / "configs/serve/tiny.yaml", ServeConfig, ["model.ref=student:2", "http.port=8123"]
    )
    body = deploy_config(cfg, others=[{"name": "other", "route_prefix": "/o", "import_path": "x:y"}])
    schema = (
        ServeDeploySchema.model_validate(body)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(body)
    )
    assert schema.http_options.port == 8123 and [a.name for a in schema.applications] == ["other", "retort"]
    ours = body["applications"][-1]
    assert ours["import_path"] == IMPORT_PATH == "serve.app:build_app"
    assert load_serve_config(ours["args"]) == cfg  # what build_app will see


def test_cli_serve_help_is_light():
    import subprocess
    import sys

    code = (
        "import sys, cluster.cli as c; p = c.build_parser(); "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", "deploy", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--print-config" in out
