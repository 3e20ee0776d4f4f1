"""Steered models (issue 21): a model name that means "the served model with this
steering", like vLLM's LoRA adapters. Parsing in-process; the rest on the session's
real SmolLM2 server (tests/served.py starts it with ``--steered-model cheerful=happy:4``),
driven by the official ``openai`` client with only ``model=``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from served import ADMIN_KEY, MODEL, vector_set
from vsteer.serving.http.aliases import combine, parse_alias, parse_compact

from test_server import NEW_TOKENS, QUESTION, _tokens, server_test

CHEERFUL = {"vectors": [{"name": "happy", "strength": 4.0}]}


# -- the syntax -----------------------------------------------------------------------------------
def test_compact_syntax():
    assert parse_compact("happy:2") == {"vectors": [{"name": "happy", "strength": 2.0}]}
    assert parse_compact("happy:2+formal:-1;layers=8-10;positions=generated;unit=relative") == {
        "vectors": [{"name": "happy", "strength": 2.0, "layers": [8, 9, 10], "unit": "relative"},
                    {"name": "formal", "strength": -1.0, "layers": [8, 9, 10], "unit": "relative"}],
        "positions": "generated"}
    assert parse_compact("calm;layers=8,12;op=clamp") == {"vectors": [{"name": "calm", "layers": [8, 12],
                                                                       "op": "clamp"}]}
    json_form = parse_alias('mine={"vectors": [{"name": "happy", "strength": 3}], "positions": "prompt"}')
    assert json_form.name == "mine" and json_form.spec == {"vectors": [{"name": "happy", "strength": 3.0}],
                                                           "positions": "prompt"}
    for bad, why in (("happy:x", "not a number"), ("happy;colour=red", "unknown option"),
                     ("happy;layers=a", "layers="), ("../etc", "invalid vector name"), ("happy:1e9", "outside"),
                     ('{"vectors": []}', "at least one vector"), ("{oops", "not valid JSON")):
        with pytest.raises(ValueError, match=why):
            parse_compact(bad)
    for bad in ("no-equals-sign", "../x=happy:1", "=happy:1"):
        with pytest.raises(ValueError):
            parse_alias(bad)


def test_request_steering_adds_to_a_steered_model():
    base = {"vectors": [{"name": "happy", "strength": 4.0}]}
    assert combine(base, None) == base and combine(base, {"vectors": []}) == base
    assert combine(base, {"vectors": [{"name": "formal"}], "positions": "generated"}) == {
        "vectors": [{"name": "happy", "strength": 4.0}, {"name": "formal"}], "positions": "generated"}


# -- on the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


def _chat(client, model: str, steering=..., stream: bool = False):
    body = {"ignore_eos": True, "return_token_ids": True}
    if steering is not ...:
        body["steering"] = steering
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=NEW_TOKENS, temperature=0,
        stream=stream, extra_body=body)
    out = raw.parse()
    if not stream:
        return _tokens(out.choices[0]), raw.headers, out.model, (out.model_extra or {}).get("steering")
    ids, models = [], set()
    for chunk in out:
        models.add(chunk.model)
        if chunk.choices:
            ids += _tokens(chunk.choices[0])
    return ids, raw.headers, models, None


@server_test
def test_steered_models_are_listed_like_lora_adapters(server):
    cards = {c.id: c for c in server.client().models.list().data}
    assert MODEL in cards and "cheerful" in cards
    card = cards["cheerful"].model_extra or {}
    assert card["parent"] == MODEL and card["root"] == (cards[MODEL].model_extra or {})["root"]
    assert card["steering"] == CHEERFUL


@server_test
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_model_name_alone_steers_like_the_equivalent_extra_body(server, stream):
    client = server.client()
    plain = _chat(client, MODEL, stream=stream)
    by_name = _chat(client, "cheerful", stream=stream)
    by_body = _chat(client, MODEL, CHEERFUL, stream=stream)
    assert by_name[0] == by_body[0] != plain[0]
    described = json.loads(by_name[1]["x-vsteer-steering"])
    assert described["source"] == "alias" and described["model"] == "cheerful"
    # the same steering, so the same fingerprint: the same prefix-cache namespace and table row
    assert by_name[1]["x-vsteer-fingerprint"] == by_body[1]["x-vsteer-fingerprint"]
    assert by_name[2] == ({"cheerful"} if stream else "cheerful")  # responses name the steered model
    assert by_body[2] == ({MODEL} if stream else MODEL)
    if not stream:
        assert by_name[3] == described


@server_test
def test_a_request_adds_vectors_to_a_steered_model(server):
    client = server.client()
    extra = {"vectors": [{"name": "formal", "strength": 2.0}], "positions": "generated"}
    combined = _chat(client, "cheerful", extra)
    spelled_out = _chat(client, MODEL, {"vectors": CHEERFUL["vectors"] + extra["vectors"], "positions": "generated"})
    assert combined[0] == spelled_out[0]
    assert combined[1]["x-vsteer-fingerprint"] == spelled_out[1]["x-vsteer-fingerprint"]
    with pytest.raises(Exception) as e:  # still validated as one spec
        _chat(client, "cheerful", {"vectors": [{"name": "nope"}]})
    assert getattr(e.value, "status_code", None) == 400 and e.value.body["code"] == "unknown_vector"


@server_test
def test_run_time_steered_models_through_the_admin_api(server):
    admin = server.admin_headers()
    models = f"{server.url}/v1/steering/models"
    vectors = f"{server.url}/v1/steering/vectors"
    from vsteer.engine import VectorRegistry

    VectorRegistry(server.vectors).add("alias-src", vector_set("alias-src", {10: 11}))
    assert httpx.post(models, json={"name": "sunny", "spec": "alias-src:3"}).status_code == 401
    assert httpx.post(models, headers=admin, json={"name": "bad", "spec": "nope:1"}).json()["error"]["code"] \
        == "unknown_vector"
    assert httpx.post(models, headers=admin, json={"name": MODEL, "spec": "alias-src:3"}).status_code == 409
    made = httpx.post(models, headers=admin, json={"name": "sunny", "steering": {
        "vectors": [{"name": "alias-src", "strength": 3}]}})
    assert made.status_code == 201, made.text
    assert httpx.post(models, headers=admin, json={"name": "sunny", "spec": "alias-src:1"}).status_code == 409
    assert "sunny" in {m["name"] for m in httpx.get(models).json()["data"]}
    client = server.client()
    assert _chat(client, "sunny")[0] == _chat(client, MODEL, {"vectors": [{"name": "alias-src", "strength": 3}]})[0]
    # the vectors a steered model uses cannot be removed while it exists
    refused = httpx.delete(f"{vectors}/alias-src", headers=admin)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "used_by_steered_model"
    assert httpx.delete(f"{models}/cheerful", headers=admin).json()["error"]["code"] == "defined_by_flag"
    assert httpx.delete(f"{models}/sunny", headers=admin).status_code == 200
    assert httpx.delete(f"{models}/sunny", headers=admin).status_code == 404
    with pytest.raises(Exception) as e:  # gone: vLLM's own unknown-model answer
        _chat(client, "sunny")
    assert getattr(e.value, "status_code", None) == 404
    assert httpx.delete(f"{vectors}/alias-src", headers=admin).status_code == 200


@server_test
def test_steered_models_are_refused_where_steering_is_not_applied(server):
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": "cheerful", "prompt": "hi"})
    assert tokenized.status_code == 400 and tokenized.json()["error"]["code"] == "unsupported_route"
    with pytest.raises(Exception) as e:
        server.client().completions.create(model="cheerful", prompt="hi", max_tokens=2, n=2,
                                           extra_body={"use_beam_search": True})
    assert getattr(e.value, "status_code", None) == 400
    assert e.value.body["code"] == "unsupported_with_beam_search"
