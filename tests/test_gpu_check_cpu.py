"""bench/gpu/check_op.py (the GPU readiness check of the steering op) on CPU, as CI runs it:
small shapes, the "full" path that CUDA-graph capture records forced instead of a graph,
vLLM blocked (the op registers through plain torch.library, as on a torch+transformers
GPU box). It must pass, and must have checked what it claims to. And bench/gpu/check_vllm.py
(vsteer inside real vLLM: parity and cost) in its reduced --cpu-smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_passes_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "check_op.py"), "--cpu", "--small",
                           "--no-compile", "--reps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "PASS"
    data = json.loads(out.read_text())
    assert data["passed"] and data["device"] == "cpu" and data["op_registration"] == "torch.library"
    checks = [c["check"] for c in data["checks"]]
    assert all(c["ok"] for c in data["checks"])
    for stack in ("VllmStack", "HfStack"):  # both block output shapes, every batch size, fp32 and bf16
        for n, dtypes in ((1, 2), (5, 1), (24, 2)):
            assert sum(f"{stack} n={n}: full path == eager" in c for c in checks) == dtypes
            assert sum(f"{stack} n={n}: every steered token == apply_plan" in c for c in checks) == dtypes
    assert [(t["hidden"], t["tokens"]) for t in data["timings"]] == [(256, 64)]
    assert all(t["op_add_only_eager_s"] > 0 and t["op_full_path_eager_s"] > 0 for t in data["timings"])


@pytest.mark.vllm
def test_vllm_check_smoke_on_cpu(tmp_path):
    """bench/gpu/check_vllm.py --cpu-smoke: one eager vLLM engine on the tiny model, mixed
    steered/unsteered batches of 1 and 3 equal the HF reference, and the cost phase ran
    its three conditions. It must pass and report what it checked."""
    out = tmp_path / "check_vllm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "check_vllm.py"), "--cpu-smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "PASS"
    data = json.loads(out.read_text())
    assert data["passed"] and data["gpus"] == 0 and len(data["runs"]) == 1
    parity, cost = data["runs"][0]["tasks"]
    assert [b["batch_size"] for b in parity["batches"]] == [1, 3]
    assert all(not b["mismatches"] for b in parity["batches"])
    assert parity["steered_requests"] >= 2 and parity["steered_changed_vs_unsteered_reference"] >= 1
    assert set(cost["conditions"]) == {"nobody_steers", "every_row_adds", "every_row_projects"}
    assert all(c["tokens_per_s"] > 0 for c in cost["conditions"].values())
