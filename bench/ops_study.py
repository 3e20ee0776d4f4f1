"""The operators on SmolLM2 (issue 12), measured with ``vsteer eval`` on the vLLM backend:

1. **Ablating the refusal direction**: a refusal vector from the bundled refusal pairs
   (CAA, chat template, mean over tokens, every layer), removed (``op: ablate``) at every
   layer or at a middle band; the share of generations that open with a refusal phrase,
   on held-out requests an assistant should decline (``eval/data/refusal_prompts.jsonl``)
   and on the prompts of the bundled refusal pairs (training prompts, half of them
   harmless), against the unsteered model and same-norm random directions.
2. **``norm: preserve`` at the sentiment trade-off point**: the bench/eval_sweep vector
   (CAA, mean over tokens) at layer 6, strengths -2 and +2 (the trade-off points in
   RESULTS.md), added with ``norm: keep`` and ``norm: preserve``; perplexity ratio and
   score of each.

Writes bench/out/ops_study.json and the reports under bench/out/ops_study/.

    nice -n 15 python bench/ops_study.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "ops_study"


def refusal_prompts_file(work: Path) -> str:
    """The bundled refusal pairs' prompts as a generation-prompt file."""
    from vsteer.extract import ContrastPairDataset

    path = work / "refusal_pair_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in ContrastPairDataset.from_bundled("refusal")))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--random-baselines", type=int, default=5)
    p.add_argument("--sentiment-layer", type=int, default=6)
    p.add_argument("--sentiment-strengths", default="-2,2")
    p.add_argument("--generation-prompts", type=int, default=16)
    args = p.parse_args(argv)

    from vsteer.engine.formats import save_vector_set
    from vsteer.engine.models import load_hf
    from vsteer.eval.sweep import format_report, run_sweep
    from vsteer.extract import ContrastPairDataset, extract_caa

    path = C.resolve_model(args.model)
    work = C.OUT_DIR / NAME
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_hf(path)
    n_layers = model.config.num_hidden_layers
    C.log("extracting refusal (CAA, chat template, mean over tokens, all layers)")
    refusal = extract_caa(model, tok, ContrastPairDataset.from_bundled("refusal"), layers="all",
                          token_position="mean", chat_template=True, batch_size=16, progress=False,
                          behaviour="refusal", model_id=args.model)
    save_vector_set(refusal, str(work / "refusal"), overwrite=True)
    layer = args.sentiment_layer
    C.log(f"extracting sentiment (CAA, mean over tokens) at layer {layer}")
    sentiment = extract_caa(model, tok, ContrastPairDataset.from_bundled("sentiment"), layers=[layer],
                            token_position="mean", batch_size=16, progress=False, behaviour="sentiment",
                            model_id=args.model)
    save_vector_set(sentiment, str(work / "sentiment"), overwrite=True)
    del model

    third = n_layers // 3
    bands = [tuple(range(n_layers)), tuple(range(third, 2 * third))]
    results: dict = {"params": {"model": args.model, "max_new_tokens": args.max_new_tokens,
                                "random_baselines": args.random_baselines, "refusal_bands": [list(b) for b in bands],
                                "refusal_vector": f"CAA, chat template, mean over tokens, {len(refusal.layers)} "
                                                  "layers, bundled refusal pairs"}}
    results["refusal"] = {}
    for label, prompts in (("held-out requests", "refusal_prompts.jsonl"),
                           ("refusal pair prompts (training)", refusal_prompts_file(work))):
        C.log(f"refusal ablation on {label}")
        out = work / f"refusal-{'heldout' if 'held' in label else 'train'}"
        rep = run_sweep(path, str(work / "refusal"), behaviour="refusal", backend="vllm", bands=bands,
                        ops=["ablate"], prompts_file=prompts, strengths=[1.0], max_new_tokens=args.max_new_tokens,
                        random_baselines=args.random_baselines, prompting=False, progress=False, plots=False,
                        out=str(out))
        print(format_report(rep), flush=True)
        results["refusal"][label] = {
            "prompts": rep["generation"]["prompts"], "n_prompts": rep["generation"]["n_prompts"],
            "unsteered": rep["baseline"],
            "ablations": [{k: pt[k] for k in ("variant", "layers", "behaviour", "behaviour_ci95", "ppl_ratio",
                                              "distinct_2", "z_vs_random", "samples")}
                          for pt in rep["points"] if pt["op"] == "ablate"],
            "random": rep["random_baseline"], "report": str(out.relative_to(C.BENCH_DIR) / "report.json")}

    strengths = [float(x) for x in args.sentiment_strengths.split(",")]
    C.log(f"sentiment at layer {layer}, strengths {strengths}: norm keep vs preserve")
    rep = run_sweep(path, str(work / "sentiment"), behaviour="sentiment", backend="vllm", layers=[layer],
                    norms=["keep", "preserve"], strengths=strengths, n_generation_prompts=args.generation_prompts,
                    max_new_tokens=args.max_new_tokens, random_baselines=0, prompting=False, progress=False,
                    plots=False, out=str(work / "sentiment-norm"))
    print(format_report(rep), flush=True)
    results["norm_preserve"] = {
        "layer": layer, "strengths": strengths, "n_prompts": rep["generation"]["n_prompts"],
        "unsteered": {k: rep["baseline"][k] for k in ("behaviour", "perplexity", "distinct_2", "sentiment_lexicon")},
        "points": [{k: pt[k] for k in ("norm", "strength", "relative_strength", "behaviour", "behaviour_ci95",
                                       "perplexity", "ppl_ratio", "distinct_2", "sentiment_lexicon", "samples")}
                   for pt in rep["points"] if pt["strength"] != 0.0]}
    C.write_result(NAME, results)
    return 0


def report_lines(result: dict) -> list[str]:
    """The RESULTS.md section (bench/run_all.py calls this)."""
    p = result["params"]
    lines = ["## Operators on SmolLM2 (`bench/ops_study.py`)", "",
             f"{p['model']}, greedy, up to {p['max_new_tokens']} new tokens, {p['random_baselines']} same-norm random "
             f"directions per point. Refusal vector: {p['refusal_vector']}.", "",
             "**Ablating the refusal direction** (`op: ablate`): share of answers that open with a refusal phrase.", "",
             "| prompts | n | unsteered | ablated layers | refusal rate [95% CI] | perplexity ratio | z vs random |",
             "|---|---|---|---|---|---|---|"]

    def band(layers: list[int]) -> str:
        return f"{layers[0]}-{layers[-1]} ({len(layers)})"

    for label, r in result["refusal"].items():
        for a in r["ablations"]:
            ci = a.get("behaviour_ci95") or [None, None]
            lines.append(f"| {label} | {r['n_prompts']} | {r['unsteered']['behaviour']:.2f} | {band(a['layers'])} | "
                         f"{a['behaviour']:.2f} [{_num(ci[0])}, {_num(ci[1])}] | {_num(a['ppl_ratio'])} | "
                         f"{_num(a.get('z_vs_random'), 1)} |")
    n = result["norm_preserve"]
    lines += ["", f"**`norm: preserve` at the sentiment trade-off point** (layer {n['layer']}, {n['n_prompts']} "
              f"prompts; unsteered behaviour {n['unsteered']['behaviour']:.2f}, perplexity "
              f"{n['unsteered']['perplexity']:.2f}):", "",
              "| strength | norm | behaviour (nats) | perplexity ratio | distinct-2 |", "|---|---|---|---|---|"]
    for pt in sorted(n["points"], key=lambda q: (q["strength"], q["norm"])):
        lines.append(f"| {pt['strength']:g} | {pt['norm']} | {pt['behaviour']:.2f} | {_num(pt['ppl_ratio'])} | "
                     f"{_num(pt['distinct_2'])} |")
    lines.append("")
    return lines


def _num(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
