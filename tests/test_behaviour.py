"""A real behavioural test on SmolLM2-135M-Instruct: a sentiment vector from the bundled
pairs, added at a middle layer, moves log p(positive) - log p(negative) continuations of
held-out prompts up with a positive strength and down with a negative one."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from vsteer.engine import ActivationInjector

pytestmark = pytest.mark.smollm2


def _eval_items():
    text = resources.files("vsteer.eval").joinpath("data/sentiment_eval.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _sentiment_margin(model, tok, items) -> float:
    """Mean over prompts of mean log p(positive word) - mean log p(negative word)."""
    margins = []
    for item in items:
        ids = tok(item["prompt"], return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
        first = lambda words: [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]  # noqa: E731
        margins.append(logp[first(item["positive"])].mean() - logp[first(item["negative"])].mean())
    return float(torch.stack(margins).mean())


def test_sentiment_vector_steers_held_out_prompts(smollm2_hf, smollm2_vectors):
    model, tok = smollm2_hf
    items = _eval_items()
    vector = smollm2_vectors.load("sentiment")[10]
    base = _sentiment_margin(model, tok, items)
    with ActivationInjector(model, vector, strength=4.0):
        up = _sentiment_margin(model, tok, items)
    with ActivationInjector(model, vector, strength=-4.0):
        down = _sentiment_margin(model, tok, items)
    print(f"sentiment margin: -4: {down:.2f}  0: {base:.2f}  +4: {up:.2f}")
    assert up > base + 0.5, (down, base, up)
    assert down < base - 0.5, (down, base, up)
