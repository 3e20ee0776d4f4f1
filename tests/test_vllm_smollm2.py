"""Parity on SmolLM2-135M-Instruct with a real sentiment vector: a mixed batch through
vLLM equals the HF injector per request (tokens; first-token logprobs within 1e-3)."""

from __future__ import annotations

import pytest

from reference import hf_reference, shutdown_llm
from vsteer.engine import SteeringResolver
from vsteer.serving import set_vectors_dir, steering

pytestmark = [pytest.mark.vllm, pytest.mark.smollm2]
vllm = pytest.importorskip("vllm")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smol(smollm2_path, smollm2_hf, smollm2_vectors):
    set_vectors_dir(smollm2_vectors.root)
    llm = vllm.LLM(smollm2_path, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
                   enforce_eager=True, enable_prefix_caching=True, seed=0)
    yield llm
    shutdown_llm(llm)


SPECS = [
    None,
    {"vectors": [{"name": "sentiment", "strength": 4.0, "layers": [10]}]},
    {"vectors": [{"name": "sentiment", "strength": -4.0, "layers": [10]}]},
    {"vectors": [{"name": "sentiment", "strength": 2.0, "layers": [8, 12]}], "positions": "generated"},
    {"vectors": [{"name": "sentiment", "strength": 3.0, "layers": [12]}], "positions": "prompt"},
    {"vectors": [{"name": "sentiment", "strength": 6.0, "layers": [10]}], "positions": "last"},
    {"vectors": [{"name": "sentiment", "strength": 1.5}]},
    {"vectors": [{"name": "sentiment", "strength": -3.0, "layers": [8]}], "positions": "first"},
]
QUESTIONS = ["How was your day?", "Describe the food at the new restaurant.", "What do you think of Mondays?",
             "Tell me about your neighbour.", "How was the film last night?", "Write a sentence about rain.",
             "What is your opinion of this city?", "How do you feel about the weekend?"]


def test_smollm2_mixed_batch_parity(smol, smollm2_hf, smollm2_vectors):
    model, tok = smollm2_hf
    resolver = SteeringResolver(smollm2_vectors, hidden_size=576, num_layers=30)
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for q in QUESTIONS]
    params = [vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5,
                                  extra_args=steering(s) if s else None) for s in SPECS]
    outs = smol.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    texts = {}
    for prompt_ids, spec, out in zip(ids, SPECS, outs):
        ref = hf_reference(model, prompt_ids, spec, resolver, NEW_TOKENS)
        got = list(out.outputs[0].token_ids)
        assert got == ref.tokens, f"{spec}: vLLM {tok.decode(got)!r} != HF {tok.decode(ref.tokens)!r}"
        for token_id, lp in out.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - ref.first_logprobs[token_id].item()) < 1e-3, (spec, token_id)
        texts[str(spec)] = out.outputs[0].text
    # the same question steered up and down must read differently
    up = smol.generate([{"prompt_token_ids": ids[0]}] * 2,
                       [vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, extra_args=steering(s))
                        for s in (SPECS[1], SPECS[2])], use_tqdm=False)
    assert up[0].outputs[0].text != up[1].outputs[0].text
