"""A bounded load run against ``vsteer serve``: mixed per-request steering vs none.

Starts ``vsteer serve`` (a subprocess on 127.0.0.1, a free port) with a vector registry,
then sends phases of N chat-completion requests at concurrency C with the ``openai``
client: a phase without steering and a phase where 3 of 4 requests carry a steering
spec (varied strengths, layers and positions, via ``extra_body={"steering": ...}``).
Phases alternate (rotated order) for --reps rounds. Every request generates exactly
--tokens tokens (greedy, ``ignore_eos``), so the phases do the same work. Reported:
completion tok/s, p50/p99 request latency, the mixed/none throughput ratio (median of
per-round ratios), errors, and how many responses confirmed their steering.

Bounded: N requests per phase, a per-request timeout and a wall-clock deadline; the
server is stopped (SIGTERM to its process group, which this script started) at the end.

    python bench/server_load.py                                   # SmolLM2, 200 x 16
    python bench/server_load.py --model tiny-llama --requests 32 --reps 1   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "server_load"
VECTOR = "bench-vector"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--requests", type=int, default=200, help="requests per phase (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--reps", type=int, default=2, help="rounds of (none, mixed) phases")
    p.add_argument("--compiled", action="store_true", help="serve without --enforce-eager")
    p.add_argument("--start-timeout", type=float, default=420, help="seconds to wait for the server")
    p.add_argument("--request-timeout", type=float, default=180)
    p.add_argument("--deadline", type=float, default=1800, help="wall-clock bound for the whole run (s)")
    p.add_argument("--vsteer", default=str(Path(sys.executable).with_name("vsteer")), help="the vsteer command")
    p.add_argument("--out", help="result JSON (default: bench/out/server_load.json)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def mixed_spec(i: int, layers: list[int]) -> dict | None:
    """3 of 4 requests steered: strengths, layer subsets and positions vary."""
    if i % 4 == 0:
        return None
    subsets = [[layers[len(layers) // 2]], layers[::2], layers]
    return {"vectors": [{"name": VECTOR, "strength": 0.5 + 0.25 * (i % 7), "layers": subsets[i % 3]}],
            "positions": ("all", "generated")[i % 2]}


async def run_phase(client, model: str, prompts: list[str], specs: list[dict | None], args) -> dict:
    sem = asyncio.Semaphore(args.concurrency)
    latencies, tokens, errors, confirmed = [], 0, [], 0

    async def one(i: int):
        nonlocal tokens, confirmed
        body = {"ignore_eos": True}
        if specs[i] is not None:
            body["steering"] = specs[i]
        async with sem:
            t = time.perf_counter()
            try:
                resp = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[i]}], max_tokens=args.tokens,
                    temperature=0.0, extra_body=body)
            except Exception as e:  # counted, not fatal: the report says how many failed
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                return
            latencies.append(time.perf_counter() - t)
            tokens += resp.usage.completion_tokens
            if specs[i] is not None and (resp.model_extra or {}).get("steering"):
                confirmed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))] if lat else float("nan"))
    return {"tok_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens, "ok": len(latencies),
            "errors": len(errors), "error_samples": errors[:3], "p50_s": pct(0.5), "p99_s": pct(0.99),
            "mean_s": sum(lat) / len(lat) if lat else float("nan"),
            "steered_requests": sum(s is not None for s in specs), "steering_confirmed": confirmed}


async def load(args, port: int, model_name: str, layers: list[int]) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                         timeout=args.request_timeout)
    prompts = C.prompt_texts(args.requests)
    phases = {"none": [None] * args.requests, "mixed": [mixed_spec(i, layers) for i in range(args.requests)]}
    warm = args.concurrency
    await run_phase(client, model_name, prompts[:warm], phases["mixed"][:warm], args)  # warm-up, not timed
    rounds = []
    for r in range(args.reps):
        row = {}
        for name in C.rotated(list(phases), r):
            row[name] = await run_phase(client, model_name, prompts, phases[name], args)
            C.log(f"round {r + 1}/{args.reps} {name}: {row[name]['tok_s']:.1f} tok/s, p50 {row[name]['p50_s']:.2f} s, "
                  f"p99 {row[name]['p99_s']:.2f} s, errors {row[name]['errors']}")
        rounds.append(row)
    await client.close()
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vsteer.engine import VectorRegistry

    path = C.resolve_model(args.model)
    hidden, num_layers = C.model_shape(path)
    mid = num_layers // 3
    layers = sorted({min(mid + 2 * i, num_layers - 1) for i in range(-1, 3)} & set(range(num_layers)))
    work = Path(tempfile.mkdtemp(prefix="vsteer-bench-"))
    VectorRegistry(work).add(VECTOR, C.random_vector_set(VECTOR, hidden, layers))
    port = free_port()
    cmd = [args.vsteer, "serve", args.model, "--vectors", str(work), "--host", "127.0.0.1", "--port", str(port),
           "--gpu-memory-utilization", "0.3", "--max-model-len", "1024"] \
        + ([] if args.compiled else ["--enforce-eager"])
    log_path = C.OUT_DIR / "logs" / f"{NAME}-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    C.log(f"starting: {' '.join(cmd)}")
    started = time.perf_counter()
    status, rounds, error = "ok", [], None
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ,
                                     "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
        try:
            if not wait_healthy(port, proc, args.start_timeout):
                status = "server_did_not_start"
                error = f"exit code {proc.poll()}; log tail:\n{C.tail(log_path, 25)}"
            else:
                start_s = time.perf_counter() - started
                C.log(f"server healthy after {start_s:.0f} s on port {port}")
                rounds = asyncio.run(asyncio.wait_for(load(args, port, args.model, layers), timeout=args.deadline))
        except asyncio.TimeoutError:
            status, error = "deadline", f"the load run passed its {args.deadline:.0f} s deadline"
        finally:
            stop_server(proc)
    if status != "ok":
        print(f"server load run failed: {status}\n{error}", file=sys.stderr)
        C.write_result(NAME, {"status": status, "error": error, "command": cmd, "rounds": rounds})
        return 1

    def med(phase: str, key: str) -> float:
        return C.median([r[phase][key] for r in rounds])

    ratio = C.median([r["mixed"]["tok_s"] / r["none"]["tok_s"] for r in rounds])
    rows = [[phase, med(phase, "tok_s"), med(phase, "p50_s"), med(phase, "p99_s"),
             sum(r[phase]["errors"] for r in rounds), sum(r[phase]["steering_confirmed"] for r in rounds),
             sum(r[phase]["steered_requests"] for r in rounds)] for phase in ("none", "mixed")]
    print()
    print(C.table(["phase", "tok/s", "p50 latency (s)", "p99 latency (s)", "errors", "steering confirmed",
                   "steered requests"], rows))
    print(f"\n  mixed / none throughput: {ratio:.3f}")
    C.write_result(NAME, {
        "status": status,
        "params": {"model": args.model, "model_path": path, "requests_per_phase": args.requests,
                   "concurrency": args.concurrency, "completion_tokens": args.tokens, "reps": args.reps,
                   "compiled": args.compiled, "host": "127.0.0.1", "mix": "1 in 4 unsteered; others strength "
                   "0.5-2.0, 1/2/4 layers, positions all or generated", "vector_layers": layers},
        "command": cmd, "server_start_s": start_s,
        "tok_s": {"none": med("none", "tok_s"), "mixed": med("mixed", "tok_s")},
        "latency_s": {p: {"p50": med(p, "p50_s"), "p99": med(p, "p99_s")} for p in ("none", "mixed")},
        "ratio_mixed_vs_none": ratio,
        "errors": sum(r[p]["errors"] for r in rounds for p in r),
        "rounds": rounds,
        "notes": ["ratio = median over rounds of (mixed tok/s / none tok/s of that round)",
                  "latency = wall time of one non-streaming request at the given concurrency"],
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
