"""Add-only steering before/after the operators of issue 12 (ablate, clamp, norm=preserve,
relative units), and batches that mix projecting requests in, on one model (SmolLM2 by
default), offline vLLM, compiled.

"before" is the model-side op as it was before issue 12 (commit ea9edf8): each hooked
layer called one op, ``add_steering_(output[0], layer)``, doing ``hidden_states +=
tables[slot][rows]`` on the block's first output, with the same eager skip of idle
layers. This benchmark re-registers that op (``vsteer_prev::add_steering_``, the same
code reading the same tables) and hooks it instead of ``ops.hook_output``. Everything else
(frontend, table fills, the vLLM patches) is today's code in both variants, so the
difference measured is the model-side op: ``steer_``/``steer_residual_`` (two mutated
arguments under torch.compile; the projecting path when a step holds projecting rows) vs
the previous single add.

Engines run one at a time, each in its own subprocess with vLLM's engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the bench can swap the hook), in the order
``--engines`` (default before, after, after, before: a linear drift of the machine
cancels out of the before/after ratio). Inside an engine, rounds rotate the cases:
unsteered, add-only (``--layers`` layers, K distinct strengths), and with the current op
also "mixed" (half the requests add-only, half ablate+clamp+add with norm=preserve on the
same layers) and "projecting" (all of them). Same-engine ratios are medians of per-round
ratios; before/after compares medians over engines of the same variant.

    python bench/ops_overhead.py                    # SmolLM2, batch 32 x 32 tokens, 3 rounds x 4 engines
    python bench/ops_overhead.py --model tiny-llama --batch 8 --tokens 8 --reps 1 --engines before,after
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch  # at module level: the schema of the re-registered op reads its annotations here

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "ops_overhead"
CALLS = {"previous_op_adds": 0}
TARGET = 0.97
ADD, DIR1, DIR2 = "bench-add", "bench-dir1", "bench-dir2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--batch", type=int, default=32, help="requests per batch (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="measured rounds per engine (default: %(default)s)")
    p.add_argument("--k", type=int, default=8, help="distinct steering configs per batch (default: %(default)s)")
    p.add_argument("--layers", default="4", choices=["1", "4", "all"], help="steered layers (default: %(default)s)")
    p.add_argument("--engines", default="before,after,after,before", help="engine variants, in order")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine subprocess")
    p.add_argument("--out", help="result JSON (default: bench/out/ops_overhead.json)")
    p.add_argument("--variant", choices=["before", "after"], help=argparse.SUPPRESS)
    p.add_argument("--vectors-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def steered_layers(num_layers: int, which: str) -> list[int]:
    from serving_overhead import layer_cases

    return layer_cases(num_layers, [which])[which]


# -- the previous op (benchmark only) ----------------------------------------------------------
def install_previous_op() -> None:
    """Hook the pre-issue-12 op instead of ``ops.hook_output`` (must run before the engine
    loads the model)."""
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    from vsteer.serving import ops, worker

    def add_steering_(hidden_states: torch.Tensor, layer: int) -> None:  # verbatim from ea9edf8, but the name
        tables = ops._TABLES
        if tables is None:
            return
        slot = tables.slot_of.get(layer)
        if slot is None:
            return
        if not tables.layer_active[slot] and not ops._capturing():
            return
        flat = hidden_states.view(-1, hidden_states.shape[-1])
        n = flat.shape[0]
        if n > tables.rows.numel():
            raise RuntimeError(f"vsteer: {n} tokens in one forward, steering buffers hold {tables.rows.numel()}")
        flat.add_(tables.tables[slot].index_select(0, tables.rows[:n]))
        CALLS["previous_op_adds"] += 1

    lib = Library("vsteer_prev", "FRAGMENT")
    direct_register_custom_op("add_steering_", add_steering_, mutates_args=["hidden_states"],
                              fake_impl=lambda hidden_states, layer: None, target_lib=lib)
    install_previous_op.lib = lib  # type: ignore[attr-defined]  # keep the library alive

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            torch.ops.vsteer_prev.add_steering_(hidden, layer)
            return output
        return hook

    worker._make_hook = make_hook


# -- inside one engine subprocess --------------------------------------------------------------
def worker_main(args: argparse.Namespace) -> None:
    from vsteer.serving import set_vectors_dir, steering

    if args.variant == "before":
        install_previous_op()
    from vllm import LLM, SamplingParams

    path = C.resolve_model(args.model)
    _, num_layers = C.model_shape(path)
    layers = steered_layers(num_layers, args.layers)
    set_vectors_dir(args.vectors_dir)
    t0 = time.perf_counter()
    llm = LLM(path, dtype=args.dtype, enforce_eager=args.enforce_eager, gpu_memory_utilization=0.3,
              max_model_len=1024, max_num_seqs=max(64, args.batch), enable_prefix_caching=False, seed=0)
    start_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": ids} for ids in C.chat_prompts(llm.get_tokenizer(), args.batch)]

    def add_only(i: int) -> dict:
        return {"vectors": [{"name": ADD, "strength": 1.0 + 0.01 * (i % args.k), "layers": layers}]}

    def projecting(i: int) -> dict:
        return {"vectors": [{"name": DIR1, "op": "ablate", "layers": layers},
                            {"name": DIR2, "op": "clamp", "strength": 0.5 + 0.01 * (i % args.k), "layers": layers},
                            {"name": ADD, "strength": 1.0, "norm": "preserve", "layers": layers}]}

    def params(spec_for):
        return [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                               extra_args=steering(spec_for(i)) if spec_for else None) for i in range(args.batch)]

    cases = {"unsteered": params(None), "add_only": params(add_only)}
    if args.variant == "after":
        cases["mixed"] = params(lambda i: add_only(i) if i % 2 == 0 else projecting(i))
        cases["projecting"] = params(projecting)

    def measure(name: str) -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, cases[name], use_tqdm=False)
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        assert n == args.batch * args.tokens, (name, n)
        return n / dt

    names = list(cases)
    for name in names:  # warm-up, not timed
        measure(name)
    if args.variant == "before":  # the swapped-in op really ran (in this process: the engine is in-process)
        assert CALLS["previous_op_adds"] > 0, "the previous op was never called"
    rounds = []
    for r in range(args.reps):
        rounds.append({name: measure(name) for name in C.rotated(names, r)})
        print(f"{args.variant} round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()),
              flush=True)
    C.shutdown_llm(llm)
    Path(args.result).write_text(json.dumps({"variant": args.variant, "engine_start_s": start_s, "rounds": rounds,
                                             "previous_op_adds": CALLS["previous_op_adds"],
                                             "layers": layers, "loadavg_end": list(os.getloadavg())}))


# -- the parent ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        worker_main(args)
        return 0
    from vsteer.engine import VectorRegistry

    path = C.resolve_model(args.model)
    hidden, num_layers = C.model_shape(path)
    work = Path(tempfile.mkdtemp(prefix="vsteer-ops-bench-"))
    (work / "vectors").mkdir()
    reg = VectorRegistry(work / "vectors")
    for seed, name in enumerate((ADD, DIR1, DIR2)):
        vs = C.random_vector_set(name, hidden, range(num_layers), seed=seed)
        vs.residual_norms = {layer: 10.0 for layer in range(num_layers)}
        reg.add(name, vs)
    variants = [v.strip() for v in args.engines.split(",") if v.strip()]
    base = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--tokens", str(args.tokens),
            "--reps", str(args.reps), "--k", str(args.k), "--layers", args.layers, "--dtype", args.dtype,
            "--vectors-dir", str(work / "vectors")] + (["--enforce-eager"] if args.enforce_eager else [])
    engines = []
    for i, variant in enumerate(variants):
        C.log(f"engine {i + 1}/{len(variants)} ({variant} op): batch {args.batch} x {args.tokens}, {args.reps} rounds")
        result = work / f"{i}-{variant}.json"
        log_path = C.OUT_DIR / "logs" / f"{NAME}-{i}-{variant}.log"
        rc = C.run_child(base + ["--variant", variant, "--result", str(result)],
                         env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, log_path=log_path, timeout=args.timeout)
        if rc != 0 or not result.is_file():
            print(f"engine {variant} failed (exit {rc}); log {log_path}:\n{C.tail(log_path)}", file=sys.stderr)
            return 1
        engines.append(json.loads(result.read_text()))
    report(args, engines, num_layers)
    return 0


def report(args: argparse.Namespace, engines: list[dict], num_layers: int) -> None:
    def tps(variant: str, case: str) -> float:
        return C.median([C.median([r[case] for r in e["rounds"]]) for e in engines if e["variant"] == variant])

    def paired(variant: str, case: str, base: str = "unsteered") -> float:
        return C.median([r[case] / r[base] for e in engines if e["variant"] == variant for r in e["rounds"]])

    has = {e["variant"] for e in engines}
    rows, summary = [], {}
    for variant in ("before", "after"):
        if variant not in has:
            continue
        cases = list(next(e for e in engines if e["variant"] == variant)["rounds"][0])
        for case in cases:
            summary[f"{variant}.{case}"] = {"tok_s": tps(variant, case), "vs_unsteered": paired(variant, case)}
            rows.append([variant, case, tps(variant, case), paired(variant, case)])
    if {"before", "after"} <= has:
        summary["add_only_after_over_before"] = tps("after", "add_only") / tps("before", "add_only")
        summary["unsteered_after_over_before"] = tps("after", "unsteered") / tps("before", "unsteered")
        summary["add_only_vs_unsteered_after_minus_before"] = paired("after", "add_only") - paired("before", "add_only")
    if "after" in has:
        summary["mixed_vs_add_only"] = paired("after", "mixed", "add_only")
        summary["projecting_vs_add_only"] = paired("after", "projecting", "add_only")
    checks = []
    if "add_only_after_over_before" in summary:
        value = summary["add_only_after_over_before"]
        checks.append({"target": "add-only steered tok/s, current op / previous op >= 0.97 (across engines)",
                       "value": value, "met": value >= TARGET})
    print()
    print(C.table(["op", "case", "tok/s (median)", "vs unsteered (same engine)"], rows))
    print()
    for k, v in summary.items():
        if not isinstance(v, dict):
            print(f"  {k}: {v:.3f}")
    for chk in checks:
        print(f"  [{'met' if chk['met'] else 'NOT met'}] {chk['target']}: {chk['value']:.3f}")
    C.write_result(NAME, {
        "params": {"model": args.model, "batch": args.batch, "new_tokens": args.tokens, "reps": args.reps,
                   "k": args.k, "layers": engines[0]["layers"], "num_layers": num_layers, "engines": args.engines,
                   "compiled": not args.enforce_eager, "dtype": args.dtype, "in_process_engine": True,
                   "before": "the pre-issue-12 op (ea9edf8): add_steering_(output[0]) per hooked layer"},
        "summary": summary, "engines": engines, "checks": checks,
        "notes": ["same-engine ratios: median over rounds of (case tok/s / unsteered tok/s of that round)",
                  "before/after: median over engines of each engine's median tok/s (separate engine starts)"],
    }, args.out)


def report_lines(result: dict) -> list[str]:
    """The RESULTS.md section (bench/run_all.py calls this)."""
    p, sm = result["params"], result["summary"]
    engines = result["engines"]
    loads = ", ".join(f"{e['variant']} {e.get('loadavg_end', [0])[0]:.1f}" for e in engines)
    lines = ["## Operators: add-only overhead before/after (`bench/ops_overhead.py`)", "",
             f"{p['model']}, offline vLLM ({'compiled' if p['compiled'] else 'enforce_eager'}, {p['dtype']}, "
             f"engine in-process), batch {p['batch']} x {p['new_tokens']} new tokens (greedy, ignore_eos), "
             f"steering on layers {p['layers']} with {p['k']} distinct configs per batch; engines in the order "
             f"{p['engines']}, {p['reps']} rotated rounds each. **before** = the model-side op before issue 12 "
             "(`add_steering_(output[0])` per hooked layer, re-registered by the benchmark; everything else is "
             "today's code); **after** = today's `steer_`/`steer_residual_`. *mixed* = half the requests add-only, "
             "half ablate + clamp + add with norm=preserve on the same layers; *projecting* = all of them.", "",
             "| op | case | tok/s (median over engines) | vs unsteered (same engine, median of rounds) |",
             "|---|---|---|---|"]
    for key, v in sm.items():
        if isinstance(v, dict):
            variant, case = key.split(".", 1)
            lines.append(f"| {variant} | {case} | {v['tok_s']:.1f} | {v['vs_unsteered']:.3f} |")
    lines.append("")
    named = {"add_only_after_over_before": "add-only tok/s, after / before (across engine starts)",
             "unsteered_after_over_before": "unsteered tok/s, after / before (across engine starts)",
             "add_only_vs_unsteered_after_minus_before": "(add-only / unsteered) after minus before (same-engine "
                                                          "ratios)",
             "mixed_vs_add_only": "mixed / add-only (after, same engine)",
             "projecting_vs_add_only": "projecting / add-only (after, same engine)"}
    for key, text in named.items():
        if key in sm:
            lines.append(f"* {text}: **{sm[key]:.3f}**")
    for chk in result.get("checks", []):
        lines.append(f"* target: {chk['target']}: {chk['value']:.3f} ({'met' if chk['met'] else '**not met**'})")
    lines += ["", f"Run {result.get('date', '?')}; load average (1 min) at the end of each engine: {loads} "
              "(2 shared CPU cores). CPU only: on a GPU the captured CUDA graphs run the op's branch-free path "
              "for every step (docs/server.md#operators); `bench/gpu/check_op.py` measures that.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
