"""The scripts in examples/ run as documented (on the tiny model, or the session's server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.server
@pytest.mark.vllm
@pytest.mark.smollm2
def test_openai_client_example(smollm2_server):
    out = _run("openai_client.py", "--base-url", f"{smollm2_server.url}/v1", "--vector", "formal").stdout
    for label in ("chat:", "applied:", "completion:", "stream:", "unsteered:"):
        assert label in out, out


@pytest.mark.server
@pytest.mark.vllm
def test_extract_inspect_serve_example(tmp_path):
    out = _run("extract_inspect_serve.py", "--model", "tiny-llama", "--layers", "1", "--workdir", str(tmp_path),
               "--serve-args", "--enforce-eager --gpu-memory-utilization 0.3 --max-model-len 512 --dtype float32").stdout
    assert "vsteer format" in out and "unsteered:" in out and "+sentiment:" in out, out


def test_research_example():
    out = _run("research_hf.py", "--model", "tiny-llama", "--layer", "1", "--prompts", "4").stdout
    for label in ("unsteered :", "sentiment+:", "composed  :", "only sent-:"):
        assert label in out, out
