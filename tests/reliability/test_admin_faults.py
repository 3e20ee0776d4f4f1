"""An operator and a hostile client against the registry's admin operations (issue 20), in
process: a full disk while an upload is verified, admin keys, a registry another process
keeps locked, and the registry's own threads. Each case once failed."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry, save_vector_set

H, L = 16, 6
ADMIN_KEY = "k" * 32


def _state(root, hidden: int = H):
    from vsteer.serving.http.config import ServerConfig
    from vsteer.serving.http.state import ServerState

    reg = VectorRegistry(root)
    return ServerState(ServerConfig(), hidden, L, "m", [ADMIN_KEY], [], reg,
                       SteeringResolver(reg, hidden_size=hidden, num_layers=L))


def _upload_body(vs: SteeringVectorSet, tmp_path, name: str) -> dict:
    d = tmp_path / f"src-{name}"
    save_vector_set(vs, d)
    return {"name": name, "metadata": json.loads((d / "vsteer.json").read_text()),
            "safetensors": base64.b64encode((d / "vectors.safetensors").read_bytes()).decode()}


# 4 and 8. an upload on a full disk: 507 with a code, nothing left behind -----------------------------------

def test_an_upload_on_a_full_disk_is_a_507_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes every file write over 4 KiB fail (EFBIG, as a full disk would):
    the upload used to be staged in a temporary directory first, and that failure escaped
    as a plain 500 without a code. Now: 507 insufficient_storage, no .versions/big/."""
    registry = tmp_path / "vectors"
    registry.mkdir()
    body = _upload_body(SteeringVectorSet("big", {0: torch.ones(4096), 1: torch.ones(4096)}, num_layers=L),
                        tmp_path, "big")
    (tmp_path / "body.json").write_text(json.dumps(body))
    script = textwrap.dedent(f"""
        import json, resource, signal
        from vsteer.engine import SteeringResolver, VectorRegistry
        from vsteer.serving.http import admin
        from vsteer.serving.http.config import ServerConfig
        from vsteer.serving.http.errors import AdminError
        from vsteer.serving.http.state import ServerState
        body = json.load(open({str(tmp_path / 'body.json')!r}))
        reg = VectorRegistry({str(registry)!r})
        st = ServerState(ServerConfig(), 4096, {L}, "m", ["k" * 16], [], reg,
                         SteeringResolver(reg, hidden_size=4096, num_layers={L}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            admin.add_vector(body, st, lambda *a: {{}})
            print("added")
        except AdminError as e:
            print(e.status, e.code)
        except Exception as e:
            print("escaped", type(e).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["507", "insufficient_storage"], (out.stdout, out.stderr[-2000:])
    assert sorted(p.name for p in registry.iterdir()) in ([], [".lock"]), list(registry.rglob("*"))


def test_an_upload_needs_no_temporary_directory(tmp_path, monkeypatch):
    """A full (here: missing) temporary directory cannot fail an upload the registry has room for."""
    import tempfile

    from vsteer.serving.http import admin

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    (tmp_path / "vectors").mkdir()
    st = _state(tmp_path / "vectors")
    status, _ = admin.add_vector(_upload_body(SteeringVectorSet("calm", {1: torch.ones(H)}, num_layers=L), tmp_path,
                                              "calm"), st, lambda *a: {})
    assert status == 201 and st.registry.load("calm").vectors[1][0] == 1.0


def test_a_tampered_upload_is_still_refused_in_memory(tmp_path):
    from vsteer.serving.http import admin
    from vsteer.serving.http.errors import AdminError

    (tmp_path / "vectors").mkdir()
    st = _state(tmp_path / "vectors")
    body = _upload_body(SteeringVectorSet("calm", {1: torch.ones(H)}, num_layers=L), tmp_path, "calm")
    for bad, code in [(dict(body, metadata={**body["metadata"], "sha256": "0" * 64}), "bad_vector_file"),
                      (dict(body, safetensors=base64.b64encode(b"\xff" * 64).decode()), "bad_vector_file"),
                      (dict(body, metadata={**body["metadata"], "hidden_size": 8}), "wrong_hidden_size")]:
        with pytest.raises(AdminError) as e:
            admin.add_vector(bad, st, lambda *a: {})
        assert (e.value.status, e.value.code) == (400, code), e.value.message
    assert st.registry.names() == []


# 6. only VSTEER_ADMIN_KEY admits registry writes ------------------------------------------------------------

def _create_state(monkeypatch, tmp_path, api_key, admin_key):
    from vsteer.serving.http import config
    from vsteer.serving.http.app import create_state

    monkeypatch.setenv("VSTEER_VECTORS_DIR", str(tmp_path))
    if admin_key is None:
        monkeypatch.delenv("VSTEER_ADMIN_KEY", raising=False)
    else:
        monkeypatch.setenv("VSTEER_ADMIN_KEY", admin_key)
    model_config = SimpleNamespace(get_hidden_size=lambda: H, get_total_num_hidden_layers=lambda: L,
                                   served_model_name="m")
    return create_state(SimpleNamespace(api_key=api_key, served_model_name=None, model="m"), model_config,
                        config.build_config())


@pytest.mark.parametrize("api_key", [["test"], ["x" * 40]])
def test_an_inference_api_key_never_admits_registry_writes(monkeypatch, tmp_path, api_key):
    """`--api-key test` (a placeholder, shared by every client) used to be the admin key
    when VSTEER_ADMIN_KEY was unset; now the admin routes are off (403 admin_disabled)."""
    st = _create_state(monkeypatch, tmp_path, api_key, None)
    assert st.admin_keys == [] and st.api_keys == api_key


def test_the_admin_key_is_the_only_admin_key(monkeypatch, tmp_path):
    st = _create_state(monkeypatch, tmp_path, ["x" * 40], ADMIN_KEY)
    assert st.admin_keys == [ADMIN_KEY]
    from vsteer.serving.http import config

    monkeypatch.setenv("VSTEER_ADMIN_KEY", "test")
    with pytest.raises(ValueError, match="placeholder"):
        config.build_config()


# 2. a registry another process keeps locked: 503 registry_busy, bounded ---------------------------------------

def test_admin_writes_give_up_on_a_held_lock_with_503(tmp_path, monkeypatch):
    from vsteer.serving.http import admin
    from vsteer.serving.http.errors import AdminError

    monkeypatch.setenv("VSTEER_REGISTRY_LOCK_TIMEOUT_S", "0.5")
    (tmp_path / "vectors").mkdir()
    st = _state(tmp_path / "vectors")
    st.registry.add("old", SteeringVectorSet("old", {1: torch.ones(H)}))
    body = _upload_body(SteeringVectorSet("calm", {1: torch.ones(H)}, num_layers=L), tmp_path, "calm")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "fh = open(sys.argv[1], 'a+b'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(30)", str(tmp_path / "vectors" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        for call in (lambda: admin.add_vector(body, st, lambda *a: {}), lambda: admin.remove_vector("old", st)):
            with pytest.raises(AdminError) as e:
                call()
            assert (e.value.status, e.value.code) == (503, "registry_busy"), e.value.message
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait(30)
    assert st.registry.names() == ["old"]


def test_registry_reads_run_on_a_bounded_pool_of_their_own(monkeypatch):
    """A stalled registry volume fills the registry's threads, not asyncio's default pool
    (which vLLM's server uses for everything else); context variables travel along."""
    import contextvars

    from vsteer.serving.http import registry_io

    monkeypatch.setenv("VSTEER_REGISTRY_READ_THREADS", "2")
    monkeypatch.setattr(registry_io, "_pools", {})
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    gate = threading.Event()
    running = []

    def stalled() -> str:
        running.append(threading.current_thread().name)
        gate.wait(30)
        return var.get()

    async def main() -> tuple[list[str], float]:
        var.set("request")
        reads = [asyncio.ensure_future(registry_io.run_registry_read(stalled)) for _ in range(5)]
        await asyncio.sleep(0.3)
        start = time.monotonic()
        await asyncio.to_thread(lambda: None)  # the default pool is free
        free_after = time.monotonic() - start
        assert len(running) == 2  # bounded: the other three wait for a registry thread
        gate.set()
        return await asyncio.gather(*reads), free_after

    results, free_after = asyncio.run(main())
    assert results == ["request"] * 5 and free_after < 0.5
    assert all(name.startswith("vsteer-registry-read") for name in running)
