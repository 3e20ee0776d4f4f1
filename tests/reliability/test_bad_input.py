"""A hostile client against a real `vsteer serve`: malformed steering fields and registry
calls. Each gets its documented 4xx with an OpenAI error body (and the machine-readable
``code``), never a 5xx or a hang, and after each one a normal request still succeeds."""

from __future__ import annotations

import base64
import json
import struct

import pytest
import torch

from served import HIDDEN, MODEL, UPLOAD_LIMIT, vector_set
from vsteer.engine import encode_inline

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2]
ONES = encode_inline(torch.ones(HIDDEN))


def _inline(values: torch.Tensor) -> str:
    return encode_inline(values)


def _chat(steering, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "steering": steering, **extra}


def _v(**fields) -> dict:
    return {"vectors": [{"name": "formal", **fields}]}


# (label, body, status, code): bodies for /v1/chat/completions
STEERING_CASES = [
    ("unknown name", _chat({"vectors": [{"name": "nope"}]}), 400, "unknown_vector"),
    ("path as name", _chat({"vectors": [{"name": "../etc/passwd"}]}), 400, "invalid_name"),
    ("trailing newline in name", _chat({"vectors": [{"name": "formal\n"}]}), 400, "invalid_name"),
    ("empty name", _chat({"vectors": [{"name": ""}]}), 400, "invalid_name"),
    ("very long name", _chat({"vectors": [{"name": "a" * 300}]}), 400, "invalid_name"),
    ("name not a string", _chat({"vectors": [{"name": 123}]}), 400, "wrong_type"),
    ("missing name", _chat({"vectors": [{"strength": 1.0}]}), 400, "missing_field"),
    ("strength out of bounds", _chat(_v(strength=1e6)), 400, "strength_out_of_bounds"),
    ("strength a list", _chat(_v(strength=[1, 2])), 400, "wrong_type"),
    ("strength a boolean", _chat(_v(strength=True)), 400, "wrong_type"),
    ("strength a numeric string", _chat(_v(strength="3")), 400, "wrong_type"),
    ("layers of numeric strings", _chat(_v(layers=["10"])), 400, "wrong_type"),
    ("layers of floats", _chat(_v(layers=[10.0])), 400, "wrong_type"),
    ("empty layers", _chat(_v(layers=[])), 400, "invalid_value"),
    ("negative layer", _chat(_v(layers=[-1])), 400, "layer_out_of_range"),
    ("layer the set lacks", _chat(_v(layers=[9])), 400, "unknown_layer"),
    ("repeated layer", _chat(_v(layers=[10, 10])), 400, "invalid_value"),
    ("layers a string", _chat(_v(layers="10")), 400, "wrong_type"),
    ("inline wrong size", _chat({"vectors": [{"name": "x", "data": {"10": encode_inline(torch.ones(64))}}]}),
     400, "wrong_hidden_size"),
    ("inline bad base64", _chat({"vectors": [{"name": "x", "data": {"10": "not base64!"}}]}), 400, "bad_inline_data"),
    ("inline NaN", _chat({"vectors": [{"name": "x", "data": {"10": base64.b64encode(
        struct.pack("<f", float("nan")) * HIDDEN).decode()}}]}), 400, "non_finite_vector"),
    ("inline layer outside the model", _chat({"vectors": [{"name": "x", "data": {"40": ONES}}]}), 400,
     "layer_out_of_range"),
    ("inline layer not applied", _chat({"vectors": [{"name": "x", "layers": [10], "data": {"10": ONES, "11": ONES}}]}),
     400, "unused_inline_layer"),
    ("inline over the per-vector limit", _chat({"vectors": [{"name": "x", "data": {"10": "A" * (1 << 21)}}]}), 400,
     "inline_too_large"),
    ("inline over the per-request limit", _chat({"vectors": [
        {"name": f"x{i}", "data": {str(layer): ONES for layer in range(30)}} for i in range(4)]}), 400,
     "inline_too_large"),
    ("too many vectors", _chat({"vectors": [{"name": "formal"}] * 17}), 400, "too_many_vectors"),
    ("unknown vector field", _chat(_v(weight=2)), 400, "unknown_field"),
    ("unknown spec field", _chat({"vectors": [], "foo": 1}), 400, "unknown_field"),
    ("unknown position rule", _chat({"vectors": [{"name": "formal"}], "positions": "middle"}), 400, "invalid_value"),
    ("unknown op", _chat(_v(op="multiply")), 400, "invalid_value"),
    ("ablate with a strength", _chat(_v(op="ablate", strength=2.0)), 400, "invalid_op_combination"),
    ("clamp with norm preserve", _chat(_v(op="clamp", norm="preserve")), 400, "invalid_op_combination"),
    ("relative unit without norms", _chat({"vectors": [{"name": "x", "unit": "relative", "data": {"10": ONES}}]}),
     400, "no_residual_norms"),
    ("ablate a zero vector", _chat({"vectors": [{"name": "x", "op": "ablate",
                                                  "data": {"10": encode_inline(torch.zeros(HIDDEN))}}]}),
     400, "zero_vector"),
    ("too many projections", _chat({"vectors": [
        {"name": f"x{i}", "op": "ablate", "data": {"10": encode_inline(torch.randn(HIDDEN))}} for i in range(3)]}),
     400, "too_many_projections"),
    ("conflicting norm modes", _chat({"vectors": [{"name": "formal", "layers": [10], "norm": "preserve"},
                                                  {"name": "happy"}]}), 400, "conflicting_norm"),
    ("overflow after scaling", _chat({"vectors": [{"name": "x", "strength": 1000.0,
                                                   "data": {"10": encode_inline(torch.full((HIDDEN,), 3e38))}}]}),
     400, "non_finite_result"),
    ("steering a string", _chat("formal"), 400, "wrong_type"),
    ("steering a list", _chat([{"name": "formal"}]), 400, "wrong_type"),
    ("vectors not a list", _chat({"vectors": {"name": "formal"}}), 400, "wrong_type"),
    ("beam search with steering", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 2, "use_beam_search": True,
                                   "steering": _v()}, 400, "unsupported_with_beam_search"),
    ("streaming with bad steering", _chat({"vectors": [{"name": "nope"}]}, stream=True), 400, "unknown_vector"),
    ("broken set in the registry", _chat({"vectors": [{"name": "broken"}]}), 400, "bad_vector_file"),
]
RAW_CASES = [  # (label, raw JSON text, status, code)
    ("NaN literal", '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
                    '"steering": {"vectors": [{"name": "formal", "strength": NaN}]}}' % MODEL, 400, "non_finite_strength"),
    ("Infinity literal", '{"model": "%s", "prompt": "Hi", "max_tokens": 2, '
                         '"steering": {"vectors": [{"name": "formal", "strength": Infinity}]}}' % MODEL, 400,
     "non_finite_strength"),
    ("-Infinity literal", '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "stream": true, '
                          '"steering": {"vectors": [{"name": "formal", "strength": -Infinity}]}}' % MODEL, 400,
     "non_finite_strength"),
    ("deeply nested steering", '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "steering": {"vectors": %s%s}}'
     % (MODEL, "[" * 5000, "]" * 5000), 400, None),
]


@pytest.fixture(scope="module")
def srv(smollm2_server):
    import shutil

    broken = smollm2_server.vectors / "broken"  # a hand-made set whose metadata is garbage
    broken.mkdir(exist_ok=True)
    (broken / "vsteer.json").write_text("{not json")
    (broken / "vectors.safetensors").write_bytes(b"")
    yield smollm2_server
    shutil.rmtree(broken, ignore_errors=True)


def _normal(srv) -> None:
    import httpx

    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 1,
                                                      "steering": {"vectors": [{"name": "happy"}]}}, timeout=120)
    assert r.status_code == 200, r.text


def _check(r, status: int, code: str | None, label: str, srv) -> None:
    assert r.status_code == status, (label, r.status_code, r.text[:500])
    error = r.json()["error"]
    assert {"message", "type", "code"} <= set(error), (label, error)
    if code is not None:
        assert error["code"] == code, (label, error)
    assert str(srv.vectors.parent) not in error["message"], (label, "server path leaked", error["message"])
    if code in ("unknown_vector", "not_found"):  # the registry's names are not every client's business
        assert "formal" not in error["message"] and "happy" not in error["message"], (label, error["message"])


def test_bad_steering_fields(srv):
    import httpx

    for label, body, status, code in STEERING_CASES:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=120)
        _check(r, status, code, label, srv)
        _normal(srv)
    for label, text, status, code in RAW_CASES:
        path = "/v1/completions" if '"prompt"' in text else "/v1/chat/completions"
        r = httpx.post(f"{srv.url}{path}", content=text, headers={"content-type": "application/json"}, timeout=120)
        _check(r, status, code, label, srv)
        _normal(srv)
    assert len(STEERING_CASES) + len(RAW_CASES) >= 40


def test_over_long_prompt_with_steering(srv):
    import httpx

    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "word " * 3000, "max_tokens": 4,
                                                      "steering": _v()}, timeout=120)
    assert r.status_code == 400 and "error" in r.json(), r.text[:300]
    _normal(srv)


def _upload(vs, name: str, tmp_path, **extra) -> dict:
    from vsteer.engine import save_vector_set

    d = tmp_path / f"up-{name}"
    save_vector_set(vs, d, overwrite=True)
    return {"name": name, "metadata": json.loads((d / "vsteer.json").read_text()),
            "safetensors": base64.b64encode((d / "vectors.safetensors").read_bytes()).decode(), **extra}


def test_bad_registry_calls(srv, tmp_path):
    import httpx

    url, admin = f"{srv.url}/v1/steering/vectors", srv.admin_headers()
    good = _upload(vector_set("okay", {10: 11}), "okay", tmp_path)
    tampered = dict(good, metadata={**good["metadata"], "sha256": "0" * 64})
    wide = _upload(vector_set("wide", {1: 1}, hidden=128, num_layers=4), "wide", tmp_path)
    cases = [
        ("no key", "post", {"json": good}, {}, 401, "unauthorized"),
        ("wrong key", "post", {"json": good}, srv.admin_headers("x" * 24), 401, "unauthorized"),
        ("not JSON", "post", {"content": b"{nope"}, admin, 400, "invalid_request"),
        ("deeply nested JSON", "post", {"content": b"[" * 100000 + b"]" * 100000}, admin, 400, "invalid_request"),
        ("JSON array", "post", {"json": [1]}, admin, 400, "invalid_request"),
        ("unknown field", "post", {"json": {**good, "extra": 1}}, admin, 400, "invalid_request"),
        ("path outside, existing", "post", {"json": {"path": "/etc", "name": "x"}}, admin, 403, "path_not_allowed"),
        ("path outside, missing", "post", {"json": {"path": "/no/such/dir", "name": "x"}}, admin, 403,
         "path_not_allowed"),
        ("path traversal", "post", {"json": {"path": "../../../etc", "name": "x"}}, admin, 403, "path_not_allowed"),
        ("missing path inside", "post", {"json": {"path": "incoming/none", "name": "x"}}, admin, 404, "not_found"),
        ("bad base64", "post", {"json": dict(good, safetensors="!!")}, admin, 400, "invalid_request"),
        ("tampered upload", "post", {"json": tampered}, admin, 400, "bad_vector_file"),
        ("another model's set", "post", {"json": wide}, admin, 400, "wrong_hidden_size"),
        ("name with a slash", "post", {"json": dict(good, name="a/b")}, admin, 400, "invalid_name"),
        ("name with a newline", "post", {"json": dict(good, name="calm\n")}, admin, 400, "invalid_name"),
        ("taken name", "post", {"json": dict(good, name="formal")}, admin, 409, "name_exists"),
        ("overwrite not a bool", "post", {"json": dict(good, overwrite="yes")}, admin, 400, "invalid_request"),
        ("oversized body", "post", {"content": b"x" * (UPLOAD_LIMIT + 10)}, admin, 413, "payload_too_large"),
        ("oversized chunked body", "post", {"content": iter([b"x" * (1 << 16)] * (UPLOAD_LIMIT // (1 << 16) + 2))},
         admin, 413, "payload_too_large"),
        ("delete unknown", "delete", {}, admin, 404, "not_found"),
        ("delete without key", "delete", {}, {}, 401, "unauthorized"),
    ]
    for label, method, kw, headers, status, code in cases:
        target = url if method == "post" else f"{url}/{'formal' if 'key' in label else 'nothing-here'}"
        r = httpx.request(method.upper(), target, headers=headers, timeout=60, **kw)
        _check(r, status, code, label, srv)
        _normal(srv)
    r = httpx.get(f"{url}/nothing-here", timeout=30)
    _check(r, 404, "not_found", "get unknown", srv)
    assert "okay" not in [e["name"] for e in httpx.get(url, timeout=30).json()["data"]]
    assert not list(srv.vectors.rglob(".tmp-*")), "a refused request left temporary files"
