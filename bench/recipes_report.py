"""Analysis and markdown of the recipe study (bench/recipes.py): the choice rules replayed
on random splits of the development prompts, the held-out results against issue 22's
targets. Pure functions of the cached units."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BEGIN, END = "<!-- recipe-study:begin -->", "<!-- recipe-study:end -->"
SPLITS = 400           # random select/score splits the rules are replayed on
RULES = ("max", "lcb", "folds", "smooth")


# -- development: replaying the rules ------------------------------------------------------------
def _ppl(row: dict, idx: list[int]) -> float:
    s = sum(row["lp"][i][0] for i in idx)
    n = sum(row["lp"][i][1] for i in idx)
    return math.exp(-s / n) if n else float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _choose(rows: list[dict], base: dict, idx: list[int], rule: str, budget: float | None, seed: int) -> dict | None:
    from vsteer.eval.choice import choose

    p0 = _ppl(base, idx)
    cands = [{"row": r, "items": [r["items"][i] for i in idx], "behaviour": _mean([r["items"][i] for i in idx]),
              "ppl_ratio": _ppl(r, idx) / p0, "recipe": r["recipe"] or {}} for r in rows]
    picked = choose(cands, [base["items"][i] for i in idx], rule=rule, max_ppl_ratio=budget, seed=seed)
    return picked["row"] if picked else None


def replay(rows: list[dict], base: dict, n: int, budget: float | None,
           half: int | None = None) -> dict[str, dict[str, float]]:
    """Per rule, over ``SPLITS`` random splits into a select and a score part of ``half``
    prompts each (default: halves): the chosen candidate's mean on the select part, on
    the score part, the drop, and how often nothing qualified."""
    out = {}
    k_sel = half or (n + 1) // 2
    for rule in RULES:
        sel, sco, none = [], [], 0
        for k in range(SPLITS):
            order = list(range(n))
            random.Random(1000 + k).shuffle(order)
            a, b = sorted(order[:k_sel]), sorted(order[k_sel:k_sel + (half or n)])
            row = _choose(rows, base, a, rule, budget, k)
            if row is None:
                none += 1
                sel.append(_mean([base["items"][i] for i in a]))
                sco.append(_mean([base["items"][i] for i in b]))
                continue
            sel.append(_mean([row["items"][i] for i in a]))
            sco.append(_mean([row["items"][i] for i in b]))
        out[rule] = {"select": _mean(sel), "score": _mean(sco), "drop": _mean([x - y for x, y in zip(sel, sco)]),
                     "none": none / SPLITS}
    return out


def analyse_dev(units: dict[str, dict], budget: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, u in units.items():
        rows = u["rows"]
        base = next(r for r in rows if r["kind"] == "baseline")
        n = len(base["items"])
        steer = [r for r in rows if r["kind"] == "sweep"]
        prompts = [r for r in rows if r["kind"] == "prompting"]
        p0 = _ppl(base, list(range(n)))
        table = [{"key": r["key"], "system": r["system"], "behaviour": r["behaviour"],
                  "ppl_ratio": _ppl(r, list(range(n))) / p0, "sample": r["sample"]} for r in [base] + steer + prompts]
        out[key] = {"concept": u["concept"], "method": u["method"], "n_prompts": n, "table": table,
                    "extract": {k: u["extract"][k] for k in ("argv", "token_position", "check", "training")},
                    "steering_rules": replay(steer, base, n, budget),
                    "prompting_rules": replay(prompts, base, n, None) if prompts else None,
                    "steering_rules_12": replay(steer, base, n, budget, half=12),
                    "prompting_rules_12": replay(prompts, base, n, None, half=12) if prompts else None,
                    "random": u.get("random")}
    return out


# -- held out: the targets ---------------------------------------------------------------------
def _h(u: dict, key: str) -> dict | None:
    return (u["tune"]["heldout"] or {}).get(key)


def analyse_heldout(units: dict[str, dict], budget: float) -> dict[str, Any]:
    concepts = sorted({u["concept"] for u in units.values()})
    out: dict[str, Any] = {}
    for c in concepts:
        main = {m: units.get(f"{c}-{m}-auto") for m in ("caa", "bipo")}
        entry: dict[str, Any] = {"methods": {}}
        for m, u in main.items():
            if u is None:
                continue
            t = u["tune"]
            entry["methods"][m] = {
                "chosen": t["chosen"], "system_prompt": t["chosen_system_prompt"], "gap": t.get("gap"),
                "select_rule_score": (t["chosen"] or {}).get("select", {}).get("rule_score"),
                "chosen_with_prompt": t.get("chosen_with_prompt"),
                "with_prompt_rule_score": (t.get("chosen_with_prompt") or {}).get("select", {}).get("rule_score"),
                **{k: _h(u, k) for k in ("unsteered", "prompting", "steering", "both")},
                "z": (_h(u, "steering") or {}).get("z_vs_random"), "check": u["extract"]["check"],
                "training": u["extract"].get("training"), "extract": u["extract"]["argv"],
                "token_position": u["extract"]["token_position"], "frontier": frontier(t.get("search") or []),
                "select_unsteered": (t.get("select_baseline") or {}).get("behaviour")}
        ms = entry["methods"]
        if ms:  # the best method is chosen on the select half only (its rule score), never on the score half
            scored = {m: v["select_rule_score"] for m, v in ms.items() if v["select_rule_score"] is not None}
            entry["best_method"] = max(scored, key=scored.get) if scored else None
            combined = {m: v["with_prompt_rule_score"] for m, v in ms.items() if v["with_prompt_rule_score"] is not None}
            entry["best_with_prompt"] = max(combined, key=combined.get) if combined else None
        positions = {"auto": units.get(f"{c}-caa-auto")} | {p: units.get(f"{c}-caa-{p}") for p in ("last", "first")}
        unsteered = _rate(_h(main["caa"], "unsteered")) if main.get("caa") else float("nan")
        entry["positions"] = {p: {"token_position": u["extract"]["token_position"], "check": u["extract"]["check"],
                                  "steering": _h(u, "steering"), "chosen": u["tune"]["chosen"],
                                  "zero_vector": bool(u.get("zero_vector")),
                                  # the vector's strongest select-half point at any perplexity: do positions differ
                                  # at all, where no tuned recipe fits the budget?
                                  "strongest": frontier(u["tune"].get("search") or [])["any"],
                                  # what the position gives: its tuned steering, else (nothing moved, or a zero
                                  # vector) the unsteered model
                                  "rate": _rate(_h(u, "steering")) if _h(u, "steering") else unsteered}
                              for p, u in positions.items() if u is not None}
        out[c] = entry
    out["targets"] = targets(out)
    return out


FRONTIER = (1.2, 1.3, 1.5, 2.0, None)  # perplexity bounds of the frontier table (None: any)


def frontier(search: list[dict]) -> dict[str, dict | None]:
    """The strongest select-half point of a search within each bound of ``FRONTIER``: how
    much a method moves the rate for how much perplexity, whether or not a choice fits."""
    out: dict[str, dict | None] = {}
    for bound in FRONTIER:
        inside = [r for r in search if r.get("behaviour") is not None and r.get("ppl_ratio") is not None
                  and (bound is None or r["ppl_ratio"] <= bound)]
        best = max(inside, key=lambda r: (r["behaviour"], -r["ppl_ratio"]), default=None)
        out["any" if bound is None else f"{bound:g}"] = best and {
            "behaviour": best["behaviour"], "ppl_ratio": best["ppl_ratio"], "band": best["recipe"]["band"],
            "strength": best["recipe"]["strength"]}
    return out


def _rate(x: dict | None) -> float:
    return x["behaviour"] if x and x.get("behaviour") is not None else float("nan")


def targets(held: dict[str, Any]) -> dict[str, Any]:
    """Issue 22's three targets, each with its distance where missed."""
    concepts = [c for c in held if c != "targets"]
    t1, t2, t3 = {}, {}, {}
    for c in concepts:
        e = held[c]
        if not e["methods"]:
            continue
        # no method chose a recipe: the user gets the unsteered model (rate of unsteered, x1.00, no z)
        best = e.get("best_method")
        m = e["methods"][best] if best else next(iter(e["methods"].values()))
        unsteered, p = _rate(m["unsteered"]), _rate(m["prompting"])
        s = _rate(m["steering"]) if m["steering"] else unsteered
        ppl = (m["steering"] or {}).get("ppl_ratio", 1.0)
        z = m["z"] if m["steering"] else None
        t1[c] = {"method": best or "none chosen", "steering": s, "prompting": p, "ppl_ratio": ppl, "z": z,
                 "met": bool(s >= p and ppl is not None and ppl <= 1.3 and z is not None and z >= 3),
                 "distance": {"rate": max(0.0, p - s), "ppl": max(0.0, (ppl or 99) - 1.3), "z": max(0.0, 3 - (z or 0))}}
        # steering + prompting: the combined choice of the method whose choice held best on select; none: the
        # system message alone (nothing was added to it)
        bw = e.get("best_with_prompt")
        b = _rate(e["methods"][bw]["both"]) if bw and e["methods"][bw]["both"] else p
        t2[c] = {"method": bw or "nothing added", "both": b, "prompting": p, "met": bool(b > p),
                 "distance": max(0.0, p - b)}
        rates = {pos: v["rate"] for pos, v in e["positions"].items() if not math.isnan(v["rate"])}
        if "auto" in rates and len(rates) > 1:
            top = max(rates.values())
            t3[c] = {"rates": rates, "default": rates["auto"], "best": top, "met": rates["auto"] >= top - 0.05,
                     "distance": max(0.0, top - 0.05 - rates["auto"]),
                     # no position moved the rate above unsteered: met, but it says nothing about the default
                     "vacuous": top <= _rate(m["unsteered"])}
    n1 = sum(v["met"] for v in t1.values())
    return {"steering_vs_prompting": {"per_concept": t1, "met": n1 >= 2, "count": n1, "needed": 2},
            "both_beats_prompting": {"per_concept": t2, "met": bool(t2) and all(v["met"] for v in t2.values())},
            "default_position": {"per_concept": t3, "met": bool(t3) and all(v["met"] for v in t3.values())}}


# -- markdown ----------------------------------------------------------------------------------------
def f(x: Any, d: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _recipe(ch: dict | None) -> str:
    return f"layers {ch['band']}, {ch['strength']:g} rel, {ch['positions']}" if ch else "none in budget"


def _point(x: dict | None, ppl: bool = True) -> str:
    """A ``frontier`` point: its rate (and perplexity ratio), band and relative strength."""
    if not x:
        return "n/a"
    return f"{_cell(x) if ppl else f(x['behaviour'])} ({x['band']}, {x['strength']:g})"


def _cell(r: dict | None) -> str:
    return f"{f(r['behaviour'])} (x{f(r.get('ppl_ratio'))})" if r else "n/a"


def render(res: dict) -> str:
    p = res["params"]
    L = [BEGIN, "## Recipes against prompting (`bench/recipes.py`, issue 22)", "",
         f"{p['model']}, `{p['backend']}` backend, greedy, {p['max_new_tokens']} new tokens. Vectors made as a user "
         f"makes them: `vsteer extract --pairs P --layers {p['layers']}` with the CLI defaults (token position from "
         "the pairs: `mean` for these whole-sentence topic pairs; the held-out check), for `caa` and for `bipo` "
         "(trained with its defaults: at 0.2 relative over the band, each pair a reply in a chat turn; "
         "docs/extraction.md; this is its second version, as the first did nothing in generations; "
         "eval/data/heldout/README.md lists when the held-out list was scored). `vsteer tune` grid: bands "
         f"{', '.join('-'.join(map(str, (b[0], b[-1]))) for b in p['grid']['bands'])} x strengths "
         f"{', '.join(map(str, p['grid']['strengths']))} (relative, summed over the band) x positions "
         f"{', '.join(p['grid']['positions'])}; budget {p['budget']:g}x perplexity on the select half; prompting = "
         "the best of the system-message templates on the select half. Concept rate = share of answers that "
         "mention the concept (keyword scorer).", ""]
    held = res.get("heldout") or {}
    L += _render_targets(held.get("targets"))
    for budget, rep in (res.get("replays") or {}).items():
        L += _render_replay(budget, rep)
    L += _render_heldout(held, p)
    L += _render_dev(res.get("dev") or {}, p)
    L += ["", END]
    return "\n".join(L)


def _render_targets(t: dict | None, positions: bool = True) -> list[str]:
    if not t:
        return ["No held-out results yet.", ""]
    a, b, c = t["steering_vs_prompting"], t["both_beats_prompting"], t["default_position"]
    rows = [["tuned steering (best method) >= tuned prompting, perplexity <= 1.3x, z >= 3, on >= 2 of 3",
             f"{a['count']} of {len(a['per_concept'])}: " + "; ".join(
                 f"{k} {v['method']} {f(v['steering'])} vs {f(v['prompting'])}, x{f(v['ppl_ratio'])}, z {f(v['z'], 1)}"
                 + ("" if v["met"] else f" (short by rate {f(v['distance']['rate'])}, ppl {f(v['distance']['ppl'])}, "
                                        f"z {f(v['distance']['z'], 1)})") for k, v in a["per_concept"].items()),
             "met" if a["met"] else "**not met**"],
            ["steering + prompting > prompting alone, on all 3",
             "; ".join(f"{k} {v['method']} {f(v['both'])} vs {f(v['prompting'])}" + ("" if v["met"] else
                                                                      f" (short by {f(v['distance'])})")
                       for k, v in b["per_concept"].items()), "met" if b["met"] else "**not met**"],
            ["CLI default position within 0.05 of the best position's rate",
             "; ".join(f"{k} default {f(v['default'])}, best {f(v['best'])} ("
                       + ", ".join(f"{pos} {f(r)}" for pos, r in v["rates"].items()) + ")"
                       + ("" if v["met"] else f", short by {f(v['distance'])}")
                       + ("; vacuous: no position moved the rate" if v.get("vacuous") else "")
                       for k, v in c["per_concept"].items()),
             ("met" if c["met"] else "**not met**")
             + (" (vacuous where no position steered)" if any(v.get("vacuous") for v in c["per_concept"].values())
                else "")]][:3 if positions else 2]
    return ["Targets (held-out concepts, `score` half of the held-out prompts):", "",
            _table(["target", "measured", ""], rows), ""]


def _render_replay(budget: str, rep: dict) -> list[str]:
    """The held-out choices made again at another budget (``recipes.replay_unit``)."""
    t = rep.get("targets")
    if not t:
        return []
    rows = []
    for c in (k for k in rep if k != "targets"):
        for m, v in rep[c]["methods"].items():
            rows.append([c, m, _recipe(v["chosen"]), _cell(v["steering"]), f(v["z"], 1),
                         _recipe(v.get("chosen_with_prompt")), _cell(v["both"]), _cell(v["prompting"])])
    head = (f"Secondary: the same held-out units with both choices made at {budget}x, the targets' own perplexity "
            "bound, instead of the search budget above (replayed from the stored per-prompt select scores, new "
            "choices scored on the score half; this replay was added after the run above was seen):")
    return [head, "", _table(["concept", "method", "tuned recipe", "steering", "z vs random",
                              "recipe with the message", "steering + prompting", "prompting"], rows), ""] + \
        _render_targets(t, positions=False)[2:]


def _render_heldout(held: dict, p: dict) -> list[str]:
    names = [k for k in held if k != "targets"]
    if not names:
        return []
    rows = []
    for c in names:
        e = held[c]
        for m, v in e["methods"].items():
            g = (v.get("gap") or {}).get("steering")
            rows.append([c, m + (" (best)" if m == e.get("best_method") else ""), _recipe(v["chosen"]),
                         f(v["unsteered"]["behaviour"]) if v["unsteered"] else "n/a", _cell(v["prompting"]),
                         _cell(v["steering"]), f(v["z"], 1), _recipe(v.get("chosen_with_prompt")),
                         _cell(v["both"]), f"{f(g['select'])} -> {f(g['score'])}" if g else "n/a"])
    L = ["Held-out concepts (`score` half, 32 prompts; perplexity ratio against unsteered in brackets; best method "
         "= higher rule score on the `select` half; the recipe added to the system message is searched on its own, "
         "by its gain over the message alone):", "",
         _table(["concept", "method", "tuned recipe", "unsteered", "prompting", "steering", "z vs random",
                 "recipe with the message", "steering + prompting", "steering select -> score"], rows), ""]
    frows = [[c, m, f(v.get("select_unsteered"))] + [_point(x, ppl=False) for x in v["frontier"].values()]
             for c in names for m, v in held[c]["methods"].items() if v.get("frontier")]
    if frows:
        L += ["Select-half frontier (no prompting): the highest concept rate of any grid point within each perplexity "
              "bound (band, relative strength):", "",
              _table(["concept", "method", "unsteered", *(f"<= {b:g}x" if b else "any" for b in FRONTIER)], frows), ""]
    L.append("Chosen system messages: " + "; ".join(
        f"{c}: {json.dumps(next(iter(held[c]['methods'].values()))['system_prompt'])}" for c in names) + ".")
    L.append("")
    prow = []
    for c in names:
        for pos, v in held[c]["positions"].items():
            ck = v.get("check") or {}
            prow.append([c, pos if pos != "auto" else f"default ({v['token_position']})",
                         "zero vector: not searched" if v["zero_vector"] else _recipe(v["chosen"]),
                         _cell(v["steering"]) if v["steering"] else f"{f(v['rate'])} (unsteered)",
                         _point(v.get("strongest")),
                         f"{f(ck.get('accuracy'))} / {f(ck.get('gain'))} (z {f(ck.get('z'), 1)})",
                         "weak" if ck.get("weak") else "ok"])
    L += ["Token positions (caa; each vector searched the same way, no prompting; check = held-out projection "
          "accuracy / likelihood gain in nats per pair at 0.2 relative, z against random directions):", "",
          _table(["concept", "position", "tuned recipe", "steering (score half)",
                  "strongest select point, any perplexity", "extract check", "warning"], prow),
          ""]
    trows = []
    for c in names:
        tr = (held[c]["methods"].get("bipo") or {}).get("training")
        if tr:
            cos = list((tr.get("cosine_to_caa") or {}).values())
            trows.append([c, tr.get("context", "plain"), f(tr["before"]["train"]["objective"], 3),
                          f(tr["after"]["train"]["objective"], 3),
                          f"{f(tr['before']['heldout']['accuracy'])} -> {f(tr['after']['heldout']['accuracy'])}",
                          f"{f(tr['after']['heldout']['mean_delta'])}",
                          f"{f(min(cos))}-{f(max(cos))}" if cos else "n/a"])
    if trows:
        L += ["`bipo` training (held-out = the 25% of pairs training never saw; gain at the trained size):", "",
              _table(["concept", "context", "objective before", "after", "held-out preference accuracy",
                      "held-out gain (nats/pair)", "cosine to caa"], trows), ""]
    return L


def _render_dev(dev: dict, p: dict) -> list[str]:
    if not dev:
        return []
    L = [f"Development concepts: choice rules replayed on {SPLITS} random select/score splits of the "
         f"{next(iter(dev.values()))['n_prompts']} development prompts (every candidate measured on every prompt). "
         "Mean concept rate of the chosen candidate on the select half, on the score half, and the drop:", ""]
    rows = []
    for key, d in dev.items():
        for what, size in (("steering", ""), ("prompting", ""), ("steering", "_12"), ("prompting", "_12")):
            rules = d.get(f"{what}_rules{size}")
            if rules and (what == "steering" or d["method"] == "caa"):
                rows.append([d["concept"], d["method"] if what == "steering" else "prompting",
                             "12 / 12" if size else f"{(d['n_prompts'] + 1) // 2} / {d['n_prompts'] // 2}"] +
                            [f"{f(r['select'])} -> {f(r['score'])} ({f(r['drop'])})" for r in rules.values()])
    L += [_table(["concept", "what", "select / score prompts", *RULES], rows), ""]
    zrows = []
    for key, d in dev.items():
        z = d.get("random")
        if z and z.get("recipe"):
            rz = z["random"] or {}
            zrows.append([d["concept"], d["method"], _recipe(z["recipe"]), f(z["unsteered"]),
                          f"{f(z['behaviour'])} (x{f(z['ppl_ratio'])})", f(rz.get("z"), 1),
                          f"{f(rz.get('random_mean'))} ± {f(rz.get('random_std'))}"])
    if zrows:
        L += ["The recipe `lcb` picks on all development prompts, against same-norm random directions (same "
              "prompts; chosen and measured on the same prompts, so optimistic):", "",
              _table(["concept", "method", "recipe", "unsteered", "steering", "z vs random", "random effect"], zrows), ""]
    L += ["Every candidate on all development prompts (rate, perplexity ratio):", ""]
    for key, d in dev.items():
        cells = [f"{r['key']} {f(r['behaviour'])} (x{f(r['ppl_ratio'])})" for r in d["table"] if not r["system"]]
        L.append(f"* {d['concept']}, {d['method']}: " + "; ".join(cells))
        prompts = [f"{f(r['behaviour'])} (x{f(r['ppl_ratio'])})" for r in d["table"] if r["system"]]
        if prompts:
            L.append(f"* {d['concept']}, system-message templates: " + "; ".join(prompts))
    return L + [""]


def write_results_section(text: str) -> None:
    path = C.BENCH_DIR / "RESULTS.md"
    body = path.read_text()
    if BEGIN in body and END in body:
        body = body[:body.index(BEGIN)] + text + body[body.index(END) + len(END):]
    else:
        body = body.rstrip() + "\n\n" + text + "\n"
    path.write_text(body)
    print(f"wrote the recipe section of {path}")
