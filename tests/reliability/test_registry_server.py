"""Another replica holds the registry's lock (issue 20 #2), against the session's real
`vsteer serve`: steered requests are not stalled by it, and admin writes give up with
503 registry_busy instead of hanging."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from served import MODEL

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2]
HOLD = 20.0


@pytest.fixture()
def held_lock(smollm2_server):
    """A process (a stuck writer of another replica) holding the registry's write lock."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        "fh = open(sys.argv[1], 'a+b'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(float(sys.argv[2]))"),
        str(smollm2_server.vectors / ".lock"), str(HOLD)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait(30)


def _completion(url: str, name: str) -> tuple[int, str, float]:
    import httpx

    start = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                  "steering": {"vectors": [{"name": name}]}}, timeout=120)
    code = r.json().get("error", {}).get("code") if r.status_code != 200 else "ok"
    return r.status_code, code, time.monotonic() - start


def test_a_held_registry_lock_stalls_no_steered_request(smollm2_server, held_lock):
    url = smollm2_server.url
    _completion(url, "happy")  # warm: the known set is loaded once before the lock is taken
    with ThreadPoolExecutor(13) as pool:
        unknown = [pool.submit(_completion, url, f"missing{i}") for i in range(12)]
        time.sleep(0.2)
        known = pool.submit(_completion, url, "happy").result(timeout=120)
        answers = [f.result(timeout=120) for f in unknown]
    assert known[:2] == (200, "ok") and known[2] < 5, known
    assert all(a[:2] == (400, "unknown_vector") for a in answers), answers
    assert max(a[2] for a in answers) < 5, answers


def test_admin_writes_answer_503_while_another_replica_holds_the_lock(smollm2_server, held_lock):
    import httpx

    start = time.monotonic()  # "formal": no steered model uses it (one that did would be a 409 first)
    r = httpx.delete(f"{smollm2_server.url}/v1/steering/vectors/formal", headers=smollm2_server.admin_headers(),
                     timeout=120)
    took = time.monotonic() - start
    assert r.status_code == 503 and r.json()["error"]["code"] == "registry_busy", r.text
    assert took < HOLD - 5, took  # gave up (VSTEER_REGISTRY_LOCK_TIMEOUT_S), did not wait the lock out
    assert "formal" in [e["name"] for e in httpx.get(f"{smollm2_server.url}/v1/steering/vectors",
                                                    timeout=30).json()["data"]]
