"""The recipe study (issue 15): can a tuned steering recipe match a one-line prompt on
SmolLM2-135M-Instruct, on held-out prompts?

For each behaviour (the concepts ocean, cooking, space from the bundled topic pairs, and
sentiment from the bundled pairs): extract a CAA vector set (mean over tokens), run
``vsteer tune`` on the vLLM backend (search on the ``select`` half of the prompts under a
1.2x perplexity budget, score on the ``score`` half against unsteered, prompting, steering
+ prompting and 5 same-norm random directions), and check the targets:

* steering reaches the prompting baseline's concept rate (sentiment: score shift) at
  perplexity <= 1.3x unsteered with z >= 3 against random directions;
* steering + prompting beats prompting alone.

Mean-centring is measured beside it: the ocean vector extracted with ``--center none``,
``neutral`` and ``both``, swept at the same band, positions and strengths on the
``select`` prompts only.

Writes bench/out/recipes.json and the tune reports under bench/out/recipes/; then
``--render`` prints the markdown section and (with ``--write-results``) puts it into
bench/RESULTS.md between the recipe-study markers.

    nice -n 15 python bench/recipes.py                      # everything (about an hour on 2 busy cores)
    nice -n 15 python bench/recipes.py --only ocean          # one behaviour
    python bench/recipes.py --render --write-results         # RESULTS.md section from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "recipes"
WORK = C.OUT_DIR / NAME
RESULT = C.OUT_DIR / f"{NAME}.json"
BEGIN, END = "<!-- recipe-study:begin -->", "<!-- recipe-study:end -->"

# The search per behaviour: bands over the first half of the 30 layers, both position
# rules for generation-scored concepts (probe log-probabilities only see the prompt, so
# sentiment searches positions=all), strengths as fractions of the residual norm.
CONCEPT_GRID = dict(bands=[(8,), (6, 7, 8, 9), (9, 10, 11, 12), (3, 4, 5, 6, 7, 8, 9, 10)],
                    positions=("all", "generated"), strengths=(0.15, 0.2, 0.25, 0.3))
SENTIMENT_GRID = dict(bands=[(6,), (10,), (4, 5, 6, 7), (6, 7, 8, 9)], positions=("all",),
                      strengths=(0.05, 0.1, 0.15, 0.2))
BEHAVIOURS = {"ocean": CONCEPT_GRID, "cooking": CONCEPT_GRID, "space": CONCEPT_GRID, "sentiment": SENTIMENT_GRID}
EXTRACT_LAYERS = list(range(16))
CENTERING = dict(behaviour="ocean", band=(6, 7, 8, 9), positions="all", strengths=(0.2, 0.3, 0.4))


def extract(model, tok, name: str, center: str, model_id: str) -> Path:
    from vsteer.engine.formats import save_vector_set
    from vsteer.extract import ContrastPairDataset, extract_caa

    path = WORK / "vectors" / f"{name}-{center}"
    vs = extract_caa(model, tok, ContrastPairDataset.from_bundled(name), layers=EXTRACT_LAYERS, token_position="mean",
                     batch_size=16, progress=False, behaviour=name, model_id=model_id, center=center)
    save_vector_set(vs, str(path), overwrite=True)
    return path


def check(h: dict, kind: str) -> dict:
    """The issue's targets on the held-out half."""
    s, p, b, u = h.get("steering"), h.get("prompting"), h.get("both"), h["unsteered"]
    if s is None:
        return {"steering_matches_prompting": False, "coherent": False, "z_ok": False, "both_beats_prompting": False}
    d = lambda r: r["behaviour"] - u["behaviour"]  # noqa: E731
    return {"steering_matches_prompting": d(s) >= d(p), "coherent": (s["ppl_ratio"] or 99) <= 1.3,
            "z_ok": (s.get("z_vs_random") or 0) >= 3, "both_beats_prompting": b["behaviour"] > p["behaviour"],
            "metric": "concept rate" if kind == "generation" else "probe score shift (nats)"}


def run_study(args: argparse.Namespace) -> dict:
    from vsteer.engine.models import load_hf
    from vsteer.eval.inputs import load_prompts, split_indices
    from vsteer.eval.sweep import run_sweep
    from vsteer.eval.tune import format_tune, tune

    path = C.resolve_model(args.model)
    WORK.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(BEHAVIOURS)
    previous = json.loads(RESULT.read_text()) if RESULT.is_file() and args.only else {}
    results: dict = {"params": {"model": args.model, "max_new_tokens": args.max_new_tokens, "budget": args.budget,
                                "random_baselines": args.random_baselines, "extract_layers": EXTRACT_LAYERS,
                                "vectors": "CAA mean difference, mean over tokens, bundled pairs (concepts: "
                                           "vsteer pairs topic templates, 64 pairs)"},
                     "behaviours": dict(previous.get("behaviours", {})), "centering": previous.get("centering")}
    model, tok = load_hf(path)
    paths = {name: extract(model, tok, name, "none", args.model) for name in names}
    centred = {}
    if "ocean" in names and not args.skip_centering:
        centred = {c: extract(model, tok, "ocean", c, args.model) for c in ("neutral", "both")}
    del model

    for name in names:
        grid = BEHAVIOURS[name]
        C.log(f"tune {name}: {len(grid['bands'])} bands x {len(grid['positions'])} positions x "
              f"{len(grid['strengths'])} strengths")
        t = time.perf_counter()
        rep = tune(path, str(paths[name]), behaviour=name, bands=grid["bands"], strengths=grid["strengths"],
                   positions=grid["positions"], max_ppl_ratio=args.budget, random_baselines=args.random_baselines,
                   backend="vllm", out=str(WORK / name), max_new_tokens=args.max_new_tokens, progress=False)
        print(format_tune(rep), flush=True)
        h = rep["tune"]["heldout"]
        results["behaviours"][name] = {
            "seconds": time.perf_counter() - t, "kind": rep["behaviour"]["kind"], "unit": rep["behaviour"]["unit"],
            "system_prompt": rep["behaviour"]["system_prompt"], "split": rep["tune"]["split"],
            "search": rep["tune"]["search"], "select_baseline": rep["tune"]["select_baseline"],
            "chosen": rep["tune"]["chosen"], "heldout": h, "checks": check(h, rep["behaviour"]["kind"]),
            "report": f"bench/out/{NAME}/{name}/report.json"}
        C.write_result(NAME, results, str(RESULT))

    if centred:
        prompts = load_prompts("concept_prompts.jsonl")
        sel = WORK / "ocean_select_prompts.jsonl"
        sel.write_text("".join(json.dumps({"prompt": prompts[i]}) + "\n"
                               for i in split_indices(len(prompts), "select", 0)))
        rows = []
        for center, vec in (("none", paths["ocean"]), *centred.items()):
            C.log(f"centring: ocean {center}")
            rep = run_sweep(path, str(vec), behaviour="ocean", backend="vllm", bands=[CENTERING["band"]],
                            positions=CENTERING["positions"], strengths=CENTERING["strengths"],
                            strength_unit="relative", prompts_file=str(sel), max_new_tokens=args.max_new_tokens,
                            random_baselines=0, prompting=False, progress=False, plots=False,
                            out=str(WORK / f"centering-{center}"))
            rows.append({"center": center, "points": [{k: p[k] for k in ("strength", "behaviour", "ppl_ratio",
                                                                        "distinct_2", "samples")}
                                                      for p in rep["points"] if p["strength"]]})
        results["centering"] = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in CENTERING.items()},
                                "prompts": "select half of concept_prompts.jsonl", "rows": rows}
    C.write_result(NAME, results, str(RESULT))
    return results


# -- markdown -----------------------------------------------------------------------------
def f(x, d: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def render(res: dict) -> str:
    p = res["params"]
    L = [BEGIN, "## Recipes against prompting (`bench/recipes.py`, `vsteer tune` on the vLLM backend)", "",
         f"{p['model']}; vectors: {p['vectors']}, layers 0-{max(p['extract_layers'])}. `vsteer tune` searched each "
         f"grid on the `select` half of the prompts under a {p['budget']:g}x perplexity budget, then scored the "
         f"chosen recipe on the `score` half (never seen by the search) against unsteered, the prompting baseline "
         f"(system message), steering + prompting, and {p['random_baselines']} same-norm random directions. Greedy, "
         f"up to {p['max_new_tokens']} new tokens. Concept rate = share of answers using a concept keyword; "
         "sentiment = held-out probe margin (nats). Strengths are fractions of the residual norm, summed over the "
         "band.", ""]
    rows = []
    for name, r in res["behaviours"].items():
        h, ch, ck = r["heldout"], r["chosen"], r["checks"]
        s, pr, b, u = h.get("steering"), h.get("prompting"), h.get("both"), h["unsteered"]
        recipe = f"layers {ch['band']}, {ch['strength']:g} rel, {ch['positions']}" if ch else "none in budget"
        rows.append([name, recipe, f(u["behaviour"]), f"{f(pr['behaviour'])} (x{f(pr['ppl_ratio'])})",
                     f"{f(s['behaviour'])} (x{f(s['ppl_ratio'])})" if s else "n/a",
                     f(s.get("z_vs_random"), 1) if s else "n/a",
                     f"{f(b['behaviour'])} (x{f(b['ppl_ratio'])})" if b else "n/a",
                     ", ".join(k for k, v in ck.items() if v is True and k != "metric") or "none",
                     ", ".join(k for k, v in ck.items() if v is False) or "-"])
    L.append("Held-out results (`score` half; perplexity ratio against unsteered in brackets):")
    L.append("")
    L.append(_table(["behaviour", "tuned recipe", "unsteered", "prompting", "steering", "z vs random",
                     "steering + prompting", "targets met", "targets not met"], rows))
    L += ["", "Search frontier on the `select` half: per band and positions, the best in-budget candidate "
          "(behaviour, perplexity ratio), and the strongest candidate tried:", ""]
    for name, r in res["behaviours"].items():
        groups: dict = {}
        for c in r["search"]:
            groups.setdefault((c["recipe"]["band"], c["recipe"]["positions"]), []).append(c)
        cells = []
        for (band, pos), cs in groups.items():
            inb = [c for c in cs if c["ppl_ratio"] is not None and c["ppl_ratio"] <= p["budget"]]
            best = max(inb, key=lambda c: c["behaviour"]) if inb else None
            top = max(cs, key=lambda c: abs(c["recipe"]["strength"]))
            cells.append([band, pos, f"{f(best['behaviour'])} @ {best['recipe']['strength']:g} (x{f(best['ppl_ratio'])})"
                          if best else "none", f"{f(top['behaviour'])} @ {top['recipe']['strength']:g} "
                          f"(x{f(top['ppl_ratio'])})"])
        L += [f"*{name}* (unsteered {f(r['select_baseline']['behaviour'])}):", "",
              _table(["layers", "positions", f"best within {p['budget']:g}x", "strongest tried"], cells), ""]
    cen = res.get("centering")
    if cen:
        L += [f"Mean-centring (ocean, layers {'-'.join(map(str, (cen['band'][0], cen['band'][-1])))}, positions "
              f"{cen['positions']}, {cen['prompts']}): concept rate (perplexity ratio) by strength:", ""]
        L.append(_table(["center"] + [f"{s:g}" for s in cen["strengths"]],
                        [[row["center"]] + [f"{f(pt['behaviour'])} (x{f(pt['ppl_ratio'])})" for pt in row["points"]]
                         for row in cen["rows"]]))
        L.append("")
    L += ["Samples (first held-out prompt, greedy):", ""]
    for name, r in res["behaviours"].items():
        for key in ("unsteered", "prompting", "steering", "both"):
            if r["heldout"].get(key) and r["heldout"][key]["samples"]:
                L.append(f"* {name}, {key}: {json.dumps(r['heldout'][key]['samples'][0])}")
    L += ["", END]
    return "\n".join(L)


def _table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_results_section(text: str) -> None:
    path = C.BENCH_DIR / "RESULTS.md"
    body = path.read_text()
    if BEGIN in body and END in body:
        body = body[:body.index(BEGIN)] + text + body[body.index(END) + len(END):]
    else:
        body = body.rstrip() + "\n\n" + text + "\n"
    path.write_text(body)
    print(f"wrote the recipe section of {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--only", help="comma list of behaviours (default: all four)")
    p.add_argument("--budget", type=float, default=1.2, help="perplexity budget of the search")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--random-baselines", type=int, default=5)
    p.add_argument("--skip-centering", action="store_true")
    p.add_argument("--render", action="store_true", help="only print the markdown section from the JSON")
    p.add_argument("--write-results", action="store_true", help="with --render: put it into bench/RESULTS.md")
    args = p.parse_args(argv)
    res = json.loads(RESULT.read_text()) if args.render else run_study(args)
    text = render(res)
    print(text)
    if args.write_results:
        write_results_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
