"""GPU readiness check of the steering op (issue 12), for a machine with only torch and
transformers installed (no vLLM, no pydantic, nothing of vsteer installed).

    python bench/gpu/check_op.py                 # one CUDA GPU, under 5 minutes
    python bench/gpu/check_op.py --no-compile    # skip the torch.compile timings
    python bench/gpu/check_op.py --cpu --small   # what CI runs (tests/test_gpu_check_cpu.py)

It imports only ``vsteer.engine.operators``/``positions`` and ``vsteer.serving.tables``/
``ops`` from this checkout (through a temporary ``vsteer`` package of symlinks) and blocks
``import vllm``, so ``register_op()`` takes its plain ``torch.library`` path, as on the
GPU box.

1. Correctness. Two small Llama-shaped stacks whose decoder layers call the op through
   ``vsteer.serving.ops.hook_output``, the hook body vLLM's workers use: vLLM-style
   blocks returning ``(hidden_states, residual)`` (-> ``steer_residual_``) and
   transformers ``LlamaDecoderLayer``s returning the stream (-> ``steer_``). Each is
   captured in a CUDA graph at a few batch sizes with the tables cleared (as vLLM
   captures); then, step after step, the tables and the per-token rows change (add-only,
   every operator mixed, rows reordered, rows evicted and rewritten, nothing steered) and
   every replay must equal the eager run of the same step (which takes the op's fast
   paths), and every steered token must equal ``apply_plan`` (the HF injectors' math) on
   the stream the op saw. With ``--cpu`` there is no CUDA graph: the "full" path that
   capture records is forced instead (``ops._capturing``) and compared the same way.
2. Timing (bf16; hidden 4096 and 8192; 256 and 8192 tokens; 256 table rows, 64 configs):
   the op in its eager add-only path (= the op before issue 12), its eager path with half
   the configs projecting, and its branch-free path (what a CUDA-graph replay runs, for an
   add-only step: run eagerly, and replayed from a graph), and the op before issue 12
   (``prev_op``: the plain add, eager and replayed), each as a fraction of one
   transformers ``LlamaDecoderLayer`` (Llama-3 8B / 70B shapes, one causal sequence, SDPA)
   timed the same way (eager / graph replay); and the layer with the op under
   ``torch.compile``, add-only and mixed steps vs an idle op.

Exit status 0 and a final line ``PASS`` when every check holds; results also go to
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def import_vsteer():
    """The four modules the op needs, from this checkout, with vLLM blocked."""
    if "vllm" not in sys.modules:
        sys.modules["vllm"] = None  # type: ignore[assignment]  # `import vllm...` raises ImportError
    tmp = Path(tempfile.mkdtemp(prefix="vsteer-gpu-check-"))
    for sub, files in {"engine": ["operators.py", "positions.py"], "serving": ["tables.py", "ops.py"]}.items():
        (tmp / "vsteer" / sub).mkdir(parents=True)
        (tmp / "vsteer" / sub / "__init__.py").write_text("")
        for f in files:
            (tmp / "vsteer" / sub / f).symlink_to(ROOT / sub / f)
    (tmp / "vsteer" / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp))
    from vsteer.serving import ops

    if not Path(ops.__file__).is_relative_to(tmp):
        raise RuntimeError(f"imported {ops.__file__}, not the checkout's serving/ops.py")
    ops.register_op()
    return ops


ops = import_vsteer()
import torch  # noqa: E402

from _stack import (  # noqa: E402
    CONFIG_NAMES, HfStack, VllmStack, make_configs, random_step, token_plans)
from vsteer.engine.operators import apply_plan  # noqa: E402
from vsteer.serving.tables import SteeringTables  # noqa: E402

RESULTS: dict = {"checks": [], "timings": []}


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"  [{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
    return ok


# -- 1. correctness ------------------------------------------------------------------------------
def _stream_tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2  # relative to each token's norm (see tests/test_op_math.py)


def compare_to_math(record: dict, tables: SteeringTables, configs: dict, row_config: dict, n: int,
                    dtype: torch.dtype) -> tuple[bool, float]:
    """Every layer's post-op stream vs ``apply_plan`` on its pre-op stream, per token."""
    worst = 0.0
    rows = tables.rows[:n].cpu().tolist()
    for layer, (pre, post) in record.items():
        plans = token_plans(rows, row_config, configs, layer)
        for i, plan in enumerate(plans):
            expected = pre[i] if plan is None else apply_plan(pre[i], plan)
            err = float((post[i] - expected).norm()) / max(float(expected.norm()), 1e-6)
            worst = max(worst, err)
    return worst <= _stream_tolerance(dtype), worst


def correctness(device: torch.device, dtype: torch.dtype, sizes: list[int], hidden: int, graphs: bool) -> bool:
    ok = True
    g = torch.Generator().manual_seed(0)
    layers = [0, 1, 2]
    for stack_cls in (VllmStack, HfStack):
        stack = stack_cls(hidden, len(layers), dtype, device, seed=1)
        tables = SteeringTables(layers, hidden, max_configs=len(CONFIG_NAMES) - 2, max_tokens=max(sizes),
                                dtype=dtype, device=device, max_projections=3)
        ops.set_tables(tables)
        configs = make_configs(layers, hidden, g)
        print(f"{stack_cls.__name__} ({'CUDA graphs' if graphs else 'forced full path'}), {dtype}, "
              f"hidden {hidden}, batch sizes {sizes}", flush=True)
        for n in sizes:
            x = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
            static_x = x.clone()
            tables.clear()
            if graphs:
                graph, static_out = capture(stack, static_x)
            worst_replay, worst_math, bitwise, steps = 0.0, 0.0, True, 0
            for step_name, row_config in random_step(tables, configs, n, g):
                steps += 1
                x = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype) * 2
                stack.record = {}
                if graphs:  # the eager op must not synchronise with the host either
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    eager = stack(x)
                except RuntimeError as e:
                    ok &= check(f"{stack_cls.__name__} n={n} {step_name}: eager step without host syncs", False,
                                str(e)[:200])
                    continue
                finally:
                    if graphs:
                        torch.cuda.set_sync_debug_mode(0)
                record, stack.record = stack.record, None
                if graphs:
                    static_x.copy_(x)
                    graph.replay()
                    torch.cuda.synchronize()
                    full = static_out.clone()
                else:
                    saved = ops._capturing
                    ops._capturing = lambda: True
                    try:
                        full = stack(x)
                    finally:
                        ops._capturing = saved
                diff = float((full.float() - eager.float()).abs().max()) / max(float(eager.float().abs().max()), 1e-6)
                bitwise &= torch.equal(full, eager)
                worst_replay = max(worst_replay, diff)
                good, err = compare_to_math(record, tables, configs, row_config, n, dtype)
                worst_math = max(worst_math, err)
                ok &= check(f"{stack_cls.__name__} n={n} {step_name}: op == operator math", good, f"{err:.2e}") \
                    if not good else True
            what = "graph replay" if graphs else "full path"
            ok &= check(f"{stack_cls.__name__} n={n}: {what} == eager over {steps} steps",
                        worst_replay <= (1e-6 if dtype == torch.float32 else 1e-3),
                        f"bitwise {bitwise}, max rel diff {worst_replay:.1e}")
            ok &= check(f"{stack_cls.__name__} n={n}: every steered token == apply_plan",
                        worst_math <= _stream_tolerance(dtype), f"worst rel error {worst_math:.1e}")
        ops.set_tables(None)
    return ok


def capture(stack, static_x: torch.Tensor):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            stack(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = stack(static_x)
    return graph, static_out


# -- 2. timing -----------------------------------------------------------------------------------
def timeit(fn, device: torch.device, reps: int) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def timing(device: torch.device, shapes: list[tuple[int, int]], reps: int, compile_too: bool) -> None:
    from _stack import fill_tables, llama_layer, previous_op

    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(2)
    graphs = device.type == "cuda"
    for hidden, n in shapes:
        layer, run_layer = llama_layer(hidden, n, dtype, device)
        tables = SteeringTables([0], hidden, max_configs=256, max_tokens=n, dtype=dtype, device=device,
                                max_projections=2)
        ops.set_tables(tables)
        h = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
        r = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
        row = {"hidden": hidden, "tokens": n, "device": str(device)}
        with torch.no_grad():  # the ops are timed as Python functions, like previous_op (no dispatcher cost)
            row["layer_s"] = timeit(run_layer, device, reps)
            for case in ("add_only", "mixed"):
                fill_tables(tables, case, n, g)
                row[f"op_{case}_eager_s"] = timeit(lambda: ops.steer_residual_(h, r, 0), device, reps)
            # what a CUDA-graph replay runs for an add-only step (the branch-free path), run eagerly
            fill_tables(tables, "add_only", n, g)
            row["prev_op_eager_s"] = timeit(lambda: previous_op(h, 0), device, reps)
            saved, ops._capturing = ops._capturing, lambda: True
            try:
                row["op_full_path_eager_s"] = timeit(lambda: ops.steer_residual_(h, r, 0), device, reps)
            finally:
                ops._capturing = saved
            if graphs:
                fill_tables(tables, "mixed", n, g)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    torch.ops.vsteer.steer_residual_(h, r, 0)
                row["op_captured_s"] = timeit(graph.replay, device, reps)
                pgraph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(pgraph):
                    previous_op(h, 0)
                row["prev_op_captured_s"] = timeit(pgraph.replay, device, reps)
                lgraph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(lgraph):
                    run_layer()
                row["layer_captured_s"] = timeit(lgraph.replay, device, reps)
                del graph, lgraph, pgraph
            if compile_too:
                compiled = torch.compile(run_layer, dynamic=False)
                hooked = layer.register_forward_hook(lambda m, a, out: ops.hook_output(out, 0))
                fill_tables(tables, "none", n, g)
                row["compiled_layer_op_idle_s"] = timeit(compiled, device, reps)
                for case in ("add_only", "mixed"):
                    fill_tables(tables, case, n, g)
                    row[f"compiled_layer_op_{case}_s"] = timeit(compiled, device, reps)
                hooked.remove()
                torch._dynamo.reset()
        for k in [k for k in row if k.startswith(("op_", "prev_op_"))]:
            base = row["layer_captured_s"] if k.endswith("captured_s") else row["layer_s"]
            row[k[:-2] + "_fraction"] = row[k] / base
        if compile_too:
            for case in ("add_only", "mixed"):
                row[f"compiled_{case}_fraction"] = (row[f"compiled_layer_op_{case}_s"]
                                                    / row["compiled_layer_op_idle_s"] - 1)
        RESULTS["timings"].append(row)
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
        ops.set_tables(None)
        del layer, run_layer, tables
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="no GPU: force the captured path instead of CUDA graphs")
    p.add_argument("--small", action="store_true", help="small shapes (CI)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_check_op.json"))
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    sizes = [1, 5, 24] if args.small else [1, 7, 64, 256]
    hidden = 128 if args.small else 1024
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        # bf16 matmuls are slow on CPUs without bf16 units: fewer sizes there
        use = sizes if not (args.cpu and dtype == torch.bfloat16) else [sizes[0], sizes[-1]]
        ok &= correctness(device, dtype, use, hidden, graphs=not args.cpu)
    if not args.no_timing:
        shapes = [(256, 64)] if args.small else [(4096, 256), (4096, 8192), (8192, 256), (8192, 8192)]
        print(f"timing (bf16) on {device}{'; CPU numbers say nothing about a GPU' if args.cpu else ''}:", flush=True)
        timing(device, shapes, args.reps, compile_too=not args.no_compile)
    RESULTS.update({"passed": bool(ok), "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
                    "op_registration": "torch.library" if sys.modules.get("vllm") is None else "vllm",
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                    "torch": torch.__version__, "argv": sys.argv[1:]})
    try:
        import transformers

        RESULTS["transformers"] = transformers.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=1))
    print(f"{sum(c['ok'] for c in RESULTS['checks'])}/{len(RESULTS['checks'])} checks in "
          f"{RESULTS['seconds']} s; results in {args.out}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
