"""``vsteer tune``: choose a recipe on some prompts, score it on others, record it.

1. **Split** the behaviour's held-out prompts (and probes) into two fixed halves
   (``inputs.split_indices``): ``select`` chooses the recipe, ``score`` scores it. No
   prompt is in both, so the reported numbers are not fitted to the prompts they are
   measured on.
2. **Search** on ``select``: every band x positions x norm mode at every strength (one
   direction), plus the unsteered model; each gets its behaviour and its perplexity
   ratio against unsteered.
3. **Choose** the candidate with the highest behaviour (in the wanted direction) whose
   perplexity ratio is within the budget (default 1.2x) and whose behaviour moved from
   unsteered; ties go to the smaller strength.
4. **Score** on ``score``: unsteered, prompting alone, the chosen recipe, the recipe with
   the prompt, and the recipe with same-norm random directions (z).
5. **Record** the recipe as the vector set's ``recommended`` default (``vsteer.json``),
   so a request naming only the vector (``{"name": "ocean"}``) gets it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

from vsteer.engine.formats import load_vector_set, save_vector_set
from vsteer.engine.vectors import SteeringVectorSet

from . import analysis
from .execute import Session
from .inputs import split_indices
from .plan import Condition, random_sets, strength_key
from .recipes import Recipe, default_bands, variants
from .report import format_comparison
from .sweep import _setup, finish_report

DEFAULT_TUNE_STRENGTHS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
"""Fractions of the residual norm (``unit: relative``), summed over a band."""


def choose(candidates: list[dict[str, Any]], baseline: float, *, max_ppl_ratio: float,
           direction: int = 1) -> dict[str, Any] | None:
    """Step 3: the in-budget candidate that moves the behaviour furthest (``direction``)."""
    ok = [c for c in candidates if c["ppl_ratio"] is not None and c["ppl_ratio"] <= max_ppl_ratio
          and c["behaviour"] is not None and math.isfinite(c["behaviour"])
          and direction * (c["behaviour"] - baseline) > 0]
    if not ok:
        return None
    return max(ok, key=lambda c: (direction * c["behaviour"], -abs(c["recipe"]["strength"])))


def _candidate(c: Condition, base: Condition, vs: SteeringVectorSet, beh: Any) -> dict[str, Any]:
    s = analysis.summary(c, base, beh, 0)
    return {"key": c.key, "recipe": c.recipe.to_dict(), "relative_strength": analysis.relative_size(c.recipe, vs),
            **{k: s[k] for k in ("behaviour", "behaviour_delta", "ppl_ratio", "perplexity", "distinct_2")}}


def tune(model: str, vectors: str | SteeringVectorSet, *, behaviour: str | None = None, probes: str | None = None,
         prompts_file: str | None = None, bands: Sequence[Sequence[int]] | None = None,
         strengths: Sequence[float] = DEFAULT_TUNE_STRENGTHS, unit: str = "relative",
         positions: Sequence[str] = ("all", "generated"), norms: Sequence[str] = ("keep",),
         max_ppl_ratio: float = 1.2, direction: int = 1, random_baselines: int = 5, prompting: bool = True,
         system_prompt: str | None = None, backend: str = "hf", out: str | None = None, write: bool = True,
         n_prompts: int | None = None, max_new_tokens: int = 32, seed: int = 0, split_seed: int = 0,
         progress: bool = True, batch_size: int = 16, dtype: str = "float32", enforce_eager: bool = True,
         hf_model: tuple[Any, Any] | None = None, plots: bool = True, samples: int = 2) -> dict[str, Any]:
    """Search, choose, score on held-out prompts, and (``write``) record the recipe in the
    set at ``vectors``. Returns the report (also ``out``/report.json)."""
    from vsteer.engine.models import resolve_model

    started = time.perf_counter()
    if direction not in (1, -1):
        raise ValueError("direction must be 1 or -1")
    if write and isinstance(vectors, SteeringVectorSet):
        raise ValueError("write=True needs the vector set's directory, not an in-memory set")
    vs, beh, probe_items, prompts = _setup(vectors, behaviour, probes, prompts_file, system_prompt, n_prompts, None)
    prompting = prompting and bool(beh.system_prompt)
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
    used = sorted({x for b in band_list for x in b})
    randoms = random_sets(vs, used, random_baselines, seed)
    model_path = resolve_model(model)

    with Session(model_path, vs.select(used), randoms, beh, prompts=prompts, probes=probe_items,
                 max_new_tokens=max_new_tokens, backend=backend, hf_model=hf_model, batch_size=batch_size,
                 dtype=dtype, enforce_eager=enforce_eager, seed=seed, progress=progress) as session:
        sel = split["select"]
        session.run(search, sel["prompts"], sel["probes"] or None, desc="tune: search")
        for c in search:
            analysis.score(c, beh, max_new_tokens, seed)
        base_sel = search[0]
        candidates = [_candidate(c, base_sel, vs, beh) for c in search[1:]]
        picked = choose(candidates, base_sel.result["behaviour"], max_ppl_ratio=max_ppl_ratio, direction=direction)
        recipe = next((c.recipe for c in search[1:] if picked and c.key == picked["key"]), None)
        heldout = _score_heldout(session, recipe, beh, split["score"], random_baselines, prompting, max_new_tokens,
                                 seed, samples)
        backend_name, timing, stops = session.name, dict(session.timing), session.stops

    written = None
    if recipe is not None and write:
        written = record(str(vectors), recipe)
    report: dict[str, Any] = {
        "kind": "tune", "model": model, "model_path": model_path,
        "vectors": str(vectors) if not isinstance(vectors, SteeringVectorSet) else f"<in-memory {vs.behaviour}>",
        "vector_behaviour": vs.behaviour, "vector_method": vs.method, "vector_params": vs.params,
        "behaviour": {"name": beh.name, "kind": beh.kind, "description": beh.description, "unit": beh.unit,
                      "system_prompt": beh.system_prompt, "keywords": list(beh.keywords) or None,
                      "n_items": len(probe_items) if beh.kind == "logprob" else len(prompts)},
        "backend": backend_name,
        "generation": {"prompts": prompts_file or beh.prompts_file, "n_prompts": len(prompts),
                       "max_new_tokens": max_new_tokens, "greedy": True, "stop_token_ids": stops},
        "tune": {"split": {**split, "seed": split_seed,
                           "rule": "select chooses the recipe, score scores it; no prompt or probe is in both"},
                 "search_space": {"bands": [list(b) for b in band_list], "strengths": signed, "unit": unit,
                                  "positions": list(positions), "norms": list(norms), "direction": direction},
                 "max_ppl_ratio": max_ppl_ratio,
                 "select_baseline": {"behaviour": base_sel.result["behaviour"],
                                     "perplexity": base_sel.result["perplexity"]},
                 "search": candidates, "chosen": ({**recipe.to_dict(), "recommended": recipe.recommended(),
                                                   "select": picked} if recipe else None),
                 "heldout": heldout, "written_to": written},
    }
    return finish_report(report, timing, started, out, plots)


def _score_heldout(session: Session, recipe: Recipe | None, beh: Any, part: dict[str, list[int]], n_random: int,
                   prompting: bool, max_new_tokens: int, seed: int, samples: int) -> dict[str, Any]:
    """Step 4: the held-out half, never seen by the search."""
    conds = [Condition("baseline", "baseline")]
    if prompting:
        conds.append(Condition("prompting", "prompting", prompted=True))
    if recipe is not None:
        conds.append(Condition("steering", "sweep", recipe))
        if prompting:
            conds.append(Condition("both", "both", recipe, prompted=True))
        conds += [Condition(f"R{i}", "random", recipe, random_index=i) for i in range(n_random)]
    session.run(conds, part["prompts"], part["probes"] or None, desc="tune: score")
    for c in conds:
        analysis.score(c, beh, max_new_tokens, seed)
    base = conds[0]
    out: dict[str, Any] = {"n_prompts": len(part["prompts"]), "n_probes": len(part["probes"]),
                           "unsteered": analysis.summary(base, base, beh, samples)}
    for c in conds[1:]:
        if c.kind != "random":
            out[c.key] = analysis.summary(c, base, beh, samples)
    if recipe is not None:
        out["steering"]["random_baseline"] = analysis.random_comparison(conds, base, conds[2 if prompting else 1])
        out["steering"]["z_vs_random"] = (out["steering"]["random_baseline"] or {}).get("z")
    return out


def record(path: str, recipe: Recipe) -> str:
    """Step 5: write ``recipe`` into the set's metadata as its recommended default."""
    vs = load_vector_set(path)
    vs.recommended = recipe.recommended()
    save_vector_set(vs, path, overwrite=True)
    return path


def format_tune(report: dict[str, Any]) -> str:
    t = report["tune"]
    beh = report["behaviour"]
    lines = [f"tune {beh['name']} ({beh['unit']}) on {report['model']} [{report['backend']}]: "
             f"{len(t['search'])} candidates on {len(t['split']['select']['prompts'])} select prompts, budget "
             f"perplexity <= {t['max_ppl_ratio']:g}x (unsteered behaviour {_f(t['select_baseline']['behaviour'])})"]
    inb = sorted((c for c in t["search"] if c["ppl_ratio"] is not None and c["ppl_ratio"] <= t["max_ppl_ratio"]),
                 key=lambda c: -(c["behaviour"] or -1e9))[:5]
    for c in inb:
        r = c["recipe"]
        lines.append(f"  {r['band']:>8} {r['positions']:>9} {r['norm']:>8} {r['strength']:>6g}: behaviour "
                     f"{_f(c['behaviour'])}, perplexity x{_f(c['ppl_ratio'])}")
    ch = t["chosen"]
    if ch is None:
        lines.append("no candidate moved the behaviour within the budget: nothing recorded")
        return "\n".join(lines)
    lines.append(f"chosen: layers {ch['band']}, strength {ch['strength']:g} {ch['unit']} (per layer "
                 f"{ch['per_layer_strength']:.4g}), positions {ch['positions']}, norm {ch['norm']}")
    h = t["heldout"]
    z = h["steering"].get("z_vs_random")
    lines.append(f"held-out ({h['n_prompts']} prompts): z vs random {_f(z, 1)}")
    lines += format_comparison({"system_prompt": beh["system_prompt"], "max_ppl_ratio": t["max_ppl_ratio"],
                                **{k: h.get(k) for k in ("unsteered", "prompting", "steering", "both")}})
    if t["written_to"]:
        lines.append(f"recorded as the default recipe of {t['written_to']}")
    return "\n".join(lines)


def _f(x: Any, digits: int = 2) -> str:
    return "nan" if x is None else f"{x:.{digits}f}"
