"""HF injection: each position mode touches exactly the tokens it names, in the prefill pass
and in every decode step with the KV cache on; vectors on one layer add up."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from vsteer.engine import ActivationInjector, MultiVectorInjector, SteeringVector, SteeringVectorSet
from vsteer.engine.layers import find_decoder_layers

LAYER = 1
HIDDEN = 128


def _vec(seed: int, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * scale


def _decode_and_record(model, steering=None, n_decode: int = 3):
    """Prefill a left-padded batch, then feed fixed tokens one at a time through the KV
    cache; return block LAYER's output per forward (prefill, decode 1, decode 2, ...)."""
    ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17], [0, 0, 21, 22, 23, 24, 25]])
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    recorded: list[torch.Tensor] = []
    block = find_decoder_layers(model)[LAYER]

    def run():
        handle = block.register_forward_hook(lambda m, i, o: recorded.append(
            (o if isinstance(o, torch.Tensor) else o[0]).detach().clone()))
        try:
            cache = DynamicCache()
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            m = mask
            for step in range(n_decode):
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], dim=1)
                p = (m.sum(-1, keepdim=True) - 1)
                model(input_ids=torch.tensor([[30 + step], [40 + step]]), attention_mask=m, position_ids=p,
                      past_key_values=cache, use_cache=True)
        finally:
            handle.remove()

    with torch.no_grad():
        if steering is None:
            run()
        else:
            with steering:
                run()
    return recorded


# padded indices (batch row, index) steered per mode; row 1 has 2 left pads; 7 prompt + 3 decoded
_PROMPT = {(0, i) for i in range(7)} | {(1, i) for i in range(2, 7)}
_GEN = {(r, i) for r in (0, 1) for i in range(7, 10)}
EXPECTED = {
    "all": _PROMPT | _GEN,
    "prompt": _PROMPT,
    "generated": _GEN,
    "first": {(0, 0), (1, 2)},
    "last": {(0, 6), (1, 6)},
}


@pytest.mark.parametrize("positions", sorted(EXPECTED))
def test_positions_touch_exactly_named_tokens(tiny_hf, positions):
    model, _ = tiny_hf
    vec = _vec(0)
    base = _decode_and_record(model)
    steered = _decode_and_record(model, ActivationInjector(model, SteeringVector("t", LAYER, vec), 1.0, positions))
    base_all, steered_all = torch.cat(base, dim=1), torch.cat(steered, dim=1)  # [2, 10, H]
    touched = set()
    for r in range(2):
        for i in range(10):
            delta = steered_all[r, i] - base_all[r, i]
            if torch.equal(steered_all[r, i], base_all[r, i]):
                continue
            assert torch.allclose(delta, vec, atol=1e-4), f"({r},{i}) changed by something other than the vector"
            touched.add((r, i))
    assert touched == EXPECTED[positions]


def test_seed_injection_mode_alias(tiny_hf):
    model, _ = tiny_hf
    inj = ActivationInjector(model, [SteeringVector("t", LAYER, _vec(0))], injection_mode="last")
    assert inj.positions == "last"


def test_vectors_on_one_layer_add_up(tiny_hf):
    model, _ = tiny_hf
    v1, v2 = _vec(1), _vec(2)
    base = torch.cat(_decode_and_record(model, n_decode=1), dim=1)
    both = torch.cat(_decode_and_record(model, ActivationInjector(
        model, [SteeringVector("a", LAYER, v1), SteeringVector("b", LAYER, v2)], 0.5), n_decode=1), dim=1)
    assert torch.allclose(both[0, 3] - base[0, 3], 0.5 * (v1 + v2), atol=1e-4)


def test_multi_vector_injector_strengths_at_run_time(tiny_hf):
    model, _ = tiny_hf
    a = SteeringVectorSet("a", {LAYER: _vec(1)})
    b = SteeringVectorSet("b", {LAYER: _vec(2), 2: _vec(3)})
    inj = MultiVectorInjector(model, [a, b], {"a": 2.0, "b": -1.0})
    base = torch.cat(_decode_and_record(model, n_decode=0), dim=1)
    first = torch.cat(_decode_and_record(model, inj, n_decode=0), dim=1)
    assert torch.allclose(first[0, 0] - base[0, 0], 2.0 * a.vectors[LAYER] - b.vectors[LAYER], atol=1e-4)
    inj.set_strength("b", 0.0)
    second = torch.cat(_decode_and_record(model, inj, n_decode=0), dim=1)
    assert torch.allclose(second[0, 0] - base[0, 0], 2.0 * a.vectors[LAYER], atol=1e-4)
    with pytest.raises(KeyError, match="unknown vector set 'c'"):
        inj.set_strength("c", 1.0)


def test_generated_keeps_prompt_logits_with_generate(tiny_hf):
    model, tok = tiny_hf
    enc = tok(["The weather today is"], return_tensors="pt")
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        plain = model.generate(**enc, **kw)
        with ActivationInjector(model, SteeringVector("t", LAYER, _vec(0, 20.0)), 1.0, "generated"):
            steered = model.generate(**enc, **kw)
        with ActivationInjector(model, SteeringVector("t", LAYER, _vec(0, 20.0)), 1.0, "all"):
            steered_all = model.generate(**enc, **kw)
    assert torch.equal(plain.logits[0], steered.logits[0])         # prompt forward untouched
    assert not torch.equal(plain.logits[1], steered.logits[1])     # generated tokens steered
    assert not torch.equal(plain.logits[0], steered_all.logits[0])


def test_hooks_removed_on_exit(tiny_hf):
    model, tok = tiny_hf
    enc = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
        with ActivationInjector(model, SteeringVector("t", LAYER, _vec(0, 50.0))):
            during = model(**enc).logits
        after = model(**enc).logits
    assert not torch.equal(before, during) and torch.equal(before, after)


def test_layer_out_of_range(tiny_hf):
    model, _ = tiny_hf
    with pytest.raises(ValueError, match="outside the model's 0..3"):
        ActivationInjector(model, SteeringVector("t", 9, _vec(0))).attach()
