"""Overwrite and delete a vector while 128 requests that use it are in flight: zero
errors, every response reports the content it actually ran with (and did run with it),
later requests get the new content, and a deleted name is refused."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from served import MODEL, vector_set
from vsteer.engine import encode_inline, save_vector_set

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2]
IN_FLIGHT = 128
NEW_TOKENS = 24


def _body(vs, name: str, tmp_path) -> dict:
    d = tmp_path / f"set-{vs.behaviour}"
    save_vector_set(vs, d, overwrite=True)
    return {"name": name, "overwrite": True, "metadata": json.loads((d / "vsteer.json").read_text()),
            "safetensors": base64.b64encode((d / "vectors.safetensors").read_bytes()).decode()}


def _accepted(srv) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "vsteer_requests_total" and s.labels.get("steered") == "true":
                return s.value
    return 0.0


def test_overwrite_and_delete_under_load(smollm2_server, tmp_path):
    import httpx

    srv, url = smollm2_server, f"{smollm2_server.url}/v1/steering/vectors"
    versions = {tag: vector_set(f"swap-{tag}", {10: seed}) for tag, seed in (("a", 101), ("b", 102), ("c", 103))}
    r = httpx.post(url, json=_body(versions["a"], "swap", tmp_path), headers=srv.admin_headers(), timeout=60)
    assert r.status_code in (200, 201), r.text
    sha_a = r.json()["sha256"]

    prompts = [f"Tell me something about number {i}." for i in range(IN_FLIGHT)]

    def request(prompt: str):
        return httpx.post(f"{srv.url}/v1/completions", timeout=900, json={
            "model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "steering": {"vectors": [{"name": "swap", "strength": 6.0}]}})

    before = _accepted(srv)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(request, p) for p in prompts]
        deadline = time.monotonic() + 300
        while _accepted(srv) - before < IN_FLIGHT:  # every request validated and pinned to version a
            assert time.monotonic() < deadline, "requests were not accepted"
            time.sleep(0.2)
        assert sum(f.done() for f in futures) < IN_FLIGHT // 2, "too few requests still in flight to test"
        for tag in ("b", "c"):
            r = httpx.post(url, json=_body(versions[tag], "swap", tmp_path), headers=srv.admin_headers(), timeout=60)
            assert r.status_code == 200, r.text
        after_swap = httpx.post(f"{srv.url}/v1/completions", timeout=300, json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 1, "steering": {"vectors": [{"name": "swap"}]}})
        assert after_swap.status_code == 200, after_swap.text
        assert after_swap.json()["steering"]["vectors"][0]["sha256"] == _sha(versions["c"])
        r = httpx.delete(f"{url}/swap", headers=srv.admin_headers(), timeout=60)
        assert r.status_code == 200, r.text
        responses = [f.result() for f in futures]

    failed = [r.text[:200] for r in responses if r.status_code != 200]
    assert not failed, f"{len(failed)} of {IN_FLIGHT} in-flight requests failed: {failed[:3]}"
    reported = {r.json()["steering"]["vectors"][0]["sha256"] for r in responses}
    assert reported == {sha_a}
    assert {r.headers["x-vsteer-fingerprint"] for r in responses} == {responses[0].json()["steering"]["fingerprint"]}
    # ... and they ran with version a: the same request, alone, with a's content inline
    inline_a = {"vectors": [{"name": "a", "strength": 6.0, "data": {"10": encode_inline(versions["a"].vectors[10])}}]}
    for prompt, response in list(zip(prompts, responses))[:: IN_FLIGHT // 8]:
        alone = httpx.post(f"{srv.url}/v1/completions", timeout=300, json={
            "model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "steering": inline_a})
        assert alone.json()["steering"]["fingerprint"] == response.json()["steering"]["fingerprint"]
        assert alone.json()["choices"][0]["text"] == response.json()["choices"][0]["text"]
    gone = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 1, "steering": {"vectors": [{"name": "swap"}]}})
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "unknown_vector"


def _sha(vs) -> str:
    from vsteer.engine.formats import set_sha256

    return set_sha256(vs)
