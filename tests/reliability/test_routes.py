"""No route steers by accident (issue 20, item 1): every route that builds a generation
request either steers (same validation, headers and metrics) or refuses a ``steering``
field with a 400 and a ``code``. On the session's real SmolLM2 server, over plain HTTP.

Routes of vLLM 0.32 that generate: /v1/chat/completions, /v1/completions, /v1/responses,
/v1/chat/completions/batch, /v1/messages (Anthropic, converted to a chat request),
/cohere/v2/chat (converted likewise), /invocations (SageMaker, dispatched to chat or
completions), /inference/v1/generate (token in, token out: builds its own SamplingParams),
/v1/systemone and /generative_scoring (their own SamplingParams). tokenize/detokenize and
the pooling routes do not generate.
"""

from __future__ import annotations

import json

import httpx
import pytest

from served import MODEL

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2]

STEER = {"vectors": [{"name": "happy", "strength": 4.0}]}
BAD = {"vectors": [{"name": "../../etc/passwd"}]}
MESSAGES = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}


@pytest.fixture(scope="module")
def url(smollm2_server):
    return smollm2_server.url


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=300)


def test_anthropic_messages_steer_with_headers_and_refuse_bad_steering(url):
    plain = _post(url, "/v1/messages", {**MESSAGES, "temperature": 0})
    steered = _post(url, "/v1/messages", {**MESSAGES, "temperature": 0, "steering": STEER})
    assert plain.status_code == steered.status_code == 200, steered.text
    assert "x-vsteer-fingerprint" not in plain.headers
    described = json.loads(steered.headers["x-vsteer-steering"])
    assert described["fingerprint"] == steered.headers["x-vsteer-fingerprint"]
    assert steered.json()["steering"] == described
    assert steered.json()["content"] != plain.json()["content"]
    bad = _post(url, "/v1/messages", {**MESSAGES, "steering": BAD})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_name", bad.text
    by_name = _post(url, "/v1/messages", {**MESSAGES, "temperature": 0, "model": "cheerful"})
    assert by_name.status_code == 200 and json.loads(by_name.headers["x-vsteer-steering"])["model"] == "cheerful"
    assert by_name.headers["x-vsteer-fingerprint"] == steered.headers["x-vsteer-fingerprint"]


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"model": MODEL, "prompt": "hi"}),
    ("/detokenize", {"model": MODEL, "tokens": [1, 2]}),
    ("/inference/v1/generate", {"model": MODEL, "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}}),
    ("/v1/embeddings", {"model": MODEL, "input": "hi"}),
    ("/v1/messages/count_tokens", MESSAGES),
    ("/v1/chat/completions/render", {"model": MODEL, "messages": MESSAGES["messages"]}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_other_routes_refuse_steering_and_steered_models(url, path, body):
    for extra in ({"steering": STEER}, {"vllm_xargs": {"steering": STEER}}, {"model": "cheerful"}):
        r = _post(url, path, {**body, **extra})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_route", (path, extra, r.text)
    assert _post(url, path, {**body, "steering": None}).status_code != 400 or path == "/v1/embeddings"


def test_the_token_route_never_generates_with_steering(url):
    """/inference/v1/generate passes its own SamplingParams (extra_args included) to the
    engine. vLLM 0.32 serves it only with --enable-scale-out (403 otherwise); either way a
    steering spec inside sampling_params is never applied silently (the engine-side refusal
    is tests/test_serving_faults.py::test_unsealed_steering_is_refused_in_an_api_server)."""
    body = {"model": MODEL, "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2,
                                                                       "extra_args": {"steering": STEER}}}
    r = _post(url, "/inference/v1/generate", body)
    assert r.status_code in (400, 403), r.text
    assert "x-vsteer-fingerprint" not in r.headers


def test_batch_chat_steers_every_conversation(url):
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "steering": STEER,
            "messages": [[{"role": "user", "content": "Hi."}], [{"role": "user", "content": "Bye."}]]}
    r = _post(url, "/v1/chat/completions/batch", body)
    if r.status_code == 404:
        pytest.fail("vLLM 0.32 serves /v1/chat/completions/batch: the route should exist")
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["x-vsteer-steering"])["vectors"][0]["name"] == "happy"
