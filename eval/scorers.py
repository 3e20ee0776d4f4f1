"""Behaviour and coherence scorers for ``vsteer eval``: pure functions of token ids,
log-probabilities and text, so every backend (vLLM, HF) feeds the same code.

Behaviours come in two kinds:

* ``logprob``: a probe prompt ends right before an evaluative word; the per-probe score
  is mean log p(positive continuations) - mean log p(negative continuations) (a
  continuation's log-probability is the sum over its tokens). Bundled: ``sentiment``.
* ``generation``: a small lexicon / length rule over greedy generations of neutral
  prompts, for behaviours that no single next token captures (formality, refusal,
  conciseness). Lexicon scores are crude: they show direction and rough size, not quality.

Coherence of a generation: its perplexity under the *unsteered* model and distinct-n.
Which scorer belongs to which behaviour (and its prompting baseline) is ``behaviours``.
"""

from __future__ import annotations

import math
import random
import re
from typing import Callable, Collection, Sequence

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case words (apostrophes kept inside words: "don't")."""
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


# -- lexicons --------------------------------------------------------------------------
# Short, hand-written lists. They are deliberately plain: a hit rate per 100 words.
SENTIMENT_POSITIVE = frozenset("""
good great love loved lovely wonderful amazing excellent fantastic happy joy joyful delightful delicious
beautiful best brilliant perfect pleasant enjoy enjoyed enjoyable fun glad nice awesome superb warm kind
favourite favorite grateful thankful gorgeous cheerful smile smiled exciting excited charming fabulous
""".split())
SENTIMENT_NEGATIVE = frozenset("""
bad terrible awful horrible hate hated worst disgusting sad angry poor boring annoying gross ugly nasty
miserable dreadful unpleasant disappointing disappointed painful rude cold gloomy hostile stupid
useless unhappy upset fear afraid broken dirty tired pathetic ruined waste
""".split())
FORMAL_MARKERS = frozenset("""
therefore furthermore moreover however regarding kindly sincerely respectfully regret unfortunately
accordingly additionally consequently nevertheless approximately assist request require inform
appreciate apologise apologize convenience commitment opportunity ensure provide receive sufficient
shall would whom hereby thus indeed pleased attend regards dear
""".split())
CASUAL_MARKERS = frozenset("""
hey hi yeah yep nope gonna wanna gotta kinda sorta lol omg dude guys stuff cool awesome okay ok
sup yo haha literally totally super pretty basically thing things bunch tons
""".split())
_CONTRACTION_RE = re.compile(r"\b\w+'(?:s|t|re|ve|ll|d|m)\b")
REFUSAL_PATTERNS = tuple(re.compile(p, re.I) for p in (
    r"\bI(?:'m| am) (?:sorry|afraid|unable|not able)\b", r"\bI (?:can(?:no|')t|won't|will not|cannot)\b",
    r"\bI(?:'m| am) not (?:comfortable|going to|allowed)\b", r"\bas an ai\b", r"\bI must decline\b",
    r"\bunable to (?:help|assist|provide)\b", r"\bnot able to (?:help|assist|provide)\b",
))


def lexicon_rate(text: str, plus: frozenset[str], minus: frozenset[str]) -> float:
    """(plus hits - minus hits) per 100 words; 0 for an empty text."""
    ws = words(text)
    if not ws:
        return 0.0
    return 100.0 * (sum(w in plus for w in ws) - sum(w in minus for w in ws)) / len(ws)


def sentiment_lexicon(text: str, n_tokens: int, max_new_tokens: int) -> float:
    return lexicon_rate(text, SENTIMENT_POSITIVE, SENTIMENT_NEGATIVE)


def formality_lexicon(text: str, n_tokens: int, max_new_tokens: int) -> float:
    """Formal markers minus casual markers (contractions and '!' count as casual), per
    100 words."""
    ws = words(text)
    if not ws:
        return 0.0
    formal = sum(w in FORMAL_MARKERS for w in ws)
    casual = sum(w in CASUAL_MARKERS for w in ws) + len(_CONTRACTION_RE.findall(text.replace("\u2019", "'")))
    casual += text.count("!")
    return 100.0 * (formal - casual) / len(ws)


def refusal_rate(text: str, n_tokens: int, max_new_tokens: int) -> float:
    """1 if the generation refuses (a refusal phrase in its first 200 characters), else 0."""
    head = text[:200]
    return 1.0 if any(p.search(head) for p in REFUSAL_PATTERNS) else 0.0


def conciseness(text: str, n_tokens: int, max_new_tokens: int) -> float:
    """1 - generated tokens / max_new_tokens: 1 = stopped at once, 0 = used the whole budget."""
    return 1.0 - min(n_tokens, max_new_tokens) / max(max_new_tokens, 1)


TextScorer = Callable[[str, int, int], float]


def concept_rate(keywords: Collection[str]) -> TextScorer:
    """1 if the generation contains any of ``keywords`` (whole lower-case words), else 0:
    averaged over prompts, the share of answers on the concept."""
    keys = frozenset(k.lower() for k in keywords)

    def score(text: str, n_tokens: int, max_new_tokens: int) -> float:
        return 1.0 if any(w in keys for w in words(text)) else 0.0
    return score


def keyword_density(keywords: Collection[str]) -> TextScorer:
    """Concept keywords per 100 generated words (how much of the answer is on the concept)."""
    keys = frozenset(k.lower() for k in keywords)

    def score(text: str, n_tokens: int, max_new_tokens: int) -> float:
        ws = words(text)
        return 100.0 * sum(w in keys for w in ws) / len(ws) if ws else 0.0
    return score


# -- per-item scores -------------------------------------------------------------------
def probe_margin(positive: Sequence[Sequence[float]], negative: Sequence[Sequence[float]]) -> float:
    """One probe: mean over positive continuations of their summed token log-probs, minus
    the same over negative continuations."""
    pos = [sum(lp) for lp in positive]
    neg = [sum(lp) for lp in negative]
    return sum(pos) / len(pos) - sum(neg) / len(neg)


def distinct_n(tokens: Sequence[str], n: int) -> float | None:
    """Unique n-grams / n-grams within one text (None when it has no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float:
    """exp(mean negative log-likelihood) pooled over all tokens of all texts; nan if none."""
    total = sum(len(lp) for lp in token_logprobs)
    if total == 0:
        return float("nan")
    return math.exp(-sum(sum(lp) for lp in token_logprobs) / total)


def mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def bootstrap_ci(values: Sequence[float], *, n: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean (resampling items); [nan, nan] if empty."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return [float("nan"), float("nan")]
    if len(vals) == 1:
        return [vals[0], vals[0]]
    rng = random.Random(seed)
    k = len(vals)
    means = sorted(sum(rng.choice(vals) for _ in range(k)) / k for _ in range(n))
    lo = means[int((1 - level) / 2 * (n - 1))]
    hi = means[int((1 + level) / 2 * (n - 1))]
    return [lo, hi]


def coherence(texts: Sequence[str], token_counts: Sequence[int],
              unsteered_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """Coherence of one config's generations: perplexity under the unsteered model
    (pooled over tokens), mean distinct-1/2 over texts (words), mean generated tokens."""
    toks = [words(t) for t in texts]
    return {
        "perplexity": perplexity(unsteered_logprobs),
        "distinct_1": mean([distinct_n(t, 1) for t in toks]),
        "distinct_2": mean([distinct_n(t, 2) for t in toks]),
        "mean_tokens": mean([float(c) for c in token_counts]),
    }
