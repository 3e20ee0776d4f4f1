"""Contrast pairs for a concept from a list of words (``vsteer pairs topic``).

A topic vector needs texts that differ in their topic and in nothing else. Each pair
fills one sentence template twice: the positive with words of the concept ("Let me tell
you about the tide and coral reefs."), the negative with words of an everyday contrast
topic swapped into the same slots ("Let me tell you about taxes and receipts."). The
template, its length and its grammar are shared, so the mean difference keeps the topic.

Contrast topics come from ``extract/data/topics.jsonl`` (everyday subjects: offices,
traffic, furniture, ...; the bundled evaluation concepts ocean, cooking and space are
kept out of the contrasts so their vectors do not push against each other).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

from .pairs import ContrastPair, ContrastPairDataset

# {a}, {b}, {c}: distinct words of one topic. No template starts with a slot, so user
# words need no capitalisation.
TEMPLATES: tuple[str, ...] = (
    "Let me tell you about {a}.",
    "I have been reading about {a}, {b} and {c} all week.",
    "My favourite subject is {a}, especially {b}.",
    "Whenever I close my eyes I think of {a} and {b}.",
    "Today's lesson is all about {a}, {b} and {c}.",
    "The best part of the trip was learning about {a}.",
    "She wrote a long essay on {a} and {b}.",
    "Our conversation quickly turned to {a}.",
    "There is so much to say about {a}: {b}, {c}, and more.",
    "He has a whole shelf of books about {a}.",
    "If I could study one thing, it would be {a}.",
    "The documentary was about {a} and {b}.",
    "I dreamed about {a} last night.",
    "Here is a short story about {a} and {b}.",
    "The museum had a new exhibit on {a}.",
    "We spent the evening talking about {a}, {b} and {c}.",
    "My notes are full of ideas about {a}.",
    "Nothing fascinates me more than {a}.",
    "The podcast episode covered {a} and {c}.",
    "Every picture on my wall shows {a} or {b}.",
    "The answer has everything to do with {a}.",
    "I wrote a poem about {a} and {b}.",
    "The children asked a hundred questions about {a}.",
    "Think of {a}, {b}, and {c}.",
    "This reminds me of {a}.",
    "My grandfather loved to talk about {a}.",
    "The class project was a model of {a}.",
    "All I can think about is {a} and {b}.",
    "The magazine's cover story was on {a}.",
    "First, a few words about {a}, then about {b}.",
    "Sure! Here is what I know about {a} and {b}.",
    "Great question. It reminds me of {a}, {b} and {c}.",
)


@dataclass(frozen=True)
class Topic:
    name: str
    words: tuple[str, ...]
    contrast: bool
    """An everyday topic used for the negatives by default."""


def bundled_topics() -> dict[str, Topic]:
    """The topics of ``extract/data/topics.jsonl`` by name."""
    text = resources.files("vsteer.extract").joinpath("data", "topics.jsonl").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["topic"]] = Topic(rec["topic"], tuple(rec["words"]), bool(rec.get("contrast", True)))
    return out


def _clean_words(words: Sequence[str]) -> list[str]:
    out = []
    for w in words:
        w = " ".join(str(w).split())
        if w and w not in out:
            out.append(w)
    return out


def _pick(rng: random.Random, words: Sequence[str], k: int) -> list[str]:
    """k distinct words when there are enough, else with repeats (shuffled)."""
    if len(words) >= k:
        return rng.sample(list(words), k)
    return [rng.choice(list(words)) for _ in range(k)]


def topic_pairs(words: Sequence[str], *, name: str = "topic", n: int = 64,
                contrast: Sequence[str] | None = None, contrast_words: Sequence[str] | None = None,
                prompt: str = "", seed: int = 0, templates: Sequence[str] = TEMPLATES) -> ContrastPairDataset:
    """``n`` pairs: each template filled with the concept's ``words`` (positive) and with
    the words of one contrast topic (negative), cycling through templates and topics.

    ``contrast`` names bundled topics (default: every everyday topic); ``contrast_words``
    gives one contrast list of your own instead. A contrast word that is also a concept
    word is dropped. ``prompt`` is shared by every pair (empty: plain sentences)."""
    concept = _clean_words(words)
    if not concept:
        raise ValueError("give at least one concept word")
    if n < 1:
        raise ValueError("n must be >= 1")
    if not templates:
        raise ValueError("no templates")
    lowered = {w.lower() for w in concept}
    if contrast_words is not None:
        groups = [[w for w in _clean_words(contrast_words) if w.lower() not in lowered]]
        labels = ["custom"]
    else:
        topics = bundled_topics()
        names = list(contrast) if contrast is not None else [t.name for t in topics.values() if t.contrast]
        unknown = [c for c in names if c not in topics]
        if unknown:
            raise ValueError(f"unknown contrast topics {unknown}; bundled: {', '.join(sorted(topics))}")
        groups = [[w for w in topics[c].words if w.lower() not in lowered] for c in names]
        labels = names
    kept = [(label, g) for label, g in zip(labels, groups) if g]
    if not kept:
        raise ValueError("no contrast words left (every one is also a concept word)")
    rng = random.Random(seed)
    order = list(range(len(templates)))
    rng.shuffle(order)
    pairs = []
    for i in range(n):
        template = templates[order[i % len(order)]]
        label, group = kept[i % len(kept)]
        pos = dict(zip("abc", _pick(rng, concept, 3)))
        neg = dict(zip("abc", _pick(rng, group, 3)))
        pairs.append(ContrastPair(template.format(**pos), template.format(**neg), prompt,
                                  {"template": template, "contrast": label}))
    return ContrastPairDataset(pairs, name=name, description=f"topic pairs for {name!r} from "
                               f"{len(concept)} words against {len(kept)} contrast topic(s)",
                               source=f"vsteer pairs topic (seed {seed})")


def concept_pairs(name: str, *, n: int = 64, seed: int = 0) -> ContrastPairDataset:
    """Topic pairs for one of the bundled topics (``ocean``, ``cooking``, ``space``, ...)."""
    topics = bundled_topics()
    if name not in topics:
        raise KeyError(f"no bundled topic {name!r}; bundled: {', '.join(sorted(topics))}")
    return topic_pairs(topics[name].words, name=name, n=n, seed=seed)
