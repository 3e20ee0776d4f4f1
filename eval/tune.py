"""``vsteer tune``: choose a recipe and a system message on some prompts, score them on
others, record the recipe.

1. **Split** the behaviour's held-out prompts (and probes) into two fixed halves
   (``inputs.split_indices``): ``select`` chooses, ``score`` scores. No prompt is in both.
2. **Search** on ``select``: every band x positions x norm mode at every strength (one
   direction), the unsteered model, and every candidate system message of the prompting
   baseline (for a concept: ``behaviours.PROMPT_TEMPLATES`` filled with it).
3. **Choose** with a rule robust to selection noise (``choice``, default ``lcb``): the
   steering candidate whose gain over unsteered holds best across the select prompts,
   within the perplexity budget (default 1.2x); the system message the same way (no
   budget: the baseline gets its best shot). Then (``combined``) every recipe again on
   top of the chosen system message, chosen by its gain *over that message alone*,
   within the same budget: a prompt already moves the behaviour and costs perplexity, so
   the strength worth adding to it is rarely the one that works alone.
4. **Score** on ``score``: unsteered, the chosen system message (prompting), the chosen
   recipe (steering), the combined choice on top of the message (both), and the recipe
   with same-norm random directions (z).
   The select -> score drop of each choice is reported (``gap``): a large one is overfit.
5. **Record** the recipe as the vector set's ``recommended`` default (``vsteer.json``,
   through the registry when the set is a registry entry), so a request naming only the
   vector (``{"name": "ocean"}``) gets it.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from vsteer.engine.formats import load_vector_set
from vsteer.engine.vectors import SteeringVectorSet

from . import analysis
from .choice import DEFAULT_RULE, check_rule, choose
from .execute import Session
from .inputs import split_indices
from .plan import Condition, random_sets, strength_key
from .recipes import Recipe, default_bands, variants
from .report import format_comparison
from .sweep import _setup, finish_report

DEFAULT_TUNE_STRENGTHS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
"""Fractions of the residual norm (``unit: relative``), summed over a band."""


def _candidate(c: Condition, base: Condition, vs: SteeringVectorSet | None, beh: Any) -> dict[str, Any]:
    s = analysis.summary(c, base, beh, 0)
    out = {"key": c.key, **{k: s[k] for k in ("behaviour", "behaviour_delta", "ppl_ratio", "perplexity", "distinct_2")},
           "items": list(c.result["item_scores"])}
    if c.recipe is not None and vs is not None:
        out.update(recipe=c.recipe.to_dict(), relative_strength=analysis.relative_size(c.recipe, vs))
    if c.prompted:
        out["system_prompt"] = c.system
    return out


def tune(model: str, vectors: str | SteeringVectorSet, *, behaviour: str | None = None, probes: str | None = None,
         prompts_file: str | None = None, bands: Sequence[Sequence[int]] | None = None,
         strengths: Sequence[float] = DEFAULT_TUNE_STRENGTHS, unit: str = "relative",
         positions: Sequence[str] = ("all", "generated"), norms: Sequence[str] = ("keep",),
         max_ppl_ratio: float = 1.2, direction: int = 1, random_baselines: int = 5, prompting: bool = True,
         system_prompt: str | Sequence[str] | None = None, backend: str = "hf", out: str | None = None,
         write: bool = True, n_prompts: int | None = None, max_new_tokens: int = 32, seed: int = 0,
         split_seed: int = 0, progress: bool = True, batch_size: int = 16, dtype: str = "auto",
         enforce_eager: bool = True, hf_model: tuple[Any, Any] | None = None, plots: bool = True, samples: int = 2,
         rule: str = DEFAULT_RULE, keywords: Sequence[str] | None = None, regexes: Sequence[str] | None = None,
         scorer: str | None = None, concept: str | None = None, trust_remote_code: bool = False,
         combined: bool = True) -> dict[str, Any]:
    """Search, choose, score on held-out prompts, and (``write``) record the recipe in the
    set at ``vectors``. Returns the report (also ``out``/report.json). ``combined=False``
    skips the search on top of the system message (half the search time); ``both`` is
    then the steering choice plus the message."""
    from vsteer.engine.models import resolve_model

    started = time.perf_counter()
    if direction not in (1, -1):
        raise ValueError("direction must be 1 or -1")
    check_rule(rule)
    if write and isinstance(vectors, SteeringVectorSet):
        raise ValueError("write=True needs the vector set's directory, not an in-memory set")
    vs, beh, probe_items, prompts = _setup(vectors, behaviour, probes, prompts_file, system_prompt, n_prompts, None,
                                           keywords=keywords, regexes=regexes, scorer=scorer, concept=concept)
    prompting = prompting and bool(beh.system_prompts)
    if len(prompts) < 2 or (beh.kind == "logprob" and len(probe_items) < 2):
        raise ValueError("tuning needs at least two prompts (and probes) to split into select and score halves")
    split = {part: {"prompts": split_indices(len(prompts), part, split_seed),
                    "probes": split_indices(len(probe_items), part, split_seed) if probe_items else []}
             for part in ("select", "score")}
    band_list = [tuple(b) for b in bands] if bands else default_bands(vs.layers)
    missing = sorted({x for b in band_list for x in b if x not in vs})
    if missing:
        raise ValueError(f"the vector set has no layers {missing}; it has {vs.layers}")
    grid = variants(band_list, units=(unit,), norms=norms, positions=positions)
    signed = sorted({direction * abs(float(s)) for s in strengths if s}, key=abs)
    search = [Condition("baseline", "baseline")] + [Condition(f"{v.label()}:{strength_key(s)}", "sweep", v.at(s))
                                                     for v in grid for s in signed]
    systems = [Condition(f"prompt:{i}", "prompting", prompted=True, system=text)
               for i, text in enumerate(beh.system_prompts)] if prompting else []
    used = sorted({x for b in band_list for x in b})
    randoms = random_sets(vs, used, random_baselines, seed)
    model_path = resolve_model(model)

    with Session(model_path, vs.select(used), randoms, beh, prompts=prompts, probes=probe_items,
                 max_new_tokens=max_new_tokens, backend=backend, hf_model=hf_model, batch_size=batch_size,
                 dtype=dtype, enforce_eager=enforce_eager, seed=seed, progress=progress,
                 trust_remote_code=trust_remote_code) as session:
        sel = split["select"]
        session.run(search + systems, sel["prompts"], sel["probes"] or None, desc="tune: search")
        for c in search + systems:
            analysis.score(c, beh, max_new_tokens, seed)
        base_sel = search[0]
        base_items = base_sel.result["item_scores"]
        candidates = [_candidate(c, base_sel, vs, beh) for c in search[1:]]
        picked = choose(candidates, base_items, rule=rule, max_ppl_ratio=max_ppl_ratio, direction=direction, seed=seed)
        recipe = next((c.recipe for c in search[1:] if picked and c.key == picked["key"]), None)
        prompt_cands = [_candidate(c, base_sel, None, beh) for c in systems]
        prompt_pick = choose(prompt_cands, base_items, rule=rule, max_ppl_ratio=None, direction=direction, seed=seed)
        system = prompt_pick["system_prompt"] if prompt_pick else (beh.system_prompt if prompting else None)
        with_prompt = None
        if combined and system:
            prompt_sel = next((c for c in systems if c.system == system), None)
            if prompt_sel is None:  # the behaviour's own message when no candidate moved anything
                prompt_sel = Condition("prompting", "prompting", prompted=True, system=system)
                session.run([prompt_sel], sel["prompts"], sel["probes"] or None, desc="tune: prompting")
                analysis.score(prompt_sel, beh, max_new_tokens, seed)
            with_prompt = search_with_system(session, search[1:], system, base_sel, prompt_sel, vs, beh, sel,
                                             rule=rule, max_ppl_ratio=max_ppl_ratio, direction=direction, seed=seed,
                                             max_new_tokens=max_new_tokens)
        both = with_prompt["recipe"] if with_prompt else recipe
        heldout = score_heldout(session, recipe, system, beh, split["score"], random_baselines, max_new_tokens,
                                seed, samples, both_recipe=both)
        backend_name, timing, stops = session.name, dict(session.timing), session.stops

    gaps = {"steering": _gap(picked, heldout.get("steering")), "prompting": _gap(prompt_pick, heldout.get("prompting")),
            "both": _gap((with_prompt or {}).get("picked"), heldout.get("both"))}
    written = record(str(vectors), recipe) if recipe is not None and write else None
    report: dict[str, Any] = {
        "kind": "tune", "model": model, "model_path": model_path,
        "vectors": str(vectors) if not isinstance(vectors, SteeringVectorSet) else f"<in-memory {vs.behaviour}>",
        "vector_behaviour": vs.behaviour, "vector_method": vs.method, "vector_params": vs.params,
        "behaviour": {"name": beh.name, "kind": beh.kind, "description": beh.description, "unit": beh.unit,
                      "system_prompt": system, "system_prompts": list(beh.system_prompts), "concept": beh.concept,
                      "keywords": list(beh.keywords) or None,
                      "n_items": len(probe_items) if beh.kind == "logprob" else len(prompts)},
        "backend": backend_name,
        "generation": {"prompts": prompts_file or beh.prompts_file, "n_prompts": len(prompts),
                       "max_new_tokens": max_new_tokens, "greedy": True, "stop_token_ids": stops},
        "tune": {"split": {**split, "seed": split_seed,
                           "rule": "select chooses the recipe and the system message, score scores them; no prompt "
                                   "or probe is in both"},
                 "search_space": {"bands": [list(b) for b in band_list], "strengths": signed, "unit": unit,
                                  "positions": list(positions), "norms": list(norms), "direction": direction},
                 "choice_rule": rule, "max_ppl_ratio": max_ppl_ratio,
                 "select_baseline": {"behaviour": base_sel.result["behaviour"],
                                     "perplexity": base_sel.result["perplexity"], "items": list(base_items)},
                 "search": candidates, "prompting_search": prompt_cands,
                 "chosen": chosen_summary(recipe, picked),
                 "chosen_system_prompt": system,
                 "combined_search": with_prompt["candidates"] if with_prompt else None,
                 "chosen_with_prompt": (chosen_summary(with_prompt["recipe"], with_prompt["picked"])
                                        if with_prompt else None),
                 "heldout": heldout, "gap": gaps, "written_to": written},
    }
    return finish_report(report, timing, started, out, plots)


def search_with_system(session: Session, search: Sequence[Condition], system: str, base_sel: Condition,
                       prompt_sel: Condition, vs: SteeringVectorSet, beh: Any, sel: dict[str, list[int]], *,
                       rule: str, max_ppl_ratio: float | None, direction: int, seed: int,
                       max_new_tokens: int) -> dict[str, Any]:
    """Step 3b: each recipe of ``search`` on top of ``system`` on the select half; the
    choice is the one whose gain over the message alone (``prompt_sel``, run on the same
    prompts) holds best, with perplexity against the unsteered model (``base_sel``) within
    the budget. Returns ``candidates``, ``picked`` (None when nothing adds to the
    message) and its ``recipe``."""
    conds = [Condition(f"{c.key}+prompt", "both", c.recipe, prompted=True, system=system) for c in search]
    session.run(conds, sel["prompts"], sel["probes"] or None, desc="tune: search with the system message")
    for c in conds:
        analysis.score(c, beh, max_new_tokens, seed)
    candidates = [_candidate(c, base_sel, vs, beh) for c in conds]
    picked = choose(candidates, prompt_sel.result["item_scores"], rule=rule, max_ppl_ratio=max_ppl_ratio,
                    direction=direction, seed=seed)
    recipe = next((c.recipe for c in conds if picked and c.key == picked["key"]), None)
    return {"candidates": candidates, "picked": picked, "recipe": recipe}


def chosen_summary(recipe: Recipe | None, picked: dict[str, Any] | None) -> dict[str, Any] | None:
    """A choice as the report records it: the recipe, its recorded form, its select figures."""
    if recipe is None or picked is None:
        return None
    return {**recipe.to_dict(), "recommended": recipe.recommended(),
            "select": {k: v for k, v in picked.items() if k != "items"}}


def _gap(picked: dict[str, Any] | None, scored: dict[str, Any] | None) -> dict[str, Any] | None:
    """How much of a choice's select-half behaviour survived on the score half."""
    if not picked or not scored:
        return None
    return {"select": picked["behaviour"], "score": scored["behaviour"], "drop": picked["behaviour"] - scored["behaviour"]}


def score_heldout(session: Session, recipe: Recipe | None, system: str | None, beh: Any, part: dict[str, list[int]],
                  n_random: int, max_new_tokens: int, seed: int, samples: int,
                  both_recipe: Recipe | None = None) -> dict[str, Any]:
    """Step 4: the held-out half, never seen by the search. ``both_recipe`` (the
    combined choice) goes on top of the system message; none: no ``both`` row."""
    conds = [Condition("baseline", "baseline")]
    if system:
        conds.append(Condition("prompting", "prompting", prompted=True, system=system))
    steer = None
    if recipe is not None:
        steer = Condition("steering", "sweep", recipe)
        conds.append(steer)
    if system and both_recipe is not None:
        conds.append(Condition("both", "both", both_recipe, prompted=True, system=system))
    if recipe is not None:
        conds += [Condition(f"R{i}", "random", recipe, random_index=i) for i in range(n_random)]
    session.run(conds, part["prompts"], part["probes"] or None, desc="tune: score")
    for c in conds:
        analysis.score(c, beh, max_new_tokens, seed)
    base = conds[0]
    out: dict[str, Any] = {"n_prompts": len(part["prompts"]), "n_probes": len(part["probes"]),
                           "unsteered": analysis.summary(base, base, beh, samples)}
    for c in conds[1:]:
        if c.kind != "random":
            out[c.key] = {**analysis.summary(c, base, beh, samples), "items": list(c.result["item_scores"])}
    out["unsteered"]["items"] = list(base.result["item_scores"])
    if steer is not None:
        out["steering"]["random_baseline"] = analysis.random_comparison(conds, base, steer)
        out["steering"]["z_vs_random"] = (out["steering"]["random_baseline"] or {}).get("z")
    return out


def record(path: str, recipe: Recipe) -> str:
    """Step 5: write ``recipe`` into the set's metadata as its recommended default: a new
    version through the registry when ``path`` is a registry entry (never in place)."""
    from vsteer.extract.output import write_vector_set

    vs = load_vector_set(path)
    vs.recommended = recipe.recommended()
    write_vector_set(vs, path)
    return path


def format_tune(report: dict[str, Any]) -> str:
    t = report["tune"]
    beh = report["behaviour"]
    lines = [f"tune {beh['name']} ({beh['unit']}) on {report['model']} [{report['backend']}]: "
             f"{len(t['search'])} recipes and {len(t.get('prompting_search') or [])} system messages on "
             f"{len(t['split']['select']['prompts'])} select prompts, rule {t.get('choice_rule', 'max')}, budget "
             f"perplexity <= {t['max_ppl_ratio']:g}x (unsteered behaviour {_f(t['select_baseline']['behaviour'])})"]
    ranked = sorted((c for c in t["search"] if c.get("rule_score") is not None),
                    key=lambda c: -(c["rule_score"] if c["ppl_ratio"] is not None and c["ppl_ratio"] <= t["max_ppl_ratio"]
                                    else -1e9))[:5]
    for c in ranked:
        r = c["recipe"]
        lines.append(f"  {r['band']:>8} {r['positions']:>9} {r['norm']:>8} {r['strength']:>6g}: behaviour "
                     f"{_f(c['behaviour'])} (rule {_f(c['rule_score'])}), perplexity x{_f(c['ppl_ratio'])}")
    ch = t["chosen"]
    if ch is None:
        lines.append("no recipe moved the behaviour within the budget: nothing recorded")
    else:
        lines.append(f"chosen: layers {ch['band']}, strength {ch['strength']:g} {ch['unit']} (per layer "
                     f"{ch['per_layer_strength']:.4g}), positions {ch['positions']}, norm {ch['norm']}")
    if t.get("combined_search") is not None:
        cw = t.get("chosen_with_prompt")
        lines.append("on top of the system message: nothing added to it within the budget" if cw is None else
                     f"on top of the system message: layers {cw['band']}, strength {cw['strength']:g} {cw['unit']}, "
                     f"positions {cw['positions']} (select: behaviour {_f(cw['select']['behaviour'])}, perplexity "
                     f"x{_f(cw['select']['ppl_ratio'])})")
    h = t["heldout"]
    if ch is not None:
        lines.append(f"held-out ({h['n_prompts']} prompts): z vs random {_f(h['steering'].get('z_vs_random'), 1)}")
    lines += format_comparison({"system_prompt": t.get("chosen_system_prompt"), "max_ppl_ratio": t["max_ppl_ratio"],
                                **{k: h.get(k) for k in ("unsteered", "prompting", "steering", "both")}})
    base = t["select_baseline"]["behaviour"] or 0.0
    for what, g in (t.get("gap") or {}).items():
        if g:  # more than half the select gain lost: the choice fitted the select prompts' noise
            overfit = g["drop"] > 0.5 * abs(g["select"] - base)
            lines.append(f"select -> score ({what}): {_f(g['select'])} -> {_f(g['score'])} (drop {_f(g['drop'])}"
                         f"{'; more than half the gain is lost: probably overfit to the select prompts' if overfit else ''})")
    if t["written_to"]:
        lines.append(f"recorded as the default recipe of {t['written_to']}")
    return "\n".join(lines)


def _f(x: Any, digits: int = 2) -> str:
    return "nan" if x is None else f"{x:.{digits}f}"
