"""A user's own concept, given on the command line or in a small scorer file.

``vsteer eval`` / ``vsteer tune`` score a concept they have never seen from:

* ``--keywords "dinosaurs,fossils,t-rex"``: the concept rate is the share of answers that
  contain any keyword (a whole word or phrase, case-insensitive); ``--regex`` adds
  patterns;
* ``--scorer FILE``: a JSON object with ``name``, ``concept`` (the phrase the prompting
  templates are filled with), ``keywords`` and/or ``regexes`` (a concept rate), or
  ``probes`` (log-probability probes: a list of ``{prompt, positive[], negative[]}`` or a
  JSONL file path relative to the scorer file), and optionally ``system_prompt`` (one or
  a list), ``description`` and ``prompts`` (a prompt file, relative to the scorer file).

The prompting baseline is tuned like steering: ``PROMPT_TEMPLATES`` filled with the
concept (plus any system message given) are tried on the ``select`` prompts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Collection, Sequence

from .behaviours import PROMPT_TEMPLATES, Behaviour
from .inputs import Probe, load_probes
from .scorers import TextScorer, words

CONCEPT_PROMPTS = "concept_prompts.jsonl"


def keyword_pattern(keywords: Collection[str], regexes: Collection[str] = ()) -> re.Pattern[str]:
    """One case-insensitive pattern: any keyword as a whole word or phrase (letters on
    neither side), or any of ``regexes``."""
    parts = [r"(?<![a-z])" + r"\s+".join(map(re.escape, k.lower().split())) + r"(?![a-z])"
             for k in keywords if k.strip()]
    for rx in regexes:
        try:
            re.compile(rx)
        except re.error as e:
            raise ValueError(f"invalid regex {rx!r}: {e}") from None
        parts.append(f"(?:{rx})")
    if not parts:
        raise ValueError("a concept scorer needs at least one keyword or regex")
    return re.compile("|".join(parts), re.IGNORECASE)


def match_rate(keywords: Collection[str], regexes: Collection[str] = ()) -> TextScorer:
    """1 if a generation mentions the concept (``keyword_pattern``), else 0."""
    pattern = keyword_pattern(keywords, regexes)

    def score(text: str, n_tokens: int, max_new_tokens: int) -> float:
        return 1.0 if pattern.search(text.replace("\u2019", "'")) else 0.0
    return score


def match_density(keywords: Collection[str], regexes: Collection[str] = ()) -> TextScorer:
    """Matches per 100 generated words."""
    pattern = keyword_pattern(keywords, regexes)

    def score(text: str, n_tokens: int, max_new_tokens: int) -> float:
        n = len(words(text))
        return 100.0 * len(pattern.findall(text)) / n if n else 0.0
    return score


def fill_templates(concept: str, templates: Sequence[str] = PROMPT_TEMPLATES) -> tuple[str, ...]:
    return tuple(t.format(concept=concept) for t in templates)


def concept_behaviour(name: str, keywords: Sequence[str] = (), regexes: Sequence[str] = (), *,
                      concept: str | None = None, system_prompts: Sequence[str] = (), description: str = "",
                      prompts_file: str = CONCEPT_PROMPTS) -> Behaviour:
    """A concept-rate behaviour from keywords/regexes; its prompting candidates are the
    given ``system_prompts`` and the templates filled with ``concept`` (default: the
    first keyword)."""
    keys = [k.strip() for k in keywords if k.strip()]
    phrase = concept or (keys[0] if keys else name)
    candidates = tuple(dict.fromkeys([*system_prompts, *fill_templates(phrase)]))
    what = ", ".join(filter(None, [f"{len(keys)} keywords" if keys else "", f"{len(regexes)} regexes" if regexes
                                   else ""]))
    return Behaviour(name, "generation", f"share of answers that mention {description or phrase} ({what})", "rate",
                     0.2, text_scorer=match_rate(keys, regexes),
                     extra_text_scorers={"keyword_density": match_density(keys, regexes)},
                     prompts_file=prompts_file, system_prompt=candidates[0], keywords=tuple(keys),
                     concept=phrase, system_prompts=candidates)


def _strings(value: Any, what: str, source: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{source}: {what} must be a string or a list of strings")


def load_scorer(path: str | Path, name: str | None = None) -> Behaviour:
    """A behaviour from a scorer file (see the module doc)."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the scorer file {p}: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{p}: a scorer file holds one JSON object")
    unknown = set(spec) - {"name", "concept", "description", "keywords", "regexes", "probes", "system_prompt",
                           "system_prompts", "prompts"}
    if unknown:
        raise ValueError(f"{p}: unknown keys {sorted(unknown)}")
    label = name or str(spec.get("name") or p.stem.split(".")[0])
    systems = _strings(spec.get("system_prompt"), "system_prompt", str(p)) + \
        _strings(spec.get("system_prompts"), "system_prompts", str(p))
    prompts = str(p.parent / spec["prompts"]) if spec.get("prompts") else CONCEPT_PROMPTS
    keys, rxs = _strings(spec.get("keywords"), "keywords", str(p)), _strings(spec.get("regexes"), "regexes", str(p))
    if spec.get("probes") is not None:
        if keys or rxs:
            raise ValueError(f"{p}: give either probes (log-probability) or keywords/regexes (concept rate)")
        probes = spec["probes"]
        items = load_probes(str(p.parent / probes)) if isinstance(probes, str) else _inline_probes(probes, str(p))
        return Behaviour(label, "logprob", f"mean log p(positive) - mean log p(negative) over the probes of {p}",
                         "nats", 1.0, probes=tuple(items), system_prompt=systems[0] if systems else None,
                         system_prompts=tuple(systems), prompts_file=prompts)
    return concept_behaviour(label, keys, rxs, concept=spec.get("concept"), system_prompts=systems,
                             description=str(spec.get("description") or ""), prompts_file=prompts)


def _inline_probes(items: Any, source: str) -> list[Probe]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: probes must be a non-empty list of {{prompt, positive, negative}}")
    out = []
    for i, rec in enumerate(items):
        try:
            out.append(Probe(str(rec["prompt"]), list(rec["positive"]), list(rec["negative"])))
        except (KeyError, TypeError):
            raise ValueError(f"{source}: probe {i + 1} needs prompt, positive[], negative[]") from None
        if not out[-1].positive or not out[-1].negative:
            raise ValueError(f"{source}: probe {i + 1} has an empty positive or negative list")
    return out
