"""The held-out protocol's data (issue 22, eval/data/heldout/README.md): at least three
held-out concepts with pairs, prompts and scorers; prompts that name no concept; pairs
that are exactly what `vsteer pairs topic --words` makes."""

from __future__ import annotations

import json
from importlib import resources

from vsteer.eval.behaviours import BEHAVIOURS
from vsteer.eval.concepts import keyword_pattern, load_scorer
from vsteer.eval.inputs import load_prompts
from vsteer.extract import ContrastPairDataset
from vsteer.extract.concepts import topic_pairs

HELD = resources.files("vsteer.eval").joinpath("data", "heldout")
DEV = ("ocean", "cooking", "space")


def _concepts() -> list[dict]:
    return [json.loads(line) for line in HELD.joinpath("concepts.jsonl").read_text().splitlines() if line.strip()]


def test_three_held_out_concepts_apart_from_the_development_ones():
    names = [c["name"] for c in _concepts()]
    assert len(names) >= 3 and not set(names) & set(DEV) and not set(names) & set(BEHAVIOURS)


def test_held_out_pairs_are_the_topic_template_output():
    for c in _concepts():
        saved = ContrastPairDataset.load(str(HELD.joinpath(f"{c['name']}.pairs.jsonl")))
        made = topic_pairs(c["words"], name=c["name"])
        assert [(p.positive, p.negative) for p in saved] == [(p.positive, p.negative) for p in made]


def test_prompts_name_no_concept_and_are_not_the_development_prompts():
    held = load_prompts(str(HELD.joinpath("prompts.jsonl")))
    dev = load_prompts("concept_prompts.jsonl")
    assert len(held) == len(set(held)) >= 64 and not set(held) & set(dev)
    scorers = [load_scorer(str(HELD.joinpath(f"{c['name']}.scorer.json"))) for c in _concepts()]
    patterns = [keyword_pattern(s.keywords) for s in scorers] + [keyword_pattern(BEHAVIOURS[n].keywords) for n in DEV]
    for prompt in held:
        assert not any(p.search(prompt) for p in patterns), prompt
    for prompt in dev:  # the development prompts name no held-out concept either
        assert not any(p.search(prompt) for p in patterns[:len(scorers)]), prompt
    for s, c in zip(scorers, _concepts()):
        assert s.name == c["name"] and s.concept == c["concept"] and s.kind == "generation"
        assert len(s.system_prompts) >= 4 and all(c["concept"] in t for t in s.system_prompts)


def test_bipo_training_requests_are_no_evaluation_prompt_and_name_no_concept():
    """`--method bipo` trains prompt-less pairs as replies to these requests: none may be an
    evaluation prompt, or name a development or held-out concept."""
    from vsteer.extract.centering import load_neutral

    requests = load_neutral(bundled="requests")
    evaluated = set(load_prompts(str(HELD.joinpath("prompts.jsonl")))) | set(load_prompts("concept_prompts.jsonl"))
    evaluated |= set(load_prompts("eval_prompts.jsonl"))
    assert len(requests) == len(set(requests)) == 64
    assert not {r.lower() for r in requests} & {e.lower() for e in evaluated}
    scorers = [load_scorer(str(HELD.joinpath(f"{c['name']}.scorer.json"))) for c in _concepts()]
    patterns = [keyword_pattern(s.keywords) for s in scorers] + [keyword_pattern(BEHAVIOURS[n].keywords) for n in DEV]
    for request in requests:
        assert not any(p.search(request) for p in patterns), request
