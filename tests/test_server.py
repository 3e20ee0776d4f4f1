"""The OpenAI-compatible steering server, end to end: one real `vsteer serve` process on
SmolLM2-135M-Instruct (enforce eager) for the module, driven with the official `openai`
client and plain HTTP.

Steered results are compared with the HF reference (``SpecInjector``, greedy, the same
chat-templated prompt), which the offline vLLM tests already tie to ``vllm.LLM``. The
first tests need no server (request/CLI/metrics logic in-process).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from reference import hf_reference
from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry, encode_inline
from vsteer.engine.formats import METADATA_FILE, TENSORS_FILE

from served import ADMIN_KEY, HIDDEN, LAYERS, MODEL, UPLOAD_LIMIT, free_port as _free_port

NEW_TOKENS = 12
QUESTION = "How was your day?"


def server_test(fn):
    for mark in (pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2):
        fn = mark(fn)
    return fn


def _vector(seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def _set(behaviour: str, layers: dict[int, int], norm: float = 8.0, hidden: int = HIDDEN,
         num_layers: int = LAYERS) -> SteeringVectorSet:
    vectors = {layer: (_vector(seed, norm) if hidden == HIDDEN else torch.randn(hidden)) for layer, seed in
               layers.items()}
    return SteeringVectorSet(behaviour, vectors, model_id=MODEL, num_layers=num_layers)


# ---------------------------------------------------------------------------------------------
# in-process: request field semantics, default steering, CLI, metrics bookkeeping
# ---------------------------------------------------------------------------------------------

class _RequestPatches:
    """The request patches in this process, with a server state whose default steering
    the test sets (a tiny registry holding "formal" and "happy")."""

    def __init__(self, registry: VectorRegistry):
        from vsteer.serving.http import state

        self.state, self.registry = state, registry
        self.resolver = SteeringResolver(registry, hidden_size=8, num_layers=4)

    def set_default_steering(self, spec) -> None:
        from vsteer.serving.http.config import ServerConfig
        from vsteer.serving.http.resolution import RequestResolver
        from vsteer.serving.http.state import ServerState

        config = ServerConfig(default_steering=spec)
        st = ServerState(config, 8, 4, "m", [], [], self.registry, self.resolver)
        st.requests = RequestResolver(st)
        self.state.set_current(st)

    def sampling_params(self, beam: bool = False, **body):
        """What one HTTP request with this body gets: the middleware's one resolution, then
        vLLM's ``to_sampling_params`` (patched) on the chat request."""
        import asyncio

        from vsteer.serving import request_context

        info: dict = {}
        token = request_context.RESPONSE_INFO.set(info)
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
            info[request_context.RESOLVED] = asyncio.run(self.state.current().requests.resolve(body, "test"))
            request = _chat_request(**{k: v for k, v in body.items() if k not in ("model", "messages")})
            return request.to_beam_search_params(8, {}) if beam else request.to_sampling_params(8, {})
        finally:
            request_context.RESPONSE_INFO.reset(token)


@pytest.fixture
def patched_requests(tmp_path):
    pytest.importorskip("vllm")
    from vsteer.serving import vllm_patches
    from vsteer.serving.http import state

    vllm_patches.apply(api_server=False)
    reg = VectorRegistry(tmp_path)
    for name in ("formal", "happy"):
        reg.add(name, SteeringVectorSet(name, {1: torch.ones(8)}))
    saved = state.current()
    yield _RequestPatches(reg)
    state.set_current(saved)


def _chat_request(**extra):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **extra})


def without_pins(extra: dict | None) -> dict | None:
    return {k: v for k, v in extra.items() if k != "vsteer"} if extra is not None else None


def test_request_field_and_default_semantics(patched_requests):
    from vsteer.engine.errors import SteeringError
    from vsteer.serving.frontend import InvalidSteering
    from vsteer.serving.steering_request import SteeringRequest

    op = patched_requests
    spec = {"vectors": [{"name": "formal", "strength": 2.0}], "positions": "generated"}
    default = {"vectors": [{"name": "happy", "strength": 1.0}]}
    op.set_default_steering(None)
    # no field, no default: exactly what vLLM builds
    assert op.sampling_params().extra_args is None
    assert op.sampling_params(vllm_xargs={"k": 1}).extra_args == {"k": 1}
    sp = op.sampling_params(steering=spec, vllm_xargs={"k": 1, "vsteer": "forged", "vsteer_rows": "forged"})
    pins = sp.extra_args.pop("vsteer")  # the server's own resolution, sealed; the client's values are dropped
    assert sp.extra_args == {"k": 1}
    sealed = SteeringRequest.unseal(pins)
    assert sealed is not None and sealed.spec == spec and sealed.source == "request"
    op.set_default_steering(default)
    assert SteeringRequest.unseal(op.sampling_params().extra_args["vsteer"]).spec == default
    assert SteeringRequest.unseal(op.sampling_params().extra_args["vsteer"]).source == "default"
    assert SteeringRequest.unseal(op.sampling_params(steering=spec).extra_args["vsteer"]).spec == spec
    assert op.sampling_params(steering=None).extra_args is None
    assert op.sampling_params(steering={"vectors": []}).extra_args is None
    with pytest.raises(SteeringError) as e:  # the middleware answers it with a 400 and its code
        op.sampling_params(steering={"vectors": [{"name": "formal", "strength": float("nan")}]})
    assert e.value.field == "steering.vectors[0].strength" and e.value.reason == "non_finite_strength"
    with pytest.raises(InvalidSteering):
        op.sampling_params(beam=True, steering=spec, use_beam_search=True, n=2)


def test_a_repeated_spec_is_resolved_once(patched_requests):
    """Per request: one resolution in the API process, none for a repeat of the same bytes
    (until a name it pinned points elsewhere)."""
    op = patched_requests
    op.set_default_steering(None)
    resolver = op.state.current().requests
    spec = {"vectors": [{"name": "formal", "strength": 2.0}]}
    for _ in range(5):
        op.sampling_params(steering=spec)
    assert resolver.resolutions == 1
    op.registry.add("formal", SteeringVectorSet("formal", {1: 2 * torch.ones(8)}), overwrite=True)
    op.sampling_params(steering=spec)
    assert resolver.resolutions == 2


def test_default_steering_file(tmp_path):
    from vsteer.serving.http.config import load_default_steering

    f = tmp_path / "d.json"
    f.write_text(json.dumps({"vectors": [{"name": "formal", "strength": 3}], "positions": "prompt"}))
    assert load_default_steering(str(f)) == {"vectors": [{"name": "formal", "strength": 3.0}], "positions": "prompt"}
    f.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_default_steering(str(f))
    f.write_text(json.dumps({"steering": {"vectors": []}}))
    assert load_default_steering(str(f)) is None
    f.write_text(json.dumps({"vectors": [{"name": "formal", "strength": 1e9}]}))
    with pytest.raises(ValueError, match="strength"):
        load_default_steering(str(f))
    with pytest.raises(ValueError, match="cannot read"):
        load_default_steering(str(tmp_path / "missing.json"))


def test_cli_refuses_bad_default_before_starting_vllm(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "vsteer.cli.main", "serve", MODEL, "--vectors", str(tmp_path),
                          "--default-steering", str(f)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not valid JSON" in out.stderr


def test_cli_model_argument():
    from vsteer.cli.serve_cmd import _take_model

    assert _take_model(["m", "--port", "1"]) == ("m", ["--port", "1"])
    assert _take_model(["--port", "1", "--model", "m"]) == ("m", ["--port", "1"])
    assert _take_model(["--model=m"]) == ("m", [])


def test_worker_counters_are_monotonic():
    from prometheus_client import REGISTRY

    from vsteer.serving import metrics

    def value(name):
        return REGISTRY.get_sample_value(name, {"model_name": metrics._model_name, "engine": "0"}) or 0.0

    names = ("vsteer_steps_total", "vsteer_steered_tokens_total", "vsteer_step_configs_sum",
             "vsteer_step_configs_count")
    before = {n: value(n) for n in names}
    puller = metrics.WorkerStatsPuller()
    puller.apply({"steps": 10, "steered_tokens": 5, "configs_per_step": [1, 2]})
    puller.apply({"steps": 12, "steered_tokens": 5, "configs_per_step": [3]})
    puller.apply({"steps": 4, "steered_tokens": 2, "configs_per_step": []})  # worker restarted
    got = {n: value(n) - before[n] for n in names}
    assert got == {"vsteer_steps_total": 16, "vsteer_steered_tokens_total": 7, "vsteer_step_configs_sum": 6,
                   "vsteer_step_configs_count": 3}


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_server):
    """The session's SmolLM2 server (tests/served.py), shared with the reliability suite."""
    return smollm2_server


@pytest.fixture(scope="module")
def ref(server, smollm2_hf):
    """HF reference generation for a spec on chat or completion prompts (cached)."""
    model, tok = smollm2_hf
    resolver = SteeringResolver(VectorRegistry(server.vectors), hidden_size=HIDDEN, num_layers=LAYERS)
    cache: dict[str, list[int]] = {}

    def chat_ids(question: str) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]

    def run(prompt_ids: list[int], spec, n: int = NEW_TOKENS) -> list[int]:
        key = json.dumps([prompt_ids, spec, n])
        if key not in cache:
            cache[key] = hf_reference(model, prompt_ids, spec, resolver, n).tokens
        return cache[key]

    run.chat_ids, run.tok = chat_ids, tok
    return run


def _tokens(choice) -> list[int]:
    ids = getattr(choice, "token_ids", None)
    if ids is None:
        ids = (choice.model_extra or {}).get("token_ids")
    return list(ids or [])


def _chat(client, question: str, steering=..., n: int = NEW_TOKENS, stream: bool = False, **kw):
    """(text, token ids, headers, body extra) of one greedy chat completion."""
    body = {"ignore_eos": True, "return_token_ids": True}
    if steering is not ...:
        body["steering"] = steering
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=n, temperature=0,
        stream=stream, extra_body=body, **kw)
    out = raw.parse()
    if not stream:
        return out.choices[0].message.content, _tokens(out.choices[0]), raw.headers, out.model_extra or {}
    text, ids = [], []
    for chunk in out:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            ids += _tokens(chunk.choices[0])
    return "".join(text), ids, raw.headers, {}


def _complete(client, prompt: str, steering=..., n: int = NEW_TOKENS, stream: bool = False):
    body = {"ignore_eos": True, "return_token_ids": True}
    if steering is not ...:
        body["steering"] = steering
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                      stream=stream, extra_body=body)
    out = raw.parse()
    if not stream:
        return out.choices[0].text, _tokens(out.choices[0]), raw.headers, out.model_extra or {}
    text, ids = [], []
    for chunk in out:
        if chunk.choices:
            text.append(chunk.choices[0].text or "")
            ids += _tokens(chunk.choices[0])
    return "".join(text), ids, raw.headers, {}


FORMAL = {"vectors": [{"name": "formal", "strength": 4.0}], "positions": "generated"}
MIXED = {"vectors": [{"name": "formal", "strength": -3.0, "layers": [8, 12]}, {"name": "happy", "strength": 5.0}]}


@server_test
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_parity_with_hf_reference(server, ref, stream):
    client = server.client()
    ids = ref.chat_ids(QUESTION)
    plain = _chat(client, QUESTION, stream=stream)
    assert plain[1] == ref(ids, None)
    assert "x-vsteer-fingerprint" not in plain[2] and "steering" not in plain[3]  # stock response
    texts = {}
    for spec in (FORMAL, MIXED):
        text, tokens, headers, extra = _chat(client, QUESTION, spec, stream=stream)
        expected = ref(ids, spec)
        assert tokens == expected, f"{spec}: server {text!r} != HF {ref.tok.decode(expected)!r}"
        assert text == ref.tok.decode(expected, skip_special_tokens=True)
        described = json.loads(headers["x-vsteer-steering"])
        assert headers["x-vsteer-fingerprint"] == described["fingerprint"]
        assert described["positions"] == spec.get("positions", "all") and described["source"] == "request"
        assert {v["name"] for v in described["vectors"]} == {v["name"] for v in spec["vectors"]}
        if not stream:
            assert extra["steering"] == described
        texts[json.dumps(spec)] = text
    assert len({plain[0], *texts.values()}) == 3, "steering must change the text"


@server_test
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completions_parity_with_hf_reference(server, ref, stream):
    client = server.client()
    prompt = "The weather this morning was"
    ids = ref.tok(prompt)["input_ids"]
    plain = _complete(client, prompt, stream=stream)
    steered = _complete(client, prompt, FORMAL, stream=stream)
    assert plain[1] == ref(ids, None)
    assert steered[1] == ref(ids, FORMAL)
    assert steered[0] == ref.tok.decode(steered[1], skip_special_tokens=True)
    assert steered[0] != plain[0]
    assert steered[2]["x-vsteer-fingerprint"] == json.loads(steered[2]["x-vsteer-steering"])["fingerprint"]
    if not stream:
        assert steered[3]["steering"]["vectors"][0]["layers"] == [8, 10, 12]


@server_test
def test_null_and_empty_steering_are_unsteered(server, ref):
    client = server.client()
    expected = ref(ref.chat_ids(QUESTION), None)
    for off in (None, {"vectors": []}):
        text, tokens, headers, extra = _chat(client, QUESTION, off)
        assert tokens == expected and "x-vsteer-fingerprint" not in headers and "steering" not in extra


CONCURRENT_SPECS = [None, None] + [
    {"vectors": [{"name": name, "strength": s}], "positions": pos}
    for name, s, pos in [("formal", 2.0, "all"), ("formal", -2.0, "all"), ("formal", 4.0, "generated"),
                         ("formal", -4.0, "generated"), ("formal", 6.0, "prompt"), ("formal", 3.0, "last"),
                         ("happy", 2.0, "all"), ("happy", -2.0, "all"), ("happy", 5.0, "generated"),
                         ("happy", -5.0, "generated"), ("happy", 8.0, "prompt"), ("happy", 4.0, "first"),
                         ("formal", 1.0, "generated"), ("happy", 1.0, "generated"), ("formal", 8.0, "all"),
                         ("happy", -8.0, "all")]
] + [MIXED, {"vectors": [{"name": "formal", "strength": 2.0, "layers": [10]}, {"name": "happy", "strength": -2.0}]}]


@server_test
def test_twenty_concurrent_requests_get_their_own_steering(server):
    assert len(CONCURRENT_SPECS) == 20
    client = server.client()

    def one(spec):
        return _chat(client, QUESTION, ... if spec is None else spec, n=8)[1]

    sequential = [one(spec) for spec in CONCURRENT_SPECS]
    with ThreadPoolExecutor(len(CONCURRENT_SPECS)) as pool:
        concurrent = list(pool.map(one, CONCURRENT_SPECS))
    for spec, a, b in zip(CONCURRENT_SPECS, sequential, concurrent):
        assert a == b, f"{spec}: concurrent {b} != sequential {a}"
    assert len({tuple(t) for t in sequential}) >= 12, "different steering should mostly give different text"


# -- metrics helpers ----------------------------------------------------------------------------

def _scrape(server) -> dict[tuple[str, tuple], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from vsteer.serving.metrics import MIN_PULL_INTERVAL_S

    # A scrape pulls the workers' counters only if the last pull is older than
    # MIN_PULL_INTERVAL_S; wait it out so every scrape here reads fresh worker counts.
    time.sleep(MIN_PULL_INTERVAL_S + 0.2)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _m(scrape, name: str, **labels) -> float:
    """The sum over the series of ``name`` that carry ``labels`` (worker series also have an
    ``engine`` label: one per data-parallel engine)."""
    if name.startswith("vsteer_"):  # every vsteer series carries the served model's name
        labels = {"model_name": MODEL, **labels}
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= set(ls))


def _delta(before, after, name: str, **labels) -> float:
    return _m(after, name, **labels) - _m(before, name, **labels)


BAD = [  # (steering, reason, param, words in the message)
    ({"vectors": [{"name": "nope", "strength": 1.0}]}, "unknown_vector", "steering.vectors[0].name",
     ["nope"]),  # and no registry names (issue 20 #8): checked below
    ({"vectors": [{"name": "formal", "strength": 1.0, "layers": [9]}]}, "unknown_layer",
     "steering.vectors[0].layers", ["[9]", "[8, 10, 12]"]),
    ({"vectors": [{"name": "x", "strength": 1.0, "data": {"40": encode_inline(torch.ones(HIDDEN))}}]},
     "layer_out_of_range", "steering.vectors[0].data", ["0..29"]),
    ({"vectors": [{"name": "formal", "strength": 1e6}]}, "strength_out_of_bounds",
     "steering.vectors[0].strength", ["1000"]),
    ({"vectors": [{"name": "formal", "strength": 1.0}] * 17}, "too_many_vectors", "steering.vectors", ["16"]),
    ({"vectors": [{"name": "x", "strength": 1.0, "data": {"10": "A" * (1 << 21)}}]}, "inline_too_large",
     "steering.vectors[0].data", ["limit"]),
    ({"vectors": [{"name": "x", "strength": 1.0, "data": {"10": encode_inline(torch.ones(64))}}]},
     "wrong_hidden_size", "steering.vectors[0].data[10]", ["576"]),
    ({"vectors": [{"name": "formal", "strength": 1.0}], "positions": "middle"}, "invalid_value",
     "steering.positions", ["generated"]),
    ({"vectors": [{"name": "formal", "strength": 1.0, "weight": 2}]}, "unknown_field",
     "steering.vectors[0].weight", ["not permitted"]),
    ({"vectors": [{"name": "../etc", "strength": 1.0}]}, "invalid_name", "steering.vectors[0].name",
     ["letters"]),
    ("formal", "wrong_type", "steering", ["object"]),
]


@server_test
def test_bad_steering_is_a_400_naming_the_field(server):
    import httpx
    import openai

    client = server.client()
    before = _scrape(server)
    counts: dict[str, int] = {}
    for i, (steering, reason, param, words) in enumerate(BAD):
        stream = i % 2 == 1
        create = (client.chat.completions.create if i % 3 else
                  lambda **kw: client.completions.create(prompt="Hi", **{k: v for k, v in kw.items()
                                                                          if k != "messages"}))
        with pytest.raises(openai.BadRequestError) as e:
            create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=stream,
                   extra_body={"steering": steering})
        err = e.value.body if isinstance(e.value.body, dict) and "message" in e.value.body else \
            e.value.response.json()["error"]
        assert e.value.status_code == 400 and err["type"] == "BadRequestError" and err["code"] == reason, err
        assert err["param"] == param, (reason, err)
        for word in words:
            assert word in err["message"], (reason, err["message"])
        if reason == "unknown_vector":  # the registry's names are for operators (GET /v1/steering/vectors)
            assert "formal" not in err["message"] and "happy" not in err["message"], err["message"]
        counts[reason] = counts.get(reason, 0) + 1
    # non-finite strengths cannot be written by the openai client (strict JSON): raw HTTP
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true, '
                '"steering": {"vectors": [{"name": "formal", "strength": %s}]}}' % (MODEL, literal))
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vectors[0].strength", r.text
        counts["non_finite_strength"] = counts.get("non_finite_strength", 0) + 1
    # explicit steering with beam search would be silently dropped: refused
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 2,
                                                          "use_beam_search": True, "steering": FORMAL}, timeout=60)
    assert r.status_code == 400 and "beam" in r.json()["error"]["message"], r.text
    counts["unsupported_with_beam_search"] = 1
    after = _scrape(server)
    for reason, n in counts.items():
        assert _delta(before, after, "vsteer_rejected_requests_total", reason=reason) == n, reason
    # nothing reached the engine
    assert _delta(before, after, "vsteer_requests_total", steered="true") == 0
    assert _delta(before, after, "vsteer_requests_total", steered="false") == 0
    # and the server still answers
    text, tokens, headers, _ = _chat(client, QUESTION, FORMAL, n=4)
    assert len(tokens) == 4 and headers["x-vsteer-fingerprint"]


def _admin(key: str | None = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _upload_body(name: str, vs: SteeringVectorSet, tmp: Path, **extra) -> dict:
    d = tmp / f"upload-{name}"
    d.mkdir(parents=True, exist_ok=True)
    VectorRegistry(d).add("set", vs, overwrite=True)
    return {"name": name, "metadata": json.loads((d / "set" / METADATA_FILE).read_text()),
            "safetensors": base64.b64encode((d / "set" / TENSORS_FILE).read_bytes()).decode(), **extra}


@server_test
def test_vector_registry_routes(server, ref, tmp_path):
    import httpx

    url = f"{server.url}/v1/steering/vectors"
    before = _scrape(server)
    listing = httpx.get(url, timeout=30).json()
    entries = {e["name"]: e for e in listing["data"]}
    assert set(entries) == {"formal", "happy"}
    assert entries["formal"]["layers"] == [8, 10, 12] and entries["formal"]["hidden_size"] == HIDDEN
    assert entries["formal"]["behaviour"] == "formal" and entries["formal"]["model_id"] == MODEL
    assert len(entries["formal"]["sha256"]) == 64 and entries["formal"]["compatible"]
    assert listing["model"] == {"name": MODEL, "hidden_size": HIDDEN, "num_layers": LAYERS}

    fresh = _set("fresh", {10: 7}, norm=12.0)
    body = _upload_body("fresh", fresh, tmp_path)
    # admin routes refuse without the key, or with a wrong one
    for headers in ({}, _admin("wrong"), {"Authorization": "Basic " + ADMIN_KEY}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", r.text
        assert httpx.delete(f"{url}/formal", headers=headers, timeout=30).status_code == 401
    assert not (server.vectors / "fresh").exists()

    # upload (JSON: base64 safetensors + metadata); usable at once
    r = httpx.post(url, json=body, headers=_admin(), timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "fresh" and r.json()["sha256"] == body["metadata"]["sha256"]
    assert httpx.post(url, json=body, headers=_admin(), timeout=60).status_code == 409
    spec = {"vectors": [{"name": "fresh", "strength": 4.0}]}
    client = server.client()
    ids = ref.chat_ids(QUESTION)
    _, tokens, headers, _ = _chat(client, QUESTION, spec)
    assert tokens == ref(ids, spec) and tokens != ref(ids, None)
    assert "fresh" in {e["name"] for e in httpx.get(url, timeout=30).json()["data"]}

    # refused: another model's vectors, tampered content, outside paths, bad names
    other = _upload_body("other", _set("other", {1: 1}, hidden=128, num_layers=4), tmp_path)
    r = httpx.post(url, json=other, headers=_admin(), timeout=60)
    assert r.status_code == 400 and "hidden size 128" in r.json()["error"]["message"], r.text
    tampered = dict(body, name="tampered", metadata=dict(body["metadata"], sha256="0" * 64))
    r = httpx.post(url, json=tampered, headers=_admin(), timeout=60)
    assert r.status_code == 400 and "hash" in r.json()["error"]["message"], r.text
    for path, status in (("/etc", 403), ("../", 403), (str(tmp_path / "upload-fresh" / "set"), 403),
                         ("incoming/nothing", 404)):
        r = httpx.post(url, json={"path": path, "name": "x"}, headers=_admin(), timeout=30)
        assert r.status_code == status, (path, r.text)
    r = httpx.post(url, json=dict(body, name="../evil"), headers=_admin(), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert not (server.vectors.parent / "evil").exists()
    # oversized bodies: refused while reading, with or without Content-Length
    big = b'{"name": "big", "safetensors": "' + b"A" * (UPLOAD_LIMIT + 1) + b'"}'
    json_admin = {**_admin(), "content-type": "application/json"}
    r = httpx.post(url, content=big, headers=json_admin, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError", r.text
    chunked = iter([big[i:i + (1 << 16)] for i in range(0, len(big), 1 << 16)])
    assert httpx.post(url, content=chunked, headers=json_admin, timeout=60).status_code == 413
    assert not (server.vectors / "big").exists()

    # load by path from inside the vectors directory
    r = httpx.post(url, json={"path": "incoming/calm"}, headers=_admin(), timeout=60)
    assert r.status_code == 201 and r.json()["name"] == "calm" and r.json()["layers"] == [9], r.text
    _, tokens, headers, _ = _chat(client, QUESTION, {"vectors": [{"name": "calm", "strength": 3.0}]}, n=4)
    assert headers["x-vsteer-fingerprint"]

    # delete: gone for new requests
    r = httpx.delete(f"{url}/fresh", headers=_admin(), timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert httpx.delete(f"{url}/fresh", headers=_admin(), timeout=30).status_code == 404
    import openai

    with pytest.raises(openai.BadRequestError, match="unknown steering vector 'fresh'"):
        _chat(client, QUESTION, spec, n=2)
    after = _scrape(server)
    assert _delta(before, after, "vsteer_registry_loads_total", source="upload") == 1
    assert _delta(before, after, "vsteer_registry_loads_total", source="path") == 1
    assert _delta(before, after, "vsteer_registry_removals_total") == 1
    assert _m(after, "vsteer_registry_vectors") == len(VectorRegistry(server.vectors).names()) == 3


@server_test
def test_metrics_move_by_the_right_amounts(server):
    client = server.client()
    before = _scrape(server)
    n, steered, plain = 6, 3, 2
    spec = {"vectors": [{"name": "formal", "strength": 2.0}], "positions": "generated"}
    for i in range(steered):
        _chat(client, f"Tell me about metric number {i}.", spec, n=n)
    for i in range(plain):
        _chat(client, f"Tell me about plain metric {i}.", n=n)
    after = _scrape(server)
    assert _delta(before, after, "vsteer_requests_total", steered="true") == steered
    assert _delta(before, after, "vsteer_requests_total", steered="false") == plain
    assert _delta(before, after, "vsteer_vector_requests_total", vector="formal") == steered
    assert _delta(before, after, "vsteer_vector_requests_total", vector="happy") == 0
    # latency, split steered / unsteered, one observation per request
    assert _delta(before, after, "vsteer_request_duration_seconds_count", steered="true") == steered
    assert _delta(before, after, "vsteer_request_duration_seconds_count", steered="false") == plain
    assert _delta(before, after, "vsteer_request_duration_seconds_sum", steered="true") > 0
    # the runner generation the workers reported (after the pull above)
    assert [dict(ls) for n, ls in after if n == "vsteer_build_info" and after[(n, ls)] == 1
            and dict(ls).get("runner") in ("v1", "v2")], "vsteer_build_info has no runner"
    # "generated": every fed-back generated token is steered, none of the prompt
    assert _delta(before, after, "vsteer_steered_tokens_total") == steered * (n - 1)
    steered_steps = _delta(before, after, "vsteer_steered_steps_total")
    assert steered * (n - 1) <= steered_steps <= steered * n
    assert _delta(before, after, "vsteer_steps_total") >= steered_steps + plain * (n - 1)
    # one config per steered step (requests were sequential)
    assert _delta(before, after, "vsteer_step_configs_count") == steered_steps
    assert _delta(before, after, "vsteer_step_configs_sum") == steered_steps
    assert _delta(before, after, "vsteer_step_configs_bucket", le="1.0") == steered_steps
    assert _delta(before, after, "vsteer_table_build_seconds_total") > 0
    assert _m(after, "vsteer_worker_stats_pull_failures_total") == 0
    # beside vLLM's own metrics
    assert any(name.startswith("vllm:") for name, _ in after)
    # a scrape with no traffic in between changes nothing
    again = _scrape(server)
    for key in ("vsteer_steered_tokens_total", "vsteer_steered_steps_total", "vsteer_step_configs_count"):
        assert _m(again, key) == _m(after, key)


@server_test
@pytest.mark.stops_shared_server
def test_sigterm_shuts_down_cleanly(server):
    import psutil

    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 60 s after SIGTERM:\n{server.tail()}")
    assert rc == 0, server.tail()
    assert "vsteer: server stopped" in server.log.read_text(errors="replace")
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + 15
    while any(alive(p) for p in server.children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in server.children if alive(p)], "engine processes left behind"


def test_serve_takes_vsteer_flags_from_the_same_yaml_as_vllms(tmp_path):
    """`--config` YAML holds vLLM's and vsteer's flags alike (vsteer's are a group of vLLM's
    parser); a bad value there is refused before vLLM starts."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"vectors: {tmp_path / 'from-yaml'}\ndefault-steering: {tmp_path / 'missing.json'}\n"
                   "max-model-len: 512\n")
    out = subprocess.run([sys.executable, "-m", "vsteer.cli.main", "serve", "tiny-llama", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot read the default steering file" in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "from-yaml").is_dir()  # --vectors came from the YAML too
    # steered models from the YAML's list reach vsteer's parser (a bad one is refused there)
    cfg.write_text("steered-model:\n  - cheerful=happy:2\n  - broken=happy:x\nmax-model-len: 512\n")
    out = subprocess.run([sys.executable, "-m", "vsteer.cli.main", "serve", "tiny-llama", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--steered-model" in out.stderr and "'broken'" in out.stderr, out.stderr[-2000:]
    helped = subprocess.run([sys.executable, "-m", "vsteer.cli.main", "serve", "--help=vsteer"],
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "--default-steering" in helped.stdout and "--vectors" in helped.stdout


@server_test
def test_vsteer_logs_through_vllms_logger(server):
    """vsteer's INFO lines appear in the server output in vLLM's format (its handler and
    VLLM_LOGGING_CONFIG_PATH apply to the ``vllm.vsteer`` logger)."""
    import httpx

    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                        "steering": {"vectors": [{"name": "happy"}]}}, timeout=120)
    assert r.status_code == 200
    lines = [line for line in server.log.read_text(errors="replace").splitlines() if "this API server is steering" in line]
    assert lines and " INFO " in lines[0] and "[request_fields.py" in lines[0], lines[:1]
