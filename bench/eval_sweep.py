"""The steering effect, measured: a sentiment vector extracted from the bundled pairs,
swept over strengths and layers with ``vsteer eval`` (vLLM backend), plus a check that
the HF and vLLM backends give the same numbers on the same (smaller) sweep.

Writes bench/out/eval_sweep.json (summary), and the full reports and plots under
bench/out/eval_sweep/{vllm,parity-hf,parity-vllm}/.

    python bench/eval_sweep.py                                   # SmolLM2, layers 6,10,14
    python bench/eval_sweep.py --model tiny-llama --layers 1,2 --prompts 6 --max-new-tokens 8   # quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "eval_sweep"


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--layers", default="6,10,14")
    p.add_argument("--strengths", default="-8,-4,-2,0,2,4,8")
    p.add_argument("--prompts", type=int, default=None, help="first N probes / generation prompts (default: all)")
    p.add_argument("--generation-prompts", type=int, default=None, help="first N generation prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--random-baselines", type=int, default=5)
    p.add_argument("--max-ppl-ratio", type=float, default=1.5)
    p.add_argument("--parity-layer", type=int, default=None, help="default: the middle of --layers")
    p.add_argument("--parity-strengths", default="-4,0,4")
    p.add_argument("--parity-prompts", type=int, default=8)
    p.add_argument("--parity-tokens", type=int, default=16)
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--out", help="summary JSON (default: bench/out/eval_sweep.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vsteer.engine.models import load_hf
    from vsteer.engine.formats import save_vector_set
    from vsteer.extract import ContrastPairDataset, extract_caa
    from vsteer.eval.sweep import format_report, run_sweep

    path = C.resolve_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    work = C.OUT_DIR / NAME
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_hf(path)
    C.log(f"extracting sentiment (CAA, mean over tokens) at layers {layers} from the bundled pairs")
    pairs = ContrastPairDataset.from_bundled("sentiment")
    vs = extract_caa(model, tok, pairs, layers=layers,
                     token_position="mean", batch_size=16, progress=False, behaviour="sentiment",
                     model_id=args.model)
    vec_dir = work / "vectors" / "sentiment"
    save_vector_set(vs, str(vec_dir), overwrite=True)

    summary: dict = {"params": {"model": args.model, "model_path": path, "layers": layers,
                                "strengths": _floats(args.strengths), "max_new_tokens": args.max_new_tokens,
                                "prompts": args.prompts,
                                "generation_prompts": args.generation_prompts,
                                "random_baselines": args.random_baselines,
                                "max_ppl_ratio": args.max_ppl_ratio,
                                "vector": f"sentiment, CAA mean difference (mean over tokens), "
                                          f"{len(pairs)} bundled pairs"}}
    parity = None
    if not args.skip_parity:
        player = args.parity_layer if args.parity_layer is not None else layers[len(layers) // 2]
        kw = dict(layers=[player], strengths=_floats(args.parity_strengths), n_prompts=args.parity_prompts,
                  max_new_tokens=args.parity_tokens, random_baselines=1, progress=False)
        C.log(f"parity: HF backend, layer {player}")
        t = time.perf_counter()
        hf = run_sweep(path, str(vec_dir), backend="hf", out=str(work / "parity-hf"), hf_model=(model, tok), **kw)
        hf_s = time.perf_counter() - t
        C.log("parity: vLLM backend")
        t = time.perf_counter()
        vl = run_sweep(path, str(vec_dir), backend="vllm", out=str(work / "parity-vllm"), **kw)
        vl_s = time.perf_counter() - t
        matched = list(zip(hf["points"], vl["points"]))
        parity = {
            "layer": player, "strengths": kw["strengths"], "probes": hf["behaviour"]["n_items"],
            "generation_prompts": hf["generation"]["n_prompts"], "max_new_tokens": args.parity_tokens,
            "max_abs_behaviour_diff": max(abs(a["behaviour"] - b["behaviour"]) for a, b in matched),
            "max_rel_perplexity_diff": max(abs(a["perplexity"] - b["perplexity"]) / a["perplexity"]
                                           for a, b in matched),
            "identical_samples": sum(a["samples"] == b["samples"] for a, b in matched), "points": len(matched),
            "hf": [{"strength": a["strength"], "behaviour": a["behaviour"], "perplexity": a["perplexity"]}
                   for a, _ in matched],
            "vllm": [{"strength": b["strength"], "behaviour": b["behaviour"], "perplexity": b["perplexity"]}
                     for _, b in matched],
            "seconds": {"hf_total": hf_s, "vllm_total": vl_s, "vllm_engine_start": vl["timing"]["backend_start_s"],
                        "vllm_excluding_start": vl_s - vl["timing"]["backend_start_s"]},
        }
        parity["met"] = parity["max_abs_behaviour_diff"] <= 1e-2 and parity["max_rel_perplexity_diff"] <= 1e-2
        C.log(f"parity: max |behaviour diff| {parity['max_abs_behaviour_diff']:.2e}, max rel perplexity diff "
              f"{parity['max_rel_perplexity_diff']:.2e}, identical samples "
              f"{parity['identical_samples']}/{len(matched)}")
    del model

    C.log(f"full sweep on vLLM: layers {layers}, strengths {args.strengths}")
    report = run_sweep(path, str(vec_dir), backend="vllm", layers=layers, strengths=_floats(args.strengths),
                       out=str(work / "vllm"), n_prompts=args.prompts,
                       n_generation_prompts=args.generation_prompts, max_new_tokens=args.max_new_tokens,
                       random_baselines=args.random_baselines, max_ppl_ratio=args.max_ppl_ratio, progress=False)
    print()
    print(format_report(report))
    summary.update({
        "report": str(work / "vllm" / "report.json"), "plots": [str(work / "vllm" / p) for p in report["plots"]],
        "behaviour": report["behaviour"], "generation": report["generation"], "baseline": report["baseline"],
        "by_layer": report["by_layer"],
        "points": [{k: v for k, v in p.items() if k != "samples"} for p in report["points"]],
        "samples": {f"L{p['layer']}:{p['strength']:g}": p["samples"][:1] for p in report["points"]},
        "tradeoff": report["tradeoff"], "random_baseline": report["random_baseline"], "timing": report["timing"],
        "parity": parity,
        "checks": ([{"target": "HF and vLLM backends agree (behaviour within 1e-2 nats, perplexity within 1%)",
                     "value": parity["max_abs_behaviour_diff"], "met": parity["met"]}] if parity else []),
    })
    C.write_result(NAME, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
