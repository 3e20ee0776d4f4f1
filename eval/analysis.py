"""From raw results to numbers: behaviour scores with intervals, coherence, the effect
against same-norm random directions, the trade-off point, and the comparison with the
prompting baseline. Pure functions of what ``execute.Session.run`` left in each
condition, so both backends share them."""

from __future__ import annotations

import math
from typing import Any, Sequence

from vsteer.engine.resolver import residual_norms_of
from vsteer.engine.vectors import SteeringVectorSet

from . import scorers
from .behaviours import Behaviour
from .plan import Condition, strength_key
from .recipes import Recipe

POINT_FIELDS = ("layer", "strength", "raw_strength", "relative_strength", "behaviour", "perplexity", "ppl_ratio",
                "distinct_2")


def score(c: Condition, beh: Behaviour, max_new_tokens: int, seed: int = 0) -> None:
    """Behaviour (and, for scored conditions, its interval and coherence) into ``c.result``."""
    r = c.result
    texts, toks = r.get("texts"), r.get("tokens")
    if beh.kind == "generation":
        r["item_scores"] = [beh.text_scorer(t, len(k), max_new_tokens) for t, k in zip(texts, toks)]
    r["behaviour"] = scorers.mean(r["item_scores"])
    if not c.scored:
        return
    r["behaviour_ci95"] = scorers.bootstrap_ci(r["item_scores"], seed=seed)
    r.update(scorers.coherence(texts, [len(t) for t in toks], r["unsteered_logprobs"]))
    for name, fn in beh.extra_text_scorers.items():
        r[name] = scorers.mean([fn(t, len(k), max_new_tokens) for t, k in zip(texts, toks)])


def coefficients(recipe: Recipe, vs: SteeringVectorSet) -> dict[int, float]:
    """Per layer what the engine applies: the add multiplier, the clamp target, 0 (ablate);
    the same arithmetic as ``SteeringResolver``."""
    norms, vn = residual_norms_of(vs), vs.norms()
    s = recipe.per_layer
    out = {}
    for layer in recipe.layers:
        if recipe.op == "ablate":
            out[layer] = 0.0
        elif recipe.unit == "relative":
            n = norms.get(layer, float("nan"))
            out[layer] = s * n if recipe.op == "clamp" else s * n / max(vn[layer], 1e-12)
        else:
            out[layer] = s * vn[layer] if recipe.op == "clamp" else s
    return out


def relative_size(recipe: Recipe, vs: SteeringVectorSet) -> float | None:
    """The recipe's size in residual norms, summed over its band: the added vector's norm
    / the layer's mean residual norm (add), the pinned projection / that norm (clamp);
    None for ablate or when the set has no norms for a layer."""
    if recipe.op == "ablate":
        return None
    norms, vn, coef = residual_norms_of(vs), vs.norms(), coefficients(recipe, vs)
    if any(layer not in norms for layer in recipe.layers):
        return None
    if recipe.op == "clamp":
        return sum(coef[x] / norms[x] for x in recipe.layers)
    return sum(coef[x] * vn[x] / norms[x] for x in recipe.layers)


def z_score(effect: float, random_effects: list[float]) -> dict[str, Any]:
    """The vector's effect against same-norm random directions' effects (score changes
    from unsteered): z = (effect - mean) / sample sd; nan with fewer than two."""
    n = len(random_effects)
    mu = sum(random_effects) / n if n else float("nan")
    sd = math.sqrt(sum((x - mu) ** 2 for x in random_effects) / (n - 1)) if n > 1 else float("nan")
    z = (effect - mu) / sd if math.isfinite(sd) and sd > 0 else float("nan")
    return {"vector_effect": effect, "random_effects": random_effects, "random_mean": mu, "random_std": sd, "z": z}


def random_comparison(conds: Sequence[Condition], base: Condition, target: Condition) -> dict[str, Any] | None:
    """z of ``target`` against the random conditions with the same recipe."""
    rand = [c.result["behaviour"] - base.result["behaviour"] for c in conds
            if c.kind == "random" and c.recipe == target.recipe]
    if not rand:
        return None
    return z_score(target.result["behaviour"] - base.result["behaviour"], rand)


def summary(c: Condition, base: Condition, beh: Behaviour, samples: int) -> dict[str, Any]:
    """Behaviour and coherence of one scored condition, relative to the unsteered one."""
    r, p0 = c.result, base.result["perplexity"]
    ppl = r["perplexity"]
    return {"behaviour": r["behaviour"], "behaviour_ci95": r["behaviour_ci95"],
            "behaviour_delta": r["behaviour"] - base.result["behaviour"],
            "perplexity": ppl, "ppl_ratio": ppl / p0 if p0 and math.isfinite(p0) else None,
            "distinct_1": r["distinct_1"], "distinct_2": r["distinct_2"], "mean_tokens": r["mean_tokens"],
            **{name: r[name] for name in beh.extra_text_scorers}, "samples": r["texts"][:samples]}


def point(c: Condition, base: Condition, vs: SteeringVectorSet, beh: Behaviour, *, variant: str,
          z: float | None, samples: int) -> dict[str, Any]:
    """One (variant, strength) of the sweep; the unsteered condition when ``c`` is ``base``."""
    rec = c.recipe
    layers = list(rec.layers) if rec else []
    coef = coefficients(rec, vs) if rec else {}
    return {"variant": variant, "layer": layers[0] if len(layers) == 1 else variant.split(" ")[0],
            "layers": layers, "op": rec.op if rec else "add", "unit": rec.unit if rec else None,
            "norm": rec.norm if rec else "keep", "positions": rec.positions if rec else None,
            "strength": rec.strength if rec and c is not base else 0.0,
            "per_layer_strength": rec.per_layer if rec and c is not base else 0.0,
            "raw_strength": (coef[layers[0]] if len(layers) == 1 else None) if c is not base else 0.0,
            "coefficients": {str(k): v for k, v in coef.items()} if c is not base else {},
            "relative_strength": relative_size(rec, vs) if rec and c is not base else 0.0,
            **summary(c, base, beh, samples), "z_vs_random": z}


def _size(p: dict[str, Any]) -> tuple[float, float]:
    """How strong a trade-off point is: |relative strength| (raw when unknown), then perplexity."""
    rel = p.get("relative_strength")
    return (abs(rel) if rel is not None else abs(p["strength"]), p.get("ppl_ratio") or 0.0)


def _coherent(p: dict[str, Any], p0: float | None, max_ppl_ratio: float) -> bool:
    if p0 is None or not math.isfinite(p0):
        return True
    ppl = p["perplexity"]
    return ppl is not None and math.isfinite(ppl) and ppl <= max_ppl_ratio * p0


def tradeoff(points: list[dict[str, Any]], baseline: dict[str, Any], *, target_delta: float,
             max_ppl_ratio: float) -> dict[str, Any]:
    """Per variant (a layer, or a band with its op/norm/positions) and direction: the
    lowest-|strength| point whose behaviour moved by at least ``target_delta`` from the
    unsteered score (up for +, down for -) with perplexity within ``max_ppl_ratio`` x
    unsteered. Ablations take no strength and are left out."""
    b0, p0 = baseline["behaviour"], baseline["perplexity"]
    bound_ok = p0 is not None and math.isfinite(p0)
    group = lambda p: p.get("variant") or str(p["layer"])  # noqa: E731
    pts = [p for p in points if p.get("op", "add") != "ablate"]
    per_variant: dict[str, dict[str, Any]] = {}
    best: dict[str, Any] = {"+": None, "-": None}
    for key in dict.fromkeys(group(p) for p in pts):
        entry: dict[str, Any] = {}
        for sign, label in ((1, "+"), (-1, "-")):
            cands = sorted((p for p in pts if group(p) == key and p["strength"] * sign > 0),
                           key=lambda p: abs(p["strength"]))
            hit = next(({k: p.get(k) for k in (*POINT_FIELDS, "variant", "layers")} for p in cands
                        if sign * (p["behaviour"] - b0) >= target_delta and _coherent(p, p0, max_ppl_ratio)), None)
            entry[label] = hit
            if hit is not None and (best[label] is None or _size(hit) < _size(best[label])):
                best[label] = hit
        per_variant[key] = entry
    return {"criteria": {"target_delta": target_delta, "max_ppl_ratio": max_ppl_ratio,
                         "baseline_behaviour": b0, "baseline_perplexity": p0, "perplexity_bound_applied": bound_ok,
                         "rule": "lowest |strength| with sign*(behaviour - baseline) >= target_delta and "
                                 "perplexity <= max_ppl_ratio * baseline perplexity; across variants the smallest "
                                 "relative strength (raw when norms are unknown) wins"},
            "per_layer": per_variant, "best": best}


def best_in_bound(points: list[dict[str, Any]], p0: float | None, max_ppl_ratio: float,
                  sign: int = 1) -> dict[str, Any] | None:
    """The steered point that moves the behaviour furthest in ``sign``'s direction while
    perplexity stays within the bound (ties: the smaller strength)."""
    cands = [p for p in points if p["strength"] != 0.0 and _coherent(p, p0, max_ppl_ratio)
             and p["behaviour"] is not None and math.isfinite(p["behaviour"])]
    if not cands:
        return None
    return max(cands, key=lambda p: (sign * p["behaviour"], -_size(p)[0]))


def random_table(conds: Sequence[Condition], base: Condition, labels: dict[Recipe, str]) -> dict[str, Any] | None:
    """Per variant and strength: the vector's effect against its random directions."""
    rand = [c for c in conds if c.kind == "random"]
    if not rand:
        return None
    out: dict[str, Any] = {"n": len({c.random_index for c in rand}),
                           "strengths": sorted({c.recipe.strength for c in rand}), "per_layer": {}}
    for c in conds:
        if c.kind == "sweep" and any(r.recipe == c.recipe for r in rand):
            label = labels[c.recipe.variant()]
            out["per_layer"].setdefault(label, {})[strength_key(c.recipe.strength)] = \
                random_comparison(conds, base, c)
    return out
