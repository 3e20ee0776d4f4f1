"""Faults found reviewing serving/ and engine/ as a hostile client and as an operator with
two replicas, each with the test that would have caught it (no vLLM engine needed)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from vsteer.engine import SteeringError, SteeringResolver, SteeringVectorSet, VectorRegistry, encode_inline

H, L = 16, 6


def _resolver(tmp_path=None, **kw) -> SteeringResolver:
    reg = VectorRegistry(tmp_path) if tmp_path is not None else None
    return SteeringResolver(reg, hidden_size=H, num_layers=L, **kw)


def _err(resolver, spec) -> SteeringError:
    with pytest.raises(SteeringError) as e:
        resolver.resolve(spec)
    return e.value


# 1. inline fingerprints hash what is applied -------------------------------------------------------

def test_inline_keys_outside_layers_are_refused_not_hashed():
    a, b = encode_inline(torch.ones(H)), encode_inline(2 * torch.ones(H))
    r = _resolver()
    e = _err(r, {"vectors": [{"name": "x", "layers": [2], "data": {"1": a, "2": b}}]})
    assert e.reason == "unused_inline_layer" and e.field == "steering.vectors[0].data"
    assert _err(r, {"vectors": [{"name": "x", "data": {"9": a}}]}).reason == "layer_out_of_range"
    # the same bytes at another layer, or another strength, steer differently: other fingerprints
    fps = {r.resolve({"vectors": [{"name": "x", "data": {str(layer): a}, "strength": s}]}).fingerprint
           for layer in (1, 2) for s in (1.0, 2.0)}
    assert len(fps) == 4
    # the label of inline data is not applied: it does not change the fingerprint
    assert r.resolve({"vectors": [{"name": "x", "data": {"1": a}}]}).fingerprint == \
        r.resolve({"vectors": [{"name": "y", "data": {"1": a}}]}).fingerprint


def test_registry_and_inline_of_the_same_content_share_a_fingerprint(tmp_path):
    vec = torch.randn(H)
    reg = VectorRegistry(tmp_path)
    reg.add("v", SteeringVectorSet("v", {3: vec}))
    r = SteeringResolver(reg, hidden_size=H, num_layers=L)
    by_name = r.resolve({"vectors": [{"name": "v", "strength": 2.0}], "positions": "generated"})
    inline = r.resolve({"vectors": [{"name": "w", "strength": 2.0, "data": {"3": encode_inline(vec)}}],
                        "positions": "generated"})
    assert by_name.fingerprint == inline.fingerprint
    other_rule = r.resolve({"vectors": [{"name": "v", "strength": 2.0}], "positions": "prompt"})
    other_op = r.resolve({"vectors": [{"name": "v", "op": "clamp", "strength": 2.0}], "positions": "generated"})
    assert len({by_name.fingerprint, other_rule.fingerprint, other_op.fingerprint}) == 3


# 4. overflow after scaling -------------------------------------------------------------------------

def test_results_that_overflow_the_model_dtype_are_refused():
    big = encode_inline(torch.full((H,), 3e38))
    e = _err(_resolver(), {"vectors": [{"name": "x", "strength": 1000.0, "data": {"1": big}}]})
    assert e.reason == "non_finite_result"
    hundred = encode_inline(torch.full((H,), 100.0))
    spec = {"vectors": [{"name": "x", "strength": 1000.0, "data": {"1": hundred}}]}
    assert _resolver().resolve(spec) is not None  # fine in float32
    assert _err(_resolver(dtype=torch.float16), spec).reason == "non_finite_result"


# 9-11. bounded cost per request ---------------------------------------------------------------------

def test_the_resolution_cache_is_bounded_by_bytes(monkeypatch):
    monkeypatch.setenv("VSTEER_CACHE_BYTES", str(64 << 10))
    r = _resolver()
    vec = encode_inline(torch.randn(H))
    for i in range(2000):  # specs differing only in strength
        r.resolve({"vectors": [{"name": "x", "strength": 1 + i / 1000, "data": {"1": vec}}]})
    assert r._cache.nbytes <= 64 << 10 and len(r._cache) < 2000


def test_inline_data_is_decoded_once_per_distinct_spec(monkeypatch):
    from vsteer.engine import resolver as resolver_module

    calls = []
    real = resolver_module.decode_inline
    monkeypatch.setattr(resolver_module, "decode_inline", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = _resolver()
    spec = {"vectors": [{"name": "x", "data": {str(layer): encode_inline(torch.randn(H)) for layer in range(L)}}]}
    first = r.resolve(spec)
    assert r.resolve(spec) is first and len(calls) == L


def test_a_request_inline_total_is_capped(monkeypatch):
    monkeypatch.setenv("VSTEER_MAX_REQUEST_INLINE_BYTES", str(4 * H * 3))
    spec = {"vectors": [{"name": f"x{i}", "data": {"1": encode_inline(torch.ones(H))}} for i in range(4)]}
    assert _err(_resolver(), spec).reason == "inline_too_large"


def test_unknown_names_do_not_rescan_the_directory(tmp_path, monkeypatch):
    reg = VectorRegistry(tmp_path)
    for i in range(50):
        reg.add(f"v{i}", SteeringVectorSet("v", {1: torch.ones(H)}))
    scans = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda *a: scans.append(1) or real(*a))
    r = SteeringResolver(reg, hidden_size=H, num_layers=L)
    for _ in range(20):
        assert _err(r, {"vectors": [{"name": "nope"}]}).reason == "unknown_vector"
    assert len(scans) <= 1
    reg.add("new", SteeringVectorSet("v", {1: torch.ones(H)}))  # a write is seen at once
    assert "new" in reg.names()


# 12. unauthenticated /metrics scrapes do not hammer the workers ----------------------------------------

def test_worker_stats_pulls_are_rate_limited():
    import asyncio

    from vsteer.serving import metrics

    calls = []

    class Engine:  # the engine client's interface the puller uses
        vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(_api_process_rank=0))

        async def collective_rpc(self, method):
            calls.append(method)
            return [{"steps": len(calls)}]

    async def scrape_many():
        puller = metrics.WorkerStatsPuller()
        for _ in range(50):
            await puller.refresh(Engine())

    asyncio.run(scrape_many())
    assert calls == ["vsteer_stats"]
    secondary = Engine()
    secondary.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(_api_process_rank=1))
    assert asyncio.run(metrics.WorkerStatsPuller().refresh(secondary)) is False  # only API server 0 pulls


# 2, 17. the engine applies what the HTTP layer resolved; client-sent pins are ignored ----------------

def _vllm_config(hidden: int = H, layers: int = L):
    mc = SimpleNamespace(get_hidden_size=lambda: hidden, get_total_num_hidden_layers=lambda: layers,
                         dtype=torch.float32)
    return SimpleNamespace(model_config=mc)


def test_the_engine_applies_the_sealed_resolution_even_after_an_overwrite(tmp_path, monkeypatch):
    from vsteer.engine.spec import SteeringSpec
    from vsteer.serving.admission import RowPreparer
    from vsteer.serving.resolvers import resolver_for
    from vsteer.serving.steering_request import SteeringRequest

    monkeypatch.setenv("VSTEER_VECTORS_DIR", str(tmp_path))
    reg = VectorRegistry(tmp_path)
    reg.add("v", SteeringVectorSet("v", {1: torch.ones(H)}))
    spec = {"vectors": [{"name": "v", "strength": 2.0}]}
    http = SteeringRequest.of(SteeringSpec.parse(spec).to_dict(), resolver_for(H, L).resolve(spec))  # the headers
    sealed = http.seal()
    reg.add("v", SteeringVectorSet("v", {1: 3 * torch.ones(H)}), overwrite=True)
    assert SteeringRequest.unseal(sealed) == http  # process_inputs: sealed here, trusted as is
    prepared = RowPreparer(_vllm_config().model_config).prepare(SteeringRequest.from_engine(sealed))
    assert prepared.fingerprint == http.fingerprint and torch.equal(prepared.add[0], 2 * torch.ones(H))
    # anything not sealed by this process is not trusted: forged MACs, edited bodies, junk
    assert SteeringRequest.unseal(dict(sealed, seal="0" * 64)) is None
    assert SteeringRequest.unseal(dict(sealed, fingerprint="f" * 32)) is None
    assert SteeringRequest.unseal("anything a client sends") is None


# 5. default steering cannot be deleted from under the server -------------------------------------------

def _state(tmp_path, default):
    from vsteer.serving.http.config import ServerConfig
    from vsteer.serving.http.state import ServerState

    reg = VectorRegistry(tmp_path)
    resolver = SteeringResolver(reg, hidden_size=H, num_layers=L)
    st = ServerState(ServerConfig(default_steering=default, default_steering_source="default.json"), H, L, "m",
                     ["k" * 16], [], reg, resolver)
    st.default_resolved = resolver.resolve(default)
    return st


def test_a_set_the_default_steering_uses_cannot_be_removed_or_broken(tmp_path):
    from vsteer.serving.http import admin
    from vsteer.serving.http.errors import AdminError

    reg = VectorRegistry(tmp_path)
    reg.add("calm", SteeringVectorSet("calm", {1: torch.ones(H), 2: torch.ones(H)}))
    reg.add("other", SteeringVectorSet("other", {1: torch.ones(H)}))
    st = _state(tmp_path, {"vectors": [{"name": "calm", "layers": [2]}]})
    with pytest.raises(AdminError) as e:
        admin.remove_vector("calm", st)
    assert e.value.status == 409 and e.value.code == "used_by_default_steering" and "default.json" in e.value.message
    with pytest.raises(AdminError) as e:  # a replacement without layer 2 would break it too
        admin.check_default_steering(st, "calm", SteeringVectorSet("calm", {1: torch.ones(H)}))
    assert e.value.status == 409
    admin.check_default_steering(st, "calm", SteeringVectorSet("calm", {2: -torch.ones(H)}))  # compatible: fine
    assert admin.remove_vector("other", st)["deleted"] and reg.names() == ["calm"]


# 8. a full disk answers 507 and changes nothing -----------------------------------------------------------

def test_a_full_disk_is_a_507_and_changes_nothing(tmp_path):
    """A real write failure: the process may write at most 4 KiB per file (RLIMIT_FSIZE)."""
    VectorRegistry(tmp_path).add("v", SteeringVectorSet("v", {1: torch.ones(H)}))  # hidden 16: another shape
    staged = tmp_path / "incoming"
    from vsteer.engine import save_vector_set

    save_vector_set(SteeringVectorSet("v", {0: torch.ones(4096), 1: torch.ones(4096)}), staged / "big")
    script = textwrap.dedent(f"""
        import resource, signal
        from vsteer.engine import SteeringResolver, VectorRegistry
        from vsteer.serving.http import admin
        from vsteer.serving.http.config import ServerConfig
        from vsteer.serving.http.errors import AdminError
        from vsteer.serving.http.state import ServerState
        reg = VectorRegistry({str(tmp_path)!r})
        st = ServerState(ServerConfig(), 4096, 4, "m", ["k" * 16], [], reg,
                         SteeringResolver(reg, hidden_size=4096, num_layers=4))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            admin.add_vector({{"name": "v", "path": "incoming/big", "overwrite": True}}, st, lambda *a: {{}})
        except AdminError as e:
            print(e.status, e.code)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["507", "insufficient_storage"], out.stderr[-2000:]
    reg = VectorRegistry(tmp_path)
    assert torch.equal(reg.load("v").vectors[1], torch.ones(H))  # the live set is intact
    assert not list(tmp_path.rglob(".tmp-*"))  # and nothing half-written is left


# 18. no default or short admin key ------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["change-me", "secret", "short-key", "x" * 15])
def test_placeholder_or_short_admin_keys_are_refused(key):
    from vsteer.serving.http.config import check_admin_key

    with pytest.raises(ValueError, match="VSTEER_ADMIN_KEY"):
        check_admin_key(key)
    assert check_admin_key("k" * 32) == "k" * 32


def test_a_placeholder_admin_key_stops_the_server(tmp_path):
    """The check above runs before vLLM starts: one clean line, exit 2."""
    env = {**os.environ, "VSTEER_ADMIN_KEY": "change-me"}
    out = subprocess.run([sys.executable, "-m", "vsteer.cli.main", "serve", "tiny-llama", "--vectors", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "VSTEER_ADMIN_KEY" in out.stderr and "Traceback" not in out.stderr


def test_the_admin_key_flag_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vsteer.cli.main", "serve", "tiny-llama", "--steering-admin-key",
                          "k" * 32], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "VSTEER_ADMIN_KEY" in out.stderr


# 13. no server paths in errors sent to inference clients ----------------------------------------------------

def test_broken_metadata_errors_do_not_show_server_paths(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "vsteer.json").write_text("{oops")
    e = _err(_resolver(tmp_path), {"vectors": [{"name": "broken"}]})
    assert e.reason == "bad_vector_file" and str(tmp_path) not in e.message and "<vectors>" in e.message


# 6. beam search reports what it applies ------------------------------------------------------------------

def test_beam_search_with_a_default_reports_no_steering(tmp_path):
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from vsteer.serving import request_context, vllm_patches
    from vsteer.serving.http import state

    from vsteer.engine.spec import SteeringSpec
    from vsteer.serving.steering_request import SteeringRequest

    vllm_patches.apply(api_server=False)
    VectorRegistry(tmp_path).add("calm", SteeringVectorSet("calm", {1: torch.ones(H)}))
    saved = state.current()
    st = _state(tmp_path, {"vectors": [{"name": "calm"}]})
    state.set_current(st)
    default = SteeringRequest.of(SteeringSpec.parse(st.default_steering).to_dict(), st.default_resolved, "default")
    info: dict = {request_context.RESOLVED: default}
    token = request_context.RESPONSE_INFO.set(info)
    try:
        req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "n": 2, "use_beam_search": True})
        req.to_beam_search_params(8, {})
    finally:
        request_context.RESPONSE_INFO.reset(token)
        state.set_current(saved)
    assert request_context.NOT_APPLIED in info and "steering" not in info


def test_errno_mapping():
    from vsteer.serving.http.admin import _storage_error

    assert _storage_error(OSError(errno.ENOSPC, "full")).status == 507
    assert _storage_error(OSError(errno.EACCES, "denied")).status == 500


# 3. a worker that cannot steer a request fails it (vLLM's request-error path) -----------------------

def test_worker_failures_become_request_errors_in_the_scheduler():
    """The worker marks its output; the scheduler wrapper finishes those requests with
    FinishReason.ERROR and drops the tokens computed unsteered in that step."""
    pytest.importorskip("vllm")
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    from vsteer.serving import failures

    finished = []

    class Scheduler:  # the two members _fail_requests uses
        requests = {"a": SimpleNamespace(client_index=0), "b": SimpleNamespace(client_index=1)}

        def finish_requests(self, ids, status):
            finished.append((sorted(ids), status.name))

    marked = failures._with_failed(EMPTY_MODEL_RUNNER_OUTPUT, {"a", "b"})
    assert marked is not EMPTY_MODEL_RUNNER_OUTPUT and not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, failures.FAILED_ATTR)
    outputs = {0: EngineCoreOutputs(outputs=[EngineCoreOutput(request_id="a", new_token_ids=[5]),
                                             EngineCoreOutput(request_id="c", new_token_ids=[6])])}
    wrapped = failures.update_from_output_wrapper(lambda self, so, mro: outputs)
    result = wrapped(Scheduler(), None, marked)
    assert finished == [(["a", "b"], "FINISHED_ERROR")]
    by_id = {o.request_id: o for outs in result.values() for o in outs.outputs}
    assert by_id["a"].finish_reason == FinishReason.ERROR and by_id["a"].new_token_ids == []
    assert by_id["b"].finish_reason == FinishReason.ERROR and 1 in result  # added for its client
    assert by_id["c"].finish_reason is None and by_id["c"].new_token_ids == [6]  # others untouched
