"""Tensor parallelism 2 on CPU (one core per rank): each rank adds the same vector to its
replicated residual stream, so a steered request gives the TP=1 (= HF reference) tokens."""

from __future__ import annotations

import os

import pytest
import torch

from reference import hf_reference, shutdown_llm
from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.serving import set_vectors_dir, steering

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")


def test_tp2_matches_tp1(tiny_model_path, tiny_hf, tmp_path, monkeypatch):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("TP=2 needs two cores")
    g = torch.Generator().manual_seed(7)
    reg = VectorRegistry(tmp_path)
    reg.add("a", SteeringVectorSet("a", {1: torch.randn(128, generator=g) * 0.6, 3: torch.randn(128, generator=g)}))
    set_vectors_dir(tmp_path)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model, tok = tiny_hf
    resolver = SteeringResolver(reg, hidden_size=128, num_layers=4)
    specs = [{"vectors": [{"name": "a", "strength": 1.0}]},
             {"vectors": [{"name": "a", "strength": -2.0, "layers": [3]}], "positions": "generated"}, None]
    ids = [tok(p)["input_ids"] for p in ("The weather today is", "Once upon a time", "My favourite food is")]
    llm = vllm.LLM(tiny_model_path, dtype="float32", tensor_parallel_size=2, enforce_eager=True,
                   gpu_memory_utilization=0.3, max_model_len=512, seed=0)
    try:
        outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                            [vllm.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                 extra_args=steering(s) if s else None) for s in specs],
                            use_tqdm=False)
    finally:
        shutdown_llm(llm)
    for prompt_ids, spec, out in zip(ids, specs, outs):
        assert list(out.outputs[0].token_ids) == hf_reference(model, prompt_ids, spec, resolver, 24).tokens, spec
