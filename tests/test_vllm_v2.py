"""Model Runner V2 end to end on this CPU: vLLM's CPU build runs V2 when Triton has a CPU
backend; ``scripts/v2cpu`` gives it Triton's interpreter (every Triton kernel in numpy,
slow but exact), so the tiny model runs through the real V2 runner here, with vsteer's V2
adapter choosing itself from the runner vLLM built. A mixed batch (unsteered and
differently steered requests, prompts longer than the token budget so they are chunked)
must equal the HF reference request by request.

The engine runs in its own process (the interpreter backend must be in place before vLLM
decides its runner), eager, on 4 short requests: about two minutes on CI's cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference import hf_reference
from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry, encode_inline

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")
ROOT = Path(__file__).resolve().parents[1]
TOKENS = 6


def _vector(seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(128, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def test_mixed_batch_on_model_runner_v2_matches_hf(tiny_model_path, tiny_hf, tmp_path):
    model, tok = tiny_hf
    (tmp_path / "vectors").mkdir()
    reg = VectorRegistry(tmp_path / "vectors")
    reg.add("a", SteeringVectorSet("a", {1: _vector(1, 6.0), 2: _vector(2, 6.0)}))
    long_prompt = tok("Once upon a time " * 12)["input_ids"]  # over the 32-token budget: chunked prefill
    specs = [
        {"ids": tok("The weather today is")["input_ids"], "spec": None},
        {"ids": long_prompt, "spec": {"vectors": [{"name": "a", "strength": 1.5}]}},
        {"ids": tok("My favourite food is")["input_ids"],
         "spec": {"vectors": [{"name": "a", "strength": -2.0, "layers": [2]}], "positions": "generated"}},
        {"ids": tok("In the beginning")["input_ids"],
         "spec": {"vectors": [{"name": "inline", "strength": 1.0, "data": {"3": encode_inline(_vector(3, 9.0))}}],
                  "positions": "prompt"}},
    ]
    for s in specs:
        s["tokens"] = TOKENS
    specs_file = tmp_path / "specs.json"
    specs_file.write_text(json.dumps(specs))
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLLM_USE_V2_MODEL_RUNNER": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts" / "v2cpu"), str(ROOT / "tests"),
                                          os.environ.get("PYTHONPATH", "")]),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VSTEER_VECTORS_DIR": str(reg.root)}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "v2cpu" / "steer_on_v2.py"), tiny_model_path,
                          str(reg.root), str(specs_file)], env=env, capture_output=True, text=True, timeout=1500)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    got = json.loads(lines[-1].removeprefix("RESULT "))
    assert got["use_v2_model_runner"] and set(got["adapters"]) == {"v2"}, got
    assert got["steered_tokens"] > 0
    resolver = SteeringResolver(reg, hidden_size=128, num_layers=4)
    for s, out in zip(specs, got["outputs"]):
        ref = hf_reference(model, s["ids"], s["spec"], resolver, TOKENS)
        assert out["tokens"] == ref.tokens, (s["spec"], out["tokens"], ref.tokens)
        for token, logprob in out["first"].items():
            assert abs(ref.first_logprobs[int(token)].item() - logprob) < 1e-3
    plain = hf_reference(model, specs[1]["ids"], None, resolver, TOKENS).tokens
    assert got["outputs"][1]["tokens"] != plain  # steering changed it
