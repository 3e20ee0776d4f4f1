"""No request's steering leaks into another's: 256 requests (32 prompts x 8 configs that
mix registry names, inline data, several vectors, every position rule and operator,
strengths up to 8) at concurrency 64 through a real server, greedy; every output equals
the same request run alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from served import MODEL, random_vector
from vsteer.engine import encode_inline

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2]
NEW_TOKENS = 10
PROMPTS = [
    "Describe your ideal weekend.", "What is the capital of France?", "Tell me about the ocean.",
    "How do I bake bread?", "Write one sentence about cats.", "What do you think of rainy days?",
    "Give me a tip for studying.", "Describe a busy city street.", "What is your favourite season?",
    "Explain what a planet is.", "How was your day?", "Recommend a book.", "What makes a good friend?",
    "Describe the taste of coffee.", "Why do leaves change colour?", "Tell me a fact about the moon.",
    "What should I cook tonight?", "How do trains work?", "Describe a forest at night.",
    "What is music for?", "Tell me about your morning.", "How do I stay calm?", "What is a good hobby?",
    "Describe a mountain.", "What do dogs like?", "Summarise a football match.", "What is the weather like?",
    "Why is the sky blue?", "How do you make tea?", "Describe a market.", "What is a museum?",
    "Tell me about the desert.",
]
INLINE = encode_inline(random_vector(77, 8.0))
CONFIGS = [
    None,
    {"vectors": [{"name": "formal", "strength": 4.0}]},
    {"vectors": [{"name": "happy", "strength": -8.0}], "positions": "generated"},
    {"vectors": [{"name": "mine", "strength": 3.0, "data": {"12": INLINE}}], "positions": "prompt"},
    {"vectors": [{"name": "formal", "strength": 2.0, "layers": [8, 10]}, {"name": "happy", "strength": 6.0}],
     "positions": "first"},
    {"vectors": [{"name": "happy", "strength": 8.0}], "positions": "last"},
    {"vectors": [{"name": "formal", "op": "ablate", "layers": [10]}, {"name": "happy", "strength": 5.0}]},
    {"vectors": [{"name": "formal", "op": "clamp", "strength": 2.0, "layers": [12]},
                 {"name": "mine", "strength": 6.0, "norm": "preserve", "data": {"8": INLINE}}]},
]


def _complete(url: str, prompt: str, steering) -> str:
    import httpx

    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text[:500]
    return r.json()["choices"][0]["text"]


def test_mixed_batch_equals_each_request_alone(smollm2_server):
    url = smollm2_server.url
    jobs = [(p, c) for p in PROMPTS for c in range(len(CONFIGS))]
    with ThreadPoolExecutor(64) as pool:
        batched = list(pool.map(lambda job: _complete(url, job[0], CONFIGS[job[1]]), jobs))
    alone = [_complete(url, p, CONFIGS[c]) for p, c in jobs]
    mismatches = [(p, c, b, a) for (p, c), b, a in zip(jobs, batched, alone) if b != a]
    unsteered = [m for m in mismatches if m[1] == 0]
    # Batch invariance first: if unsteered requests differ between a batch and alone, the
    # CPU kernels are not batch-invariant and steering cannot be judged this way.
    assert not unsteered, f"vLLM's CPU kernels are not batch-invariant here: {unsteered[:3]}"
    assert not mismatches, f"{len(mismatches)} of {len(jobs)} steered outputs differ from running alone: " \
                           f"{mismatches[:3]}"
    # and steering did something: every steered config changes some output
    by_config = {c: [b for (p, cc), b in zip(jobs, batched) if cc == c] for c in range(len(CONFIGS))}
    for c in range(1, len(CONFIGS)):
        assert by_config[c] != by_config[0], f"config {c} changed nothing"
