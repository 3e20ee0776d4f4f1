"""The recipe study (issues 15 and 22): does tuned steering beat a *tuned* prompt, on
concepts the project never developed on, on held-out prompts?

Two lists (eval/data/heldout/README.md): **development** concepts (ocean, cooking, space;
eval/data/concept_prompts.jsonl) for choosing defaults, and **held-out** concepts
(dinosaurs, birds, volcanoes; their own pairs, scorers and prompts, committed before any
tuning) scored once. Every vector is made the way a user makes it: `vsteer extract
--pairs P --layers 3-10 --out V` with the CLI's defaults (the token position chosen from
the pairs, the weak-vector check), for each method (`caa`, and `bipo`, the trained
direction).

* ``dev``: per development concept (caa; bipo on ocean), every candidate of the grid and
  every prompting template on 64 development prompts (halves of 32, as the held-out
  prompts split); then the choice rules of `vsteer tune` (``eval/choice.py``) are
  replayed on many random select/score splits: which rule's choice holds on the other half.
* ``heldout``: per held-out concept, `vsteer tune` (select half: recipe and system message;
  score half: unsteered, prompting, steering, steering + prompting, 5 same-norm random
  directions) for each method; then (``replay``) both choices made again from the stored
  select scores at 1.3x, the targets' own perplexity bound (a secondary result, added after
  the 1.2x run was seen); and, for the default-position target, the same search for
  vectors read at the other token positions.

Each unit of work is cached in bench/out/recipes/units/ (re-runs skip finished units;
``--minutes`` stops after the unit that passes that budget), the summary goes to
bench/out/recipes.json, and ``--render --write-results`` puts the section into
bench/RESULTS.md.

    flock /work/heavy.lock python bench/recipes.py --stage dev --minutes 18      # repeat until done
    flock /work/heavy.lock python bench/recipes.py --stage heldout --minutes 18
    python bench/recipes.py --render --write-results
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import recipes_report as R  # noqa: E402

NAME = "recipes"
WORK = C.OUT_DIR / NAME
UNITS = WORK / "units"
RESULT = C.OUT_DIR / f"{NAME}.json"
ROOT = C.BENCH_DIR.parent
HELD_DIR = ROOT / "eval" / "data" / "heldout"
DEV = ("ocean", "cooking", "space")
METHODS = ("caa", "bipo")
LAYERS = "3-10"
GRID = dict(bands=[(6, 7, 8, 9), tuple(range(3, 11))], positions=("all",), strengths=(0.1, 0.15, 0.2, 0.3))
DEV_BIPO = ("ocean",)  # bipo in generations on one development concept (CPU time); its settings: bipo_dev.py
OTHER_POSITIONS = ("last", "first")   # the CLI default (auto) is "mean" for these whole-sentence pairs
REPLAY_BUDGETS = ("1.3",)  # the targets' perplexity bound: the held-out choices replayed at it (secondary)
TINY = ("0-3", [(1, 2), (0, 1, 2, 3)])  # the tiny test model has 4 layers (smoke runs)


def heldout_names() -> list[str]:
    lines = (HELD_DIR / "concepts.jsonl").read_text().splitlines()
    return [json.loads(line)["name"] for line in lines if line.strip()]


def _unit(kind: str, *parts: str) -> Path:
    return UNITS / f"{kind}-{'-'.join(parts)}.json"


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, data: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(C.clean(data), indent=1))
    return data


def extract(args: argparse.Namespace, concept: str, pairs: str, method: str, position: str = "auto") -> dict:
    """`vsteer extract` as a user runs it; returns where it wrote and what it printed."""
    from vsteer.cli.main import main as cli
    from vsteer.engine.formats import load_vector_set

    out = WORK / "vectors" / f"{concept}-{method}-{position}"
    argv = ["extract", "--model", args.model, "--pairs", pairs, "--layers", LAYERS, "--out", str(out), "--no-progress"]
    argv += ["--method", method] if method != "caa" else []
    argv += ["--token-position", position] if position != "auto" else []
    if not (out / "vsteer.json").is_file():
        buf, err = io.StringIO(), io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            rc = cli(argv)
        if rc != 0:
            raise RuntimeError(f"vsteer {' '.join(argv)} failed: {err.getvalue()}")
        (out / "extract.log").write_text(f"$ vsteer {' '.join(argv)}\n{buf.getvalue()}{err.getvalue()}"
                                         f"[{time.perf_counter() - started:.0f} s]\n")
    vs = load_vector_set(str(out))
    return {"path": str(out), "argv": "vsteer " + " ".join(argv[:1] + argv[3:]), "method": vs.method,
            "token_position": vs.params.get("token_position", vs.params.get("init_token_position")),
            "check": vs.provenance.get("check"), "training": vs.provenance.get("training"),
            "log": (out / "extract.log").read_text() if (out / "extract.log").is_file() else ""}


# -- development: every candidate on every prompt ---------------------------------------------
def dev_unit(args: argparse.Namespace, concept: str, method: str) -> dict:
    from vsteer.engine.models import load_hf
    from vsteer.eval import analysis
    from vsteer.eval.execute import Session
    from vsteer.eval.plan import Condition
    from vsteer.eval.recipes import variants
    from vsteer.eval.sweep import _setup
    from vsteer.extract.pairs import ContrastPairDataset

    path = _unit("dev", concept, method)
    if (got := _done(path)) is not None:
        return got
    pairs = WORK / "pairs" / f"{concept}.jsonl"
    if not pairs.is_file():
        ContrastPairDataset.from_bundled(concept).save(pairs)
    ex = extract(args, concept, str(pairs), method)
    vs, beh, probes, prompts = _setup(ex["path"], concept, None, None, None, args.dev_prompts, None)
    grid = variants(GRID["bands"], units=("relative",), positions=GRID["positions"])
    conds = [Condition("baseline", "baseline")] + [Condition(f"{v.label()}:{s:g}", "sweep", v.at(s))
                                                   for v in grid for s in GRID["strengths"]]
    if method == METHODS[0]:
        conds += [Condition(f"prompt:{i}", "prompting", prompted=True, system=t) for i, t in enumerate(beh.system_prompts)]
    used = sorted({x for b in GRID["bands"] for x in b})
    started = time.perf_counter()
    with Session(C.resolve_model(args.model), vs.select(used), [], beh, prompts=prompts, probes=probes,
                 max_new_tokens=args.max_new_tokens, backend=args.backend, batch_size=args.batch_size,
                 hf_model=load_hf(C.resolve_model(args.model)) if args.backend == "hf" else None,
                 progress=False) as session:
        session.run(conds, desc=f"dev {concept} {method}")
    rows = []
    for c in conds:
        analysis.score(c, beh, args.max_new_tokens)
        rows.append({"key": c.key, "kind": c.kind, "recipe": c.recipe.to_dict() if c.recipe else None,
                     "system": c.system, "items": c.result["item_scores"],
                     "lp": [[sum(lp), len(lp)] for lp in c.result["unsteered_logprobs"]],
                     "behaviour": c.result["behaviour"], "perplexity": c.result["perplexity"],
                     "sample": c.result["texts"][0]})
    return _save(path, {"concept": concept, "method": method, "extract": ex, "n_prompts": len(prompts),
                        "rows": rows, "seconds": time.perf_counter() - started})


def devz_unit(args: argparse.Namespace, concept: str, method: str) -> dict:
    """Random directions for the development list: the recipe ``lcb`` picks on all
    development prompts, against ``--random-baselines`` same-norm random directions."""
    from vsteer.engine.formats import load_vector_set
    from vsteer.engine.models import load_hf
    from vsteer.eval import analysis
    from vsteer.eval.choice import choose
    from vsteer.eval.execute import Session
    from vsteer.eval.plan import Condition, random_sets
    from vsteer.eval.recipes import Recipe
    from vsteer.eval.sweep import _setup

    path = _unit("devz", concept, method)
    if (got := _done(path)) is not None:
        return got
    dev = dev_unit(args, concept, method)
    rows = dev["rows"]
    base = next(r for r in rows if r["kind"] == "baseline")
    p0 = R._ppl(base, list(range(len(base["items"]))))
    cands = [{"row": r, "items": r["items"], "behaviour": r["behaviour"], "recipe": r["recipe"],
              "ppl_ratio": R._ppl(r, list(range(len(r["items"])))) / p0} for r in rows if r["kind"] == "sweep"]
    picked = choose(cands, base["items"], rule="lcb", max_ppl_ratio=args.budget)
    if picked is None:
        return _save(path, {"concept": concept, "method": method, "recipe": None})
    rc = picked["recipe"]
    recipe = Recipe.from_dict(rc)
    vs = load_vector_set(dev["extract"]["path"])
    _, beh, probes, prompts = _setup(vs, concept, None, None, None, args.dev_prompts, None)
    randoms = random_sets(vs, list(recipe.layers), args.random_baselines, 0)
    conds = [Condition("baseline", "baseline"), Condition("steering", "sweep", recipe)] + \
        [Condition(f"R{i}", "random", recipe, random_index=i) for i in range(args.random_baselines)]
    with Session(C.resolve_model(args.model), vs.select(list(recipe.layers)), randoms, beh, prompts=prompts,
                 probes=probes, max_new_tokens=args.max_new_tokens, backend=args.backend, batch_size=args.batch_size,
                 hf_model=load_hf(C.resolve_model(args.model)) if args.backend == "hf" else None,
                 progress=False) as session:
        session.run(conds, desc=f"devz {concept} {method}")
    for c in conds:
        analysis.score(c, beh, args.max_new_tokens)
    z = analysis.random_comparison(conds, conds[0], conds[1])
    return _save(path, {"concept": concept, "method": method, "recipe": recipe.to_dict(),
                        "behaviour": conds[1].result["behaviour"], "ppl_ratio": picked["ppl_ratio"],
                        "unsteered": conds[0].result["behaviour"], "random": z})


# -- held out: vsteer tune per method, and the other token positions ------------------------
def heldout_unit(args: argparse.Namespace, concept: str, method: str, position: str = "auto") -> dict:
    from vsteer.eval.tune import format_tune, tune

    path = _unit("heldout", concept, method, position)
    if (got := _done(path)) is not None:
        return got
    ex = extract(args, concept, str(HELD_DIR / f"{concept}.pairs.jsonl"), method, position)
    main = position == "auto"
    if not main and _zero(ex["path"]):  # nothing to search: a zero vector steers nothing at any strength
        return _save(path, {"concept": concept, "method": method, "position": position, "extract": ex,
                            "zero_vector": True, "tune": {"chosen": None, "heldout": {}}})
    system = None
    if main and method != METHODS[0]:  # the system message was chosen once, with the first method
        system = [heldout_unit(args, concept, METHODS[0])["tune"]["chosen_system_prompt"]]
    started = time.perf_counter()
    rep = tune(args.model, ex["path"], scorer=str(HELD_DIR / f"{concept}.scorer.json"),
               prompts_file=str(HELD_DIR / "prompts.jsonl"), bands=GRID["bands"], strengths=GRID["strengths"],
               positions=GRID["positions"], max_ppl_ratio=args.budget, system_prompt=system, prompting=main,
               random_baselines=args.random_baselines if main else 0, backend=args.backend,
               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=str(path.with_suffix("")),
               progress=False, plots=False)
    print(format_tune(rep), flush=True)
    return _save(path, {"concept": concept, "method": method, "position": position, "extract": ex,
                        "behaviour": rep["behaviour"], "tune": rep["tune"], "seconds": time.perf_counter() - started})


def replay_unit(args: argparse.Namespace, concept: str, method: str, budget: str) -> dict:
    """The held-out unit's two choices (steering alone, steering on top of the message) made
    again at another perplexity budget from its stored per-prompt select scores, and
    scored on the score half like ``vsteer tune`` does. ``REPLAY_BUDGETS`` is the targets'
    own bound (1.3x), added after the 1.2x run was seen: a secondary result, labelled so."""
    from vsteer.engine.models import load_hf
    from vsteer.eval.choice import choose
    from vsteer.eval.execute import Session
    from vsteer.eval.plan import random_sets
    from vsteer.eval.recipes import Recipe
    from vsteer.eval.sweep import _setup
    from vsteer.eval.tune import chosen_summary, score_heldout

    path = _unit("replay", concept, method, budget)
    if (got := _done(path)) is not None:
        return got
    main = heldout_unit(args, concept, method)
    t = dict(main["tune"])
    rule, system = t["choice_rule"], t["chosen_system_prompt"]
    picked = choose(t["search"], t["select_baseline"]["items"], rule=rule, max_ppl_ratio=float(budget))
    alone = next((c for c in t["prompting_search"] if c["system_prompt"] == system), None)
    both = (choose(t["combined_search"], alone["items"], rule=rule, max_ppl_ratio=float(budget))
            if t.get("combined_search") and alone else None)
    recipe, both_recipe = (Recipe.from_dict(x["recipe"]) if x else None for x in (picked, both))
    same = (recipe, both_recipe) == tuple(Recipe.from_dict(x) if x else None
                                          for x in (t["chosen"], t.get("chosen_with_prompt")))
    started = time.perf_counter()
    if not same:
        vs, beh, probes, prompts = _setup(main["extract"]["path"], None, None, str(HELD_DIR / "prompts.jsonl"), system,
                                          None, None, scorer=str(HELD_DIR / f"{concept}.scorer.json"))
        used = sorted({x for b in GRID["bands"] for x in b})
        n_random = args.random_baselines
        with Session(C.resolve_model(args.model), vs.select(used), random_sets(vs, used, n_random, 0), beh,
                     prompts=prompts, probes=probes, max_new_tokens=args.max_new_tokens, backend=args.backend,
                     batch_size=args.batch_size, progress=False,
                     hf_model=load_hf(C.resolve_model(args.model)) if args.backend == "hf" else None) as session:
            t["heldout"] = score_heldout(session, recipe, system, beh, t["split"]["score"], n_random,
                                         args.max_new_tokens, 0, 2, both_recipe=both_recipe)
    t.update(max_ppl_ratio=float(budget), chosen=chosen_summary(recipe, picked),
             chosen_with_prompt=chosen_summary(both_recipe, both),
             replayed_from=main["tune"]["max_ppl_ratio"], rescored=not same)
    return _save(path, {**main, "tune": t, "budget": float(budget), "seconds": time.perf_counter() - started})


def _zero(path: str) -> bool:
    from vsteer.engine.formats import load_vector_set

    return all(float(v.norm()) == 0.0 for v in load_vector_set(path).vectors.values())


def units(stage: str, only: list[str] | None) -> list[tuple]:
    out: list[tuple] = []
    if stage in ("dev", "all"):
        out += [("dev", c, "caa") for c in DEV if not only or c in only]
        out += [("dev", c, "bipo") for c in DEV_BIPO if not only or c in only]
        out += [("devz", c, "caa") for c in DEV if not only or c in only]
        out += [("devz", c, "bipo") for c in DEV_BIPO if not only or c in only]
    if stage in ("heldout", "all"):  # method by method over the concepts: a time budget gets whole methods first
        names = [c for c in heldout_names() if not only or c in only]
        out += [("heldout", c, m, "auto") for m in METHODS for c in names]
        out += [("replay", c, m, b) for b in REPLAY_BUDGETS for m in METHODS for c in names]
        out += [("heldout", c, "caa", p) for p in OTHER_POSITIONS for c in names]
    return out


def run_study(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    todo = [u for u in units(args.stage, args.only.split(",") if args.only else None) if not _unit(*u).is_file()]
    for unit in todo:
        if (time.perf_counter() - started) / 60 > args.minutes:
            C.log(f"stopping: {args.minutes} min budget used; run again to continue")
            break
        kind, *rest = unit
        C.log(f"{kind} {' '.join(rest)}")
        {"dev": dev_unit, "devz": devz_unit, "heldout": heldout_unit, "replay": replay_unit}[kind](args, *rest)
    res = collect(args)
    C.write_result(NAME, res, str(RESULT))
    return res


def collect(args: argparse.Namespace) -> dict:
    """Everything finished so far, analysed (``recipes_report``)."""
    dev = {f"{u['concept']}-{u['method']}": u for u in map(_done, sorted(UNITS.glob("dev-*.json")))}
    for u in map(_done, sorted(UNITS.glob("devz-*.json"))):
        if f"{u['concept']}-{u['method']}" in dev:
            dev[f"{u['concept']}-{u['method']}"]["random"] = u
    held = {f"{u['concept']}-{u['method']}-{u['position']}": u for u in map(_done, sorted(UNITS.glob("heldout-*.json")))}
    replays = {}
    for u in map(_done, sorted(UNITS.glob("replay-*.json"))):
        replays.setdefault(f"{u['budget']:g}", {})[f"{u['concept']}-{u['method']}-auto"] = u
    return {"params": {"model": args.model, "max_new_tokens": args.max_new_tokens, "budget": args.budget,
                       "random_baselines": args.random_baselines, "layers": LAYERS, "backend": args.backend,
                       "grid": {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in GRID.items()},
                       "dev": list(DEV), "heldout": heldout_names(), "methods": list(METHODS)},
            "dev": R.analyse_dev(dev, args.budget), "heldout": R.analyse_heldout(held, args.budget),
            "replays": {b: R.analyse_heldout(u, float(b)) for b, u in replays.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--stage", choices=["dev", "heldout", "all"], default="all")
    p.add_argument("--only", help="comma list of concepts")
    p.add_argument("--budget", type=float, default=1.2, help="perplexity budget of the search (select half)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--random-baselines", type=int, default=5)
    p.add_argument("--dev-prompts", type=int, default=64,
                   help="development prompts per concept (64: halves of 32, as the held-out prompts split)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--batch-size", type=int, default=32, help="HF backend batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--minutes", type=float, default=1e9, help="stop after the unit that passes this many minutes")
    p.add_argument("--work", help="folder of the cached units (default: bench/out/recipes)")
    p.add_argument("--skip-centering", action="store_true", help=argparse.SUPPRESS)  # accepted (run_all's quick run)
    p.add_argument("--render", action="store_true", help="only print the markdown section from the JSON")
    p.add_argument("--write-results", action="store_true", help="with --render: put it into bench/RESULTS.md")
    args = p.parse_args(argv)
    global WORK, UNITS, LAYERS, RESULT
    if args.model == "tiny-llama":
        LAYERS, GRID["bands"] = TINY
    if args.work:
        WORK = Path(args.work)
        UNITS, RESULT = WORK / "units", WORK / f"{NAME}.json"
    res = collect(args) if args.render else run_study(args)
    text = render(res)
    print(text)
    if args.write_results:
        R.write_results_section(text)
    return 0


def render(res: dict) -> str:
    return R.render(res)


if __name__ == "__main__":
    sys.exit(main())
