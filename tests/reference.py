"""The HF reference a vLLM result must equal: one request alone, greedy, through the same
resolved steering (``SpecInjector``), no padding."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from vsteer.engine import SpecInjector, SteeringResolver


@dataclass
class Reference:
    tokens: list[int]
    first_logprobs: torch.Tensor  # log-softmax over the vocabulary for the first generated token


def hf_reference(model, prompt_ids: list[int], spec, resolver: SteeringResolver, max_new_tokens: int) -> Reference:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad(), SpecInjector(model, resolver.resolve(spec)):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return Reference(tokens, torch.log_softmax(out.logits[0][0].float(), dim=-1))


def shutdown_llm(llm) -> None:
    """Stop a vllm.LLM's engine processes now (tests share few cores)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
