"""Offline vLLM throughput with per-request steering vs the same engine unsteered, and vs
vLLM without the vsteer plugin.

One engine with the plugin measures, in rounds that rotate the case order: every request
unsteered, and every request steered on 1 layer / 4 layers / all layers with K distinct
steering configs per batch (K distinct strengths of one vector). A second engine,
started afterwards with VSTEER_DISABLE=1 (vLLM without the plugin loaded), measures the
unsteered batch. Engines run one at a time, each in its own subprocess.

Same-engine ratios are medians of per-round ratios (steered tok/s / unsteered tok/s of
the same round). The plugin-off comparison is necessarily across two engine starts
(median tok/s over median tok/s): machine noise between the two starts enters it.

    python bench/serving_overhead.py                       # SmolLM2, batch 64 x 64, 5 rounds
    python bench/serving_overhead.py --batch 16 --tokens 16 --reps 1 --enforce-eager   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "serving_overhead"
VECTOR = "bench-vector"
TARGETS = {"four_layers_k64": 0.97, "all_layers": 0.95, "k_spread": 0.03}


def layer_cases(num_layers: int, which: list[str]) -> dict[str, list[int]]:
    mid = num_layers // 3
    if num_layers >= 8:
        four = sorted({min(mid + 2 * i, num_layers - 1) for i in range(4)})
    else:
        four = list(range(min(4, num_layers)))
    table = {"1": [mid], "4": four, "all": list(range(num_layers))}
    return {k: table[k] for k in which}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL, help="HF folder or known name (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="requests per batch (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="measured rounds per engine (default: %(default)s)")
    p.add_argument("--ks", default="1,8,64", help="distinct steering configs per batch (default: %(default)s)")
    p.add_argument("--layers", default="1,4,all", help="layer cases (default: %(default)s)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start, slower run)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-plugin-off", action="store_true", help="skip the engine without the plugin")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine subprocess")
    p.add_argument("--out", help="result JSON (default: bench/out/serving_overhead.json)")
    p.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--vectors-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- inside one engine subprocess --------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    path = C.resolve_model(args.model)
    _, num_layers = C.model_shape(path)
    if args.worker == "on":
        from vsteer.serving import set_vectors_dir, steering

        set_vectors_dir(args.vectors_dir)
    t0 = time.perf_counter()
    llm = LLM(path, dtype=args.dtype, enforce_eager=args.enforce_eager, gpu_memory_utilization=0.3,
              max_model_len=1024, max_num_seqs=max(64, args.batch), enable_prefix_caching=False, seed=0)
    start_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": ids} for ids in C.chat_prompts(llm.get_tokenizer(), args.batch)]

    def params(spec_for_request):
        return [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                               extra_args=spec_for_request(i)) for i in range(args.batch)]

    cases: dict[str, list] = {"unsteered": params(lambda i: None)}
    if args.worker == "on":
        for lname, layers in layer_cases(num_layers, args.layers.split(",")).items():
            for k in (int(x) for x in args.ks.split(",")):
                cases[f"L{lname}_K{k}"] = params(lambda i, layers=layers, k=k: steering(
                    {"vectors": [{"name": VECTOR, "strength": 1.0 + 0.01 * (i % k), "layers": layers}],
                     "positions": "all"}))

    def measure(name: str) -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, cases[name], use_tqdm=False)
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        assert n == args.batch * args.tokens, (name, n)
        return n / dt

    names = list(cases)
    for name in names:  # warm-up: first use of each batch shape / table fill, not timed
        measure(name)
    rounds = []
    for r in range(args.reps):
        rounds.append({name: measure(name) for name in C.rotated(names, r)})
        print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()), flush=True)
    C.shutdown_llm(llm)
    Path(args.result).write_text(json.dumps({"engine_start_s": start_s, "rounds": rounds}))


# -- the parent: start engines one at a time, compare ----------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from vsteer.engine import VectorRegistry

    path = C.resolve_model(args.model)
    hidden, num_layers = C.model_shape(path)
    work = Path(tempfile.mkdtemp(prefix="vsteer-bench-"))
    (work / "vectors").mkdir()
    VectorRegistry(work / "vectors").add(VECTOR, C.random_vector_set(VECTOR, hidden, range(num_layers)))
    logs = C.OUT_DIR / "logs"
    base = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--tokens", str(args.tokens),
            "--reps", str(args.reps), "--ks", args.ks, "--layers", args.layers, "--dtype", args.dtype,
            "--vectors-dir", str(work / "vectors")] + (["--enforce-eager"] if args.enforce_eager else [])
    engines = [("on", {})] + ([] if args.no_plugin_off else [("off", {"VSTEER_DISABLE": "1"})])
    results = {}
    for mode, env in engines:
        C.log(f"engine with plugin {mode}: batch {args.batch} x {args.tokens} tokens, {args.reps} rounds "
              f"({'eager' if args.enforce_eager else 'compiled'})")
        result = work / f"{mode}.json"
        rc = C.run_child(base + ["--worker", mode, "--result", str(result)], env=env,
                         log_path=logs / f"{NAME}-{mode}.log", timeout=args.timeout)
        if rc != 0 or not result.is_file():
            print(f"engine '{mode}' failed (exit {rc}); log {logs / f'{NAME}-{mode}.log'}:\n"
                  f"{C.tail(logs / f'{NAME}-{mode}.log')}", file=sys.stderr)
            return 1
        results[mode] = json.loads(result.read_text())

    on_rounds = results["on"]["rounds"]
    tps = {name: C.median([r[name] for r in on_rounds]) for name in on_rounds[0]}
    off_tps = C.median([r["unsteered"] for r in results["off"]["rounds"]]) if "off" in results else None
    cases = []
    for name in on_rounds[0]:
        if name == "unsteered":
            continue
        lname, k = name[1:].split("_K")
        paired = C.median([r[name] / r["unsteered"] for r in on_rounds])
        cases.append({"case": name, "layers": lname, "k": int(k), "tok_s": tps[name],
                      "ratio_vs_unsteered": paired, "ratio_vs_plugin_off": tps[name] / off_tps if off_tps else None,
                      "per_round_ratios": [r[name] / r["unsteered"] for r in on_rounds]})
    spreads = {lname: C.spread([c["ratio_vs_unsteered"] for c in cases if c["layers"] == lname])
               for lname in dict.fromkeys(c["layers"] for c in cases)}
    checks = []
    four64 = next((c for c in cases if c["layers"] == "4" and c["k"] == 64), None)
    if four64:
        checks.append({"target": "4 layers, K=64: steered / unsteered >= 0.97", "value": four64["ratio_vs_unsteered"],
                       "met": four64["ratio_vs_unsteered"] >= TARGETS["four_layers_k64"]})
        if off_tps:
            checks.append({"target": "4 layers, K=64: steered / plugin off >= 0.97 (across engines)",
                           "value": four64["ratio_vs_plugin_off"],
                           "met": four64["ratio_vs_plugin_off"] >= TARGETS["four_layers_k64"]})
    alls = [c for c in cases if c["layers"] == "all"]
    if alls:
        worst = min(c["ratio_vs_unsteered"] for c in alls)
        checks.append({"target": "all layers (worst K): steered / unsteered >= 0.95", "value": worst,
                       "met": worst >= TARGETS["all_layers"]})
        if off_tps:
            worst_off = min(c["ratio_vs_plugin_off"] for c in alls)
            checks.append({"target": "all layers (worst K): steered / plugin off >= 0.95 (across engines)",
                           "value": worst_off, "met": worst_off >= TARGETS["all_layers"]})
    for lname, s in spreads.items():
        if len([c for c in cases if c["layers"] == lname]) > 1:
            checks.append({"target": f"{lname} layer(s): spread of the ratio across K <= 3%", "value": s,
                           "met": s <= TARGETS["k_spread"]})
    plugin_idle = tps["unsteered"] / off_tps if off_tps else None

    print()
    print(C.table(["case", "layers", "K", "tok/s", "vs unsteered", "vs plugin off"],
                  [["unsteered (plugin on)", "-", "-", tps["unsteered"], 1.0, plugin_idle or "-"]]
                  + ([["plugin off", "-", "-", off_tps, "-", 1.0]] if off_tps else [])
                  + [[c["case"], c["layers"], c["k"], c["tok_s"], c["ratio_vs_unsteered"],
                      c["ratio_vs_plugin_off"] if off_tps else "-"] for c in cases]))
    print()
    for chk in checks:
        print(f"  [{'met' if chk['met'] else 'NOT met'}] {chk['target']}: {chk['value']:.3f}")
    C.write_result(NAME, {
        "params": {"model": args.model, "model_path": path, "batch": args.batch, "new_tokens": args.tokens,
                   "reps": args.reps, "ks": args.ks, "layer_cases": layer_cases(num_layers, args.layers.split(",")),
                   "compiled": not args.enforce_eager, "dtype": args.dtype, "greedy": True, "ignore_eos": True,
                   "prefix_caching": False, "vector": "seeded random direction, norm 2, every layer"},
        "engine_start_s": {m: r["engine_start_s"] for m, r in results.items()},
        "unsteered_tok_s": tps["unsteered"], "plugin_off_tok_s": off_tps,
        "plugin_loaded_idle_ratio": plugin_idle, "cases": cases, "k_spread": spreads, "checks": checks,
        "raw_rounds": {m: r["rounds"] for m, r in results.items()},
        "notes": ["same-engine ratios: median over rounds of (steered tok/s / unsteered tok/s of that round)",
                  "plugin-off ratios compare two separate engine starts (median tok/s over median tok/s)"],
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
