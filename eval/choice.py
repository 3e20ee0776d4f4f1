"""How ``vsteer tune`` picks one candidate out of many measured on the ``select`` prompts.

Taking the candidate with the highest mean (``max``) overfits when there are many
candidates and few prompts: the winner is often the one whose noise happened to be
largest, and it falls back on the ``score`` prompts (issue 22: 5 of 12 on one half, 0 of 12
on the other). The rules here rank candidates by how much of their gain over unsteered
*holds across prompts*, using the per-prompt (per-probe) scores, paired with the
unsteered run on the same prompt:

* ``lcb`` (default): a lower confidence bound, mean gain - ``Z`` x its standard error;
  a gain carried by a few prompts has a large standard error and ranks lower;
* ``folds``: the median over ``FOLDS`` fixed folds of the prompts of the fold's mean gain;
* ``smooth``: ``lcb`` of the candidate's gains pooled with those of its neighbours in
  strength (same band, positions, norm): an effect grows smoothly with strength, noise
  does not, so a lone spike between two weaker neighbours ranks lower;
* ``max``: the mean gain (the old rule, for comparison).

``bench/recipes.py --dev-rules`` compared them on the development concepts (every
candidate measured on every prompt, then many random select/score splits):
docs/evaluation.md, "Choosing on noisy prompts".
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any, Sequence

RULES: tuple[str, ...] = ("lcb", "folds", "smooth", "max")
DEFAULT_RULE = "lcb"
Z = 1.0       # lcb: standard errors subtracted
FOLDS = 4     # folds: number of prompt folds
EPS = 1e-9    # a rule score must clear this (a bound of exactly zero, in floating point, is no gain)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"choice rule must be one of {', '.join(RULES)}; got {rule!r}")
    return rule


def gains(items: Sequence[float], base: Sequence[float], direction: int = 1) -> list[float]:
    """Per-item gain over unsteered in the wanted direction (nan items dropped pairwise)."""
    if len(items) != len(base):
        raise ValueError(f"{len(items)} item scores against {len(base)} unsteered ones")
    return [direction * (a - b) for a, b in zip(items, base) if math.isfinite(a) and math.isfinite(b)]


def rule_score(items: Sequence[float], base: Sequence[float], rule: str = DEFAULT_RULE, *, direction: int = 1,
               seed: int = 0) -> float:
    """The number a rule ranks a candidate by (higher is better; nan if no items)."""
    g = gains(items, base, direction)
    if not g:
        return float("nan")
    mean = sum(g) / len(g)
    if check_rule(rule) == "max" or len(g) < 2:
        return mean
    if rule in ("lcb", "smooth"):
        return mean - Z * statistics.stdev(g) / math.sqrt(len(g))
    order = list(range(len(g)))
    random.Random(seed).shuffle(order)
    k = min(FOLDS, len(g))
    folds = [[g[i] for i in order[f::k]] for f in range(k)]
    return statistics.median(sum(f) / len(f) for f in folds)


def choose(candidates: list[dict[str, Any]], base_items: Sequence[float], *, rule: str = DEFAULT_RULE,
           max_ppl_ratio: float | None = None, direction: int = 1, seed: int = 0) -> dict[str, Any] | None:
    """The candidate with the best ``rule_score`` among those within the perplexity budget
    (``None``: no budget) whose mean moved in ``direction`` and whose rule score is above
    zero (for ``lcb``: the gain's lower bound; one lucky prompt out of 32 has a bound of
    zero and is not a choice); ties go to the smaller strength. Each candidate needs
    ``items`` (per-item scores on the same items as ``base_items``), ``behaviour`` and
    ``ppl_ratio``; ``rule_score`` is set on each."""
    ok = []
    pooled = _neighbours(candidates) if rule == "smooth" else {}
    for i, c in enumerate(candidates):
        items, base = c["items"], list(base_items)
        for j in pooled.get(i, []):
            items, base = [*items, *candidates[j]["items"]], [*base, *base_items]
        c["rule_score"] = rule_score(items, base, rule, direction=direction, seed=seed)
        mean_gain = sum(gains(c["items"], base_items, direction)) if c["items"] else float("nan")
        in_budget = max_ppl_ratio is None or (c.get("ppl_ratio") is not None and c["ppl_ratio"] <= max_ppl_ratio)
        if in_budget and math.isfinite(c["rule_score"]) and c["rule_score"] > EPS and mean_gain > 0:
            ok.append(c)
    if not ok:
        return None
    return max(ok, key=lambda c: (c["rule_score"], direction * c["behaviour"],
                                  -abs((c.get("recipe") or {}).get("strength", 0.0))))


def _neighbours(candidates: list[dict[str, Any]]) -> dict[int, list[int]]:
    """For each candidate, the candidates of the same recipe at the next lower and higher
    strength (none for candidates without a recipe, such as system messages)."""
    groups: dict[tuple, list[tuple[float, int]]] = {}
    for i, c in enumerate(candidates):
        r = c.get("recipe") or {}
        if "strength" in r:
            key = tuple(str(r.get(k)) for k in ("band", "layers", "op", "unit", "norm", "positions"))
            groups.setdefault(key, []).append((abs(float(r["strength"])), i))
    out: dict[int, list[int]] = {}
    for members in groups.values():
        members.sort()
        for pos, (_, i) in enumerate(members):
            out[i] = [members[q][1] for q in (pos - 1, pos + 1) if 0 <= q < len(members)]
    return out
