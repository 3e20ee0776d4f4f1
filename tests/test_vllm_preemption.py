"""Preemption and recomputation: with a KV cache too small for the batch, vLLM preempts
running requests and later recomputes their prompt + generated tokens as a prefill. The
position rule is absolute, so every steered request still equals its HF reference."""

from __future__ import annotations

import pytest
import torch

from reference import hf_reference, shutdown_llm
from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.serving import set_vectors_dir, steering

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")


def _preemptions(llm) -> float:
    for metric in llm.get_metrics():
        if metric.name == "vllm:num_preemptions":
            return float(getattr(metric, "value", 0) or 0)
    return 0.0


def test_preempted_requests_keep_their_steering(tiny_model_path, tiny_hf, tmp_path):
    g = torch.Generator().manual_seed(11)
    reg = VectorRegistry(tmp_path)
    reg.add("a", SteeringVectorSet("a", {1: torch.randn(128, generator=g) * 0.6, 2: torch.randn(128, generator=g)}))
    set_vectors_dir(tmp_path)
    model, tok = tiny_hf
    resolver = SteeringResolver(reg, hidden_size=128, num_layers=4)
    modes = ["all", "prompt", "generated", "first", "last"]
    specs = [None] + [{"vectors": [{"name": "a", "strength": 1.0 + i / 2}], "positions": m}
                      for i, m in enumerate(modes)]
    specs = specs * 2
    prompts = [tok(f"Story number {i}: once upon a time in a land far away")["input_ids"] for i in range(len(specs))]
    lengths = [40 + 4 * (i % 5) for i in range(len(specs))]  # requests finish at different steps
    llm = vllm.LLM(tiny_model_path, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
                   max_model_len=256, block_size=32, num_gpu_blocks_override=12, max_num_seqs=12,
                   disable_log_stats=False, seed=0)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                 extra_args=steering(s) if s else None)
                             for s, n in zip(specs, lengths)], use_tqdm=False)
        preempted = _preemptions(llm)
    finally:
        shutdown_llm(llm)
    assert preempted > 0, "the KV cache should have been too small for the batch"
    for prompt_ids, spec, n, out in zip(prompts, specs, lengths, outs):
        assert list(out.outputs[0].token_ids) == hf_reference(model, prompt_ids, spec, resolver, n).tokens, spec
