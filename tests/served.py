"""One real `vsteer serve` process on SmolLM2-135M-Instruct (enforce eager) for the whole
test session, shared by tests/test_server.py, the reliability suite and the monitoring
test: starting vLLM costs about a minute on CI's two cores.

Its registry starts with ``formal`` (layers 8, 10, 12) and ``happy`` (layer 10), random
directions of norm 8, and a staged set ``incoming/calm`` for loading by path. Tests that
add or remove vectors use names of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vsteer.engine import SteeringVectorSet, VectorRegistry

MODEL = "smollm2-135m-instruct"
HIDDEN, LAYERS = 576, 30
UPLOAD_LIMIT = 1 << 20  # the server refuses admin bodies over 1 MiB
ADMIN_KEY = "test-admin-key-0123456789"
MAX_NUM_SEQS = 64
START_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_vector(seed: int, norm: float, hidden: int = HIDDEN) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def vector_set(behaviour: str, layers: dict[int, int], norm: float = 8.0, hidden: int = HIDDEN,
               num_layers: int = LAYERS) -> SteeringVectorSet:
    """Random directions (``layer: seed``) of norm ``norm``, with residual norms recorded."""
    vectors = {layer: random_vector(seed, norm, hidden) for layer, seed in layers.items()}
    return SteeringVectorSet(behaviour, vectors, model_id=MODEL, num_layers=num_layers,
                             residual_norms={layer: 40.0 for layer in layers})


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, vectors: Path, log: Path):
        self.proc, self.url, self.vectors, self.log = proc, url, vectors, log
        self.children: list[int] = []

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def admin_headers(self, key: str | None = ADMIN_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}


def start_server(root: Path, *, extra_env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 model: str = MODEL, start_timeout: float = START_TIMEOUT) -> Server:
    """Start a server on 127.0.0.1 and wait until it is healthy (fails the test otherwise)."""
    import httpx
    import psutil

    vectors = root / "vectors"
    vectors.mkdir(exist_ok=True)
    log = root / "server.log"
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VSTEER_METRICS_REFRESH_S": "3", "VSTEER_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
           "VSTEER_ADMIN_KEY": ADMIN_KEY, "VSTEER_MAX_REQUEST_INLINE_BYTES": str(256 << 10), **(extra_env or {})}
    cmd = [sys.executable, "-m", "vsteer.cli.main", "serve", model, "--vectors", str(vectors),
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--gpu-memory-utilization", "0.3", "--max-model-len", "1024", "--dtype", "float32", "--seed", "0",
           "--max-num-seqs", str(MAX_NUM_SEQS), *(extra_args or [])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(proc, f"http://127.0.0.1:{port}", vectors, log)
    deadline = time.monotonic() + start_timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} during start-up:\n{srv.tail()}")
        try:
            if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(srv)
            pytest.fail(f"the server did not become healthy in {start_timeout}s:\n{srv.tail()}")
        time.sleep(1)
    srv.children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    return srv


def stop_server(srv: Server) -> None:
    import psutil

    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(srv.proc.pid, signal.SIGKILL)  # our own session only
            srv.proc.wait(10)
    for pid in srv.children:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def seed_registry(vectors: Path) -> None:
    vectors.mkdir(parents=True, exist_ok=True)
    reg = VectorRegistry(vectors)
    reg.add("formal", vector_set("formal", {8: 1, 10: 2, 12: 3}))
    reg.add("happy", vector_set("happy", {10: 4}))
    # a staged set inside the vectors dir (not itself a registry entry), for POST by path
    (vectors / "incoming").mkdir()
    VectorRegistry(vectors / "incoming").add("calm", vector_set("calm", {9: 5}))
