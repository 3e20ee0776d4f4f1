"""What ``vsteer eval`` can score: each behaviour's scorer, its held-out inputs and its
prompting baseline (a system message asking for the behaviour).

Bundled: ``sentiment`` (log-probability probes), ``formality``, ``refusal``,
``conciseness`` (generation rules, ``scorers``), and the concepts of
``eval/data/concepts.jsonl`` (``ocean``, ``cooking``, ``space``): the share of
generations for concept-neutral prompts (``eval/data/concept_prompts.jsonl``) that use at
least one of the concept's keywords.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Sequence

from . import scorers
from .scorers import TextScorer

DEFAULT_PROMPTS = "eval_prompts.jsonl"
PROMPT_TEMPLATES: tuple[str, ...] = (
    "You love {concept}. Whatever you are asked, talk about {concept}.",
    "Whatever the user asks, make your answer about {concept}.",
    "You are obsessed with {concept}: mention {concept} in every answer, whatever the question.",
    "Answer the user's question, and always bring {concept} into your answer.",
)
"""System-message templates for a concept's prompting baseline (fixed before the held-out
study, issue 22): ``vsteer tune`` tries each, filled with the concept, on the select prompts."""


@dataclass(frozen=True)
class Behaviour:
    """How to score one behaviour; ``kind`` is ``logprob`` or ``generation``."""

    name: str
    kind: str
    description: str
    unit: str
    target_delta: float                       # default trade-off target: change vs unsteered
    probe_file: str | None = None             # bundled probes (logprob kind)
    text_scorer: TextScorer | None = None     # generation kind: the behaviour score
    extra_text_scorers: dict[str, TextScorer] = field(default_factory=dict)  # reported beside it
    prompts_file: str = DEFAULT_PROMPTS       # generation prompts (held out from the pairs)
    system_prompt: str | None = None
    """The prompting baseline: a system message asking for the behaviour (the + direction).
    Log-probability probes get it as a plain-text line before the probe."""
    keywords: tuple[str, ...] = ()            # concept behaviours: the scorer's word list
    concept: str | None = None                # concept behaviours: the phrase prompting templates name
    system_prompts: tuple[str, ...] = ()
    """Candidate system messages ``vsteer tune`` chooses the prompting baseline from (on the
    select prompts); ``system_prompt`` is the first. Concepts: ``concepts.PROMPT_TEMPLATES``."""
    probes: tuple[Any, ...] | None = None     # log-probability probes given inline (a scorer file)

    def __post_init__(self) -> None:
        if self.system_prompt and not self.system_prompts:
            object.__setattr__(self, "system_prompts", (self.system_prompt,))

    def with_system_prompt(self, text: str | None) -> "Behaviour":
        return replace(self, system_prompt=text, system_prompts=(text,) if text else ())

    def with_system_prompts(self, texts: Sequence[str]) -> "Behaviour":
        """Several candidates (the first is the single baseline of ``vsteer eval``)."""
        texts = tuple(dict.fromkeys(t for t in texts if t))
        return replace(self, system_prompt=texts[0] if texts else None, system_prompts=texts)


def _concepts() -> dict[str, Behaviour]:
    text = resources.files("vsteer.eval").joinpath("data", "concepts.jsonl").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        keys = tuple(rec["keywords"])
        templates = tuple(t.format(concept=rec["concept"]) for t in PROMPT_TEMPLATES)
        out[rec["name"]] = Behaviour(
            rec["name"], "generation",
            f"share of answers to concept-neutral prompts that mention {rec['description']} (any of "
            f"{len(keys)} keywords)", "rate", 0.2, text_scorer=scorers.concept_rate(keys),
            extra_text_scorers={"keyword_density": scorers.keyword_density(keys)},
            prompts_file="concept_prompts.jsonl", system_prompt=rec["system_prompt"], keywords=keys,
            concept=rec["concept"], system_prompts=(rec["system_prompt"], *templates))
    return out


BEHAVIOURS: dict[str, Behaviour] = {
    "sentiment": Behaviour(
        "sentiment", "logprob",
        "mean over held-out probes of mean log p(positive word) - mean log p(negative word) for the next token",
        "nats", 1.0, probe_file="sentiment_eval.jsonl",
        extra_text_scorers={"sentiment_lexicon": scorers.sentiment_lexicon},
        system_prompt="Always answer in a warm, cheerful and enthusiastic tone, and say what you love about things."),
    "formality": Behaviour(
        "formality", "generation", "formal minus casual lexicon markers per 100 generated words",
        "markers/100 words", 2.0, text_scorer=scorers.formality_lexicon,
        system_prompt="Answer in a formal, professional register, without contractions or slang."),
    "refusal": Behaviour(
        "refusal", "generation", "share of generations that open with a refusal phrase",
        "rate", 0.25, text_scorer=scorers.refusal_rate,
        system_prompt="Politely decline every request: say that you cannot help with it."),
    "conciseness": Behaviour(
        "conciseness", "generation", "1 - generated tokens / max_new_tokens (higher: stops sooner)",
        "fraction", 0.2, text_scorer=scorers.conciseness,
        system_prompt="Answer in one short sentence."),
    **_concepts(),
}


def get_behaviour(name: str) -> Behaviour:
    if name not in BEHAVIOURS:
        raise KeyError(f"unknown behaviour {name!r}; known: {', '.join(sorted(BEHAVIOURS))} "
                       "(or give --probes FILE for a log-probability behaviour)")
    return BEHAVIOURS[name]


def probe_behaviour(name: str, path: str) -> Behaviour:
    """A log-probability behaviour from a user's probe file ({prompt, positive, negative})."""
    return Behaviour(name, "logprob", f"mean log p(positive) - mean log p(negative) over the probes of {path}",
                     "nats", 1.0, probe_file=path)
