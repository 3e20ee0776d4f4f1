"""Two `vsteer serve` replicas behind the vLLM project's router (`vllm-router`, a Rust load
balancer; `pip install vllm-router`), driven by the official `openai` client through it.

Two real replicas of the tiny model share one vector directory; the router sits in front on
127.0.0.1. What a platform team needs from that chain, each asserted here:

* ``extra_body={"steering": ...}`` reaches the replica unchanged: a steered response through
  the router equals the same request sent straight to a replica (tokens, the ``steering``
  field, both ``x-vsteer-*`` headers), on both replicas, for chat and completions;
* streaming works through it and carries the headers;
* bad steering comes back as the replica's 400 with its ``code``, counted once (no retry);
* the router's own ``/health``, ``/liveness``, ``/readiness`` and Prometheus metrics work;
* the registry routes reach one replica through it, without the client's headers (so
  without the admin key); a vector added on one replica is usable on both (one directory);
* routing by model name: the default (single-router) mode ignores ``model`` (any policy), so
  replicas must serve the same names; ``--enable-igw`` routes by ``model`` to workers
  registered through ``POST /workers`` with one model id each (docs/scale-out.md);
* steered models (``--steered-model``, the same on both replicas, and one created at run
  time in the shared directory): ``model="<name>"`` with no extra_body through the router
  equals the same steering sent as extra_body, streaming too.

Not in ``make test``: it runs only with ``ROUTER_CHECK=1``, which ``make router-check`` sets
(the measured wall time and the last result are in docs/scale-out.md). It also skips when
``vllm-router`` is not installed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.opt_in("ROUTER_CHECK")]  # two extra engines (~3 min): `make router-check`

MODEL = "tiny-llama"
HIDDEN, LAYERS = 128, 4                  # engine.models.build_tiny_llama's defaults
REPLICA_NAMES = ("tiny-a", "tiny-b")     # each replica's second served name (routing by name)
STEERING = {"vectors": [{"name": "lively", "strength": 6.0}], "positions": "generated"}
CHAT = [{"role": "user", "content": "Tell me about your weekend."}]
TOKENS = 8

# -- steered models (issue 21): the same on both replicas, so the default router serves them ----
ALIAS = "lively-6"                       # means MODEL with STEERING: model=ALIAS needs no extra_body
ALIAS_ARGS = ["--steered-model", f"{ALIAS}=lively:6;positions=generated"]


def _router_binary() -> str:
    path = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    if not Path(path).exists():
        pytest.skip("vllm-router is not installed (pip install vllm-router; `make router-check` does)")
    return path


def _vector_set(name: str, seed: int):
    from vsteer.engine import SteeringVectorSet

    gen = torch.Generator().manual_seed(seed)
    vectors = {layer: (v := torch.randn(HIDDEN, generator=gen)) / v.norm() * 8 for layer in (1, 2)}
    return SteeringVectorSet(name, vectors, model_id=MODEL, num_layers=LAYERS)


class Router:
    """One `vllm-router` process on 127.0.0.1 (API port and Prometheus port)."""

    def __init__(self, root: Path, workers: list[str], *, policy: str = "round_robin", igw: bool = False):
        from served import free_port

        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"router-{self.port}.log"
        cmd = [_router_binary(), "--host", "127.0.0.1", "--port", str(self.port), "--policy", policy,
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
               "--worker-startup-check-interval", "1", "--log-level", "info",
               *(["--enable-igw"] if igw else ["--worker-urls", *workers])]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait()

    def _wait(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm-router exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"vllm-router did not answer /health in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(5)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_model_path):
    """Two replicas of the tiny model, started side by side, one shared vector directory
    (the second replica's ``vectors`` is a link to the first's: both resolve the same path)."""
    pytest.importorskip("vllm")
    _router_binary()
    from served import start_server, stop_server
    from vsteer.engine import VectorRegistry

    roots = [tmp_path_factory.mktemp(f"replica-{n}") for n in REPLICA_NAMES]
    shared = roots[0] / "vectors"
    shared.mkdir()
    VectorRegistry(shared).add("lively", _vector_set("lively", 7))
    (roots[1] / "vectors").symlink_to(shared, target_is_directory=True)

    def start(i: int):
        args = ["--served-model-name", MODEL, REPLICA_NAMES[i], "--max-num-seqs", "8", "--max-model-len", "256",
                *ALIAS_ARGS]
        return start_server(roots[i], model=MODEL, extra_args=args, start_timeout=600)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, i) for i in range(2)]
        errors = [f.exception() for f in futures]
    servers = [f.result() for f, e in zip(futures, errors) if e is None]
    try:
        if len(servers) < 2:
            raise next(e for e in errors if e is not None)
        yield servers
    finally:
        for s in servers:
            stop_server(s)


@pytest.fixture(scope="module")
def router(replicas, tmp_path_factory):
    r = Router(tmp_path_factory.mktemp("router"), [s.url for s in replicas])
    try:
        yield r
    finally:
        r.stop()


def _chat(client, model: str = MODEL, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=TOKENS, temperature=0.0, seed=0, **kw)
    resp = raw.parse()
    return resp.choices[0].message.content, resp.model_extra.get("steering"), raw.headers


def _completion(client, model: str = MODEL, **kw):
    raw = client.completions.with_raw_response.create(
        model=model, prompt="The weather today is", max_tokens=TOKENS, temperature=0.0, seed=0, **kw)
    resp = raw.parse()
    return resp.choices[0].text, resp.model_extra.get("steering"), raw.headers


def _vsteer_rejections(server, reason: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "vsteer_rejected_requests_total" and s.labels.get("reason") == reason:
                return s.value
    return 0.0


# -- the default router: steering passes through ------------------------------------------------

def test_steering_passes_through_unchanged(replicas, router):
    """Each steered request through the round-robin router (so both replicas answer) equals
    the same request sent straight to a replica: text, `steering` field and both headers."""
    via = router.client()
    for call in (_chat, _completion):
        direct_text, direct_steering, direct_headers = call(replicas[0].client(), extra_body={"steering": STEERING})
        plain_text, plain_steering, plain_headers = call(via)
        assert plain_steering is None and "x-vsteer-fingerprint" not in plain_headers
        assert direct_text != plain_text, "the vector should change the tiny model's greedy tokens"
        for _ in range(2):  # round robin: one request on each replica
            text, steering, headers = call(via, extra_body={"steering": STEERING})
            assert text == direct_text
            assert steering == direct_steering and steering["source"] == "request"
            assert [v["name"] for v in steering["vectors"]] == ["lively"]
            assert headers["x-vsteer-fingerprint"] == direct_headers["x-vsteer-fingerprint"] == steering["fingerprint"]
            assert json.loads(headers["x-vsteer-steering"]) == steering
    served = router.metrics()
    for replica in replicas:
        assert served[("vllm_router_processed_requests_total", (("worker", replica.url),))] >= 2, served


def test_streaming_through_router(replicas, router):
    via = router.client()
    expected, steering, _ = _chat(via, extra_body={"steering": STEERING})
    for _ in range(2):
        with via.chat.completions.with_streaming_response.create(
                model=MODEL, messages=CHAT, max_tokens=TOKENS, temperature=0.0, seed=0, stream=True,
                extra_body={"steering": STEERING}) as raw:
            assert raw.headers["x-vsteer-fingerprint"] == steering["fingerprint"]
            assert json.loads(raw.headers["x-vsteer-steering"]) == steering
            text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        assert text == expected


def test_bad_steering_is_the_replicas_400(replicas, router):
    """The replica's 400 and its `code` reach the client; the router does not retry a 4xx
    (each refusal is counted once, on one replica)."""
    import openai

    via = router.client()
    before = sum(_vsteer_rejections(s, "unknown_vector") for s in replicas)
    bad = {"vectors": [{"name": "no-such-vector", "strength": 1.0}]}
    for stream in (False, True, False, True):
        with pytest.raises(openai.BadRequestError) as err:
            via.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=TOKENS, stream=stream,
                                        extra_body={"steering": bad})
        assert err.value.status_code == 400
        assert err.value.code == "unknown_vector", err.value.body
        assert err.value.param == "steering.vectors[0].name"
    with pytest.raises(openai.BadRequestError) as err:
        via.completions.create(model=MODEL, prompt="Hi", max_tokens=TOKENS,
                               extra_body={"steering": {"vectors": [{"name": "lively", "strength": float("1e9")}]}})
    assert err.value.code == "strength_out_of_bounds"
    assert sum(_vsteer_rejections(s, "unknown_vector") for s in replicas) - before == 4


def test_router_health_and_metrics(replicas, router):
    import httpx

    health = httpx.get(f"{router.url}/health", timeout=10)
    assert health.status_code == 200, health.text
    assert httpx.get(f"{router.url}/liveness", timeout=10).status_code == 200
    ready = httpx.get(f"{router.url}/readiness", timeout=10)
    assert ready.status_code == 200 and ready.json()["healthy_workers"] == 2, ready.text
    metrics = router.metrics()
    for replica in replicas:
        assert metrics[("vllm_router_worker_health", (("worker", replica.url),))] == 1
        # circuit closed: the 400s above are client errors, not worker failures
        assert metrics[("vllm_router_cb_state", (("worker", replica.url),))] == 0
    assert metrics[("vllm_router_active_workers", ())] == 2
    # /metrics on the router's API port is not the router's: it is forwarded to one replica
    assert "vsteer_requests_total" in httpx.get(f"{router.url}/metrics", timeout=30).text
    requests = {labels: v for (name, labels), v in metrics.items() if name == "vllm_router_requests_total"}
    assert requests.get((("route", "/v1/chat/completions"),), 0) >= 1, requests


def test_registry_routes_and_the_shared_registry(replicas, router):
    """The router forwards routes it does not know (the registry routes) to one replica with
    method, path and body but without the client's headers (vllm-router 0.1.17): the admin
    key never arrives, so admin calls go to a replica directly. The registry is one shared
    directory: a vector added on one replica is usable through the router on both, and
    deleted on the other."""
    import httpx

    from served import ADMIN_KEY
    from vsteer.engine import save_vector_set

    with_key = {"Authorization": f"Bearer {ADMIN_KEY}"}
    folder = save_vector_set(_vector_set("brisk", 11), replicas[0].vectors.parent / "upload-brisk")
    body = {"name": "brisk", "metadata": json.loads((folder / "vsteer.json").read_text()),
            "safetensors": base64.b64encode((folder / "vectors.safetensors").read_bytes()).decode()}
    for key_header in (with_key, {"X-Vsteer-Admin-Key": ADMIN_KEY}):
        r = httpx.post(f"{router.url}/v1/steering/vectors", json=body, headers=key_header, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text  # a replica's 401
    listed = httpx.get(f"{router.url}/v1/steering/vectors", timeout=30)  # reads need no key here
    assert listed.status_code == 200 and "lively" in listed.text, listed.text

    r = httpx.post(f"{replicas[0].url}/v1/steering/vectors", json=body, headers=with_key, timeout=60)
    assert r.status_code == 201, r.text
    try:
        for _ in range(2):  # round robin: both replicas resolve it from the shared directory
            brisk = {"vectors": [{"name": "brisk", "strength": 2.0}]}
            _, steering, _ = _completion(router.client(), extra_body={"steering": brisk})
            assert steering["vectors"][0]["name"] == "brisk"
    finally:
        r = httpx.delete(f"{replicas[1].url}/v1/steering/vectors/brisk", headers=with_key, timeout=60)
        assert r.status_code == 200, r.text


# -- routing by model name ------------------------------------------------------------------------

def test_default_router_ignores_the_model_field(replicas, router):
    """Single-router mode balances over every worker whatever `model` says: a name only one
    replica serves gets that replica's answer or the other's 404, alternately (round robin).
    Hence: every replica behind one default-mode router must serve the same names."""
    import openai

    outcomes = []
    for _ in range(4):
        try:
            router.client().completions.create(model=REPLICA_NAMES[0], prompt="Hi", max_tokens=2)
            outcomes.append(200)
        except openai.NotFoundError:
            outcomes.append(404)
    assert sorted(outcomes) == [200, 200, 404, 404], outcomes


def test_igw_mode_routes_by_model_name(replicas, tmp_path_factory):
    """`--enable-igw`: workers are registered at run time (`POST /workers`, the
    `--worker-urls` are not used), one model id each; a request goes to the workers of its
    `model`. Steering passes through there too. Its /v1/models is not OpenAI's list."""
    import httpx

    igw = Router(tmp_path_factory.mktemp("igw"), [], igw=True)
    try:
        for replica, name in zip(replicas, REPLICA_NAMES):
            r = httpx.post(f"{igw.url}/workers", json={"url": replica.url, "model_id": name}, timeout=30)
            assert r.status_code in (200, 201) and r.json()["success"], r.text
        workers = httpx.get(f"{igw.url}/workers", timeout=10).json()["workers"]
        assert sorted((w["url"], w["model_id"]) for w in workers) == sorted(
            zip((s.url for s in replicas), REPLICA_NAMES))
        client = igw.client()
        for name in REPLICA_NAMES * 3:  # each only served by its own replica: a wrong route would be a 404
            resp = client.completions.create(model=name, prompt="Hi", max_tokens=2, extra_body={"steering": STEERING})
            assert resp.model_extra["steering"]["vectors"][0]["name"] == "lively"
        served = igw.metrics()
        for replica in replicas:
            assert served[("vllm_router_processed_requests_total", (("worker", replica.url),))] == 3, served
        for _ in range(2):  # a name no worker was registered with falls back to all workers
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        served = igw.metrics()
        assert sum(served[("vllm_router_processed_requests_total", (("worker", r.url),))] for r in replicas) == 8
        listed = httpx.get(f"{igw.url}/v1/models", timeout=10).json()
        assert "data" not in listed and sorted(listed["models"]) == sorted(REPLICA_NAMES), listed
    finally:
        igw.stop()


# -- steered models through the router ------------------------------------------------------------

def _stream_chat(client, model: str, **kw) -> tuple[str, dict]:
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=CHAT, max_tokens=TOKENS, temperature=0.0, seed=0, stream=True, **kw) as raw:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        return text, dict(raw.headers)


def test_steered_model_through_router(replicas, router):
    """model=ALIAS with no extra_body, through the default router (so on both replicas), equals
    STEERING sent as extra_body, streaming or not; the router lists the steered model (its
    /v1/models is one replica's, and the replicas agree)."""
    import httpx

    cards = {c["id"]: c for c in httpx.get(f"{router.url}/v1/models", timeout=30).json()["data"]}
    assert cards[ALIAS]["parent"] == MODEL and cards[ALIAS]["steering"]["vectors"][0]["name"] == "lively"
    via = router.client()
    by_body_text, by_body, by_body_headers = _chat(via, extra_body={"steering": STEERING})
    for _ in range(2):  # round robin: once on each replica
        text, steering, headers = _chat(via, ALIAS)
        assert text == by_body_text and steering["source"] == "alias" and steering["model"] == ALIAS
        assert headers["x-vsteer-fingerprint"] == by_body_headers["x-vsteer-fingerprint"] == by_body["fingerprint"]
        assert json.loads(headers["x-vsteer-steering"]) == steering
        streamed, stream_headers = _stream_chat(via, ALIAS)
        assert streamed == by_body_text
        assert json.loads(stream_headers["x-vsteer-steering"])["model"] == ALIAS


def test_run_time_steered_model_through_router(replicas, router):
    """A steered model created through one replica's admin API lives in the shared vector
    directory: through the router it is served by both replicas, and gone from both once
    deleted through the other (the router cannot carry the admin key: tested above)."""
    import httpx
    import openai

    from served import ADMIN_KEY

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    made = httpx.post(f"{replicas[0].url}/v1/steering/models", headers=admin,
                      json={"name": "lively-3", "spec": "lively:3"}, timeout=30)
    assert made.status_code == 201, made.text
    try:
        deadline = time.monotonic() + 10  # replicas re-read the directory's steered models every second
        served = 0
        while served < 2:  # two in a row: both replicas know it
            try:
                _, steering, _ = _completion(router.client(), model="lively-3")
                assert steering["model"] == "lively-3"
                served += 1
            except openai.NotFoundError:
                served = 0
                assert time.monotonic() < deadline, "the other replica did not pick up the steered model"
                time.sleep(0.5)
    finally:
        gone = httpx.delete(f"{replicas[1].url}/v1/steering/models/lively-3", headers=admin, timeout=30)
        assert gone.status_code == 200, gone.text
    time.sleep(2.5)
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            _completion(router.client(), model="lively-3")
