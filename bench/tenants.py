"""Fairness between tenants: does one client inventing a new steering config per request
slow down everyone else?

Starts ``vsteer serve`` (SmolLM2, 127.0.0.1). A *victim* client streams greedy chat
completions one after another (unsteered, and in a second pass steered with one fixed
registry vector) while an *attacker* sends requests with ``max_tokens=1``:

* ``closed``: a closed loop of ``--connections`` connections, back to back;
* ``open``: an open loop at ``--rate`` requests per second.

In the *attack* phases every attacker request carries a new inline spec (16 vectors x 4
layers, random data: never seen before); in the *baseline* phases the attacker sends the
same requests without steering. Reported per (victim, attacker mode): the victim's
tokens/s under attack divided by its tokens/s against the baseline attacker, measured
side by side in the same run (the phases alternate; target >= 0.9), the victim's errors
(target 0), and what happened to the attacker (accepted, refused with 429
``too_many_new_configs``).

The server runs twice: with the default per-client budget of new specs
(``VSTEER_NEW_CONFIGS_PER_S``) and with it off (``=0``), which isolates what preparing new
configs off the engine step buys on its own.

    python bench/tenants.py                       # SmolLM2, 2 servers x 8 phases of 20 s
    python bench/tenants.py --phase-s 8 --rounds 1 --budgets on   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from server_load import free_port, stop_server, wait_healthy  # noqa: E402

NAME = "tenants"
VICTIM_VECTOR = "victim-vector"
TARGET = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds per measured phase (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (baseline, attack) per condition")
    p.add_argument("--connections", type=int, default=8, help="closed loop: attacker connections")
    p.add_argument("--rate", type=float, default=8.0, help="open loop: attacker requests per second")
    p.add_argument("--vectors", type=int, default=16, help="attacker: vectors per spec")
    p.add_argument("--layers", type=int, default=4, help="attacker: layers per vector")
    p.add_argument("--victim-tokens", type=int, default=64, help="victim: tokens per streamed request")
    p.add_argument("--budgets", default="on,off", help="server runs: on = default new-spec budget, off = none")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--vsteer", default=str(Path(sys.executable).with_name("vsteer")))
    p.add_argument("--out", help="result JSON (default: bench/out/tenants.json)")
    return p.parse_args(argv)


def random_spec(rng: np.random.Generator, hidden: int, num_layers: int, vectors: int, layers: int) -> dict:
    """A never-seen spec: ``vectors`` inline vectors, each on ``layers`` random layers."""
    out = []
    for i in range(vectors):
        picked = sorted(rng.choice(num_layers, size=layers, replace=False).tolist())
        data = {str(layer): base64.b64encode((rng.standard_normal(hidden) * 0.05).astype("<f4").tobytes()).decode()
                for layer in picked}
        out.append({"name": f"a{i}", "strength": 1.0, "layers": picked, "data": data})
    return {"vectors": out}


async def victim(client, model: str, steering: dict | None, stop: asyncio.Event, args) -> dict:
    """Streams one request after another until ``stop``; counts tokens and errors."""
    tokens, errors, t0 = 0, 0, time.perf_counter()
    body = {"ignore_eos": True, **({"steering": steering} if steering else {})}
    while not stop.is_set():
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Tell me about your favourite place."}],
                max_tokens=args.victim_tokens, temperature=0.0, stream=True, extra_body=body)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content is not None:
                    tokens += 1
        except Exception:
            errors += 1
            await asyncio.sleep(0.2)
    return {"tok_s": tokens / (time.perf_counter() - t0), "tokens": tokens, "errors": errors}


async def attacker(client, model: str, mode: str, attack: bool, stop: asyncio.Event, shape, args) -> dict:
    rng = np.random.default_rng(int(time.time() * 1000) % 2**32)
    counts = {"sent": 0, "ok": 0, "rate_limited": 0, "other_errors": 0}

    async def one() -> None:
        body = {"steering": random_spec(rng, *shape, args.vectors, args.layers)} if attack else {}
        counts["sent"] += 1
        try:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=1, temperature=0.0, extra_body=body)
            counts["ok"] += 1
        except Exception as e:
            counts["rate_limited" if getattr(e, "status_code", None) == 429 else "other_errors"] += 1

    if mode == "closed":
        async def loop() -> None:
            while not stop.is_set():
                await one()
        await asyncio.gather(*(loop() for _ in range(args.connections)))
    else:
        pending = set()
        while not stop.is_set():
            pending.add(asyncio.ensure_future(one()))
            pending = {t for t in pending if not t.done()}
            await asyncio.sleep(1.0 / args.rate)
        await asyncio.gather(*pending, return_exceptions=True)
    return counts


async def phase(port: int, model: str, steering: dict | None, mode: str, attack: bool, shape, args) -> dict:
    from openai import AsyncOpenAI

    victim_client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="victim", max_retries=0, timeout=300)
    attack_client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="attacker", max_retries=0,
                                timeout=300)
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(victim(victim_client, model, steering, stop, args)),
             asyncio.ensure_future(attacker(attack_client, model, mode, attack, stop, shape, args))]
    await asyncio.sleep(args.phase_s)
    stop.set()
    got_victim, got_attacker = await asyncio.gather(*tasks)
    await victim_client.close()
    await attack_client.close()
    return {"victim": got_victim, "attacker": got_attacker}


def run_server(args, budget: str, shape, work: Path) -> dict:
    port = free_port()
    cmd = [args.vsteer, "serve", args.model, "--vectors", str(work), "--host", "127.0.0.1", "--port", str(port),
           "--gpu-memory-utilization", "0.3", "--max-model-len", "1024", "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VSTEER_NEW_CONFIGS_PER_S": "0" if budget == "off" else os.environ.get("VSTEER_NEW_CONFIGS_PER_S", "20")}
    log_path = C.OUT_DIR / "logs" / f"{NAME}-{budget}-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            if not wait_healthy(port, proc, args.start_timeout):
                raise RuntimeError(f"the server did not start:\n{C.tail(log_path, 25)}")
            victim_spec = {"vectors": [{"name": VICTIM_VECTOR, "strength": 1.0}]}
            for steering_name, steering in (("unsteered", None), ("steered", victim_spec)):
                for mode in ("closed", "open"):
                    for r in range(args.rounds):
                        for attack in C.rotated([False, True], r):
                            got = asyncio.run(phase(port, args.model, steering, mode, attack, shape, args))
                            results.append({**got, "budget": budget, "victim_steering": steering_name, "mode": mode,
                                            "round": r, "attack": attack})  # got["victim"]: the victim's figures
                            C.log(f"budget {budget}, victim {steering_name}, {mode}, round {r}, "
                                  f"{'attack' if attack else 'baseline'}: victim {got['victim']['tok_s']:.1f} tok/s "
                                  f"({got['victim']['errors']} errors); attacker {got['attacker']}")
        finally:
            stop_server(proc)
    return {"command": cmd, "results": results}


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["budget"], r["victim_steering"], r["mode"]) for r in results})
    for budget, victim_kind, mode in keys:
        these = [r for r in results if (r["budget"], r["victim_steering"], r["mode"]) == (budget, victim_kind, mode)]
        ratios = []
        for rnd in sorted({r["round"] for r in these}):
            pair = {r["attack"]: r for r in these if r["round"] == rnd}
            if True in pair and False in pair and pair[False]["victim"]["tok_s"] > 0:
                ratios.append(pair[True]["victim"]["tok_s"] / pair[False]["victim"]["tok_s"])
        attacks = [r for r in these if r["attack"]]
        rows.append({"budget": budget, "victim": victim_kind, "mode": mode, "ratio": C.median(ratios),
                     "baseline_tok_s": C.median([r["victim"]["tok_s"] for r in these if not r["attack"]]),
                     "attack_tok_s": C.median([r["victim"]["tok_s"] for r in attacks]),
                     "victim_errors": sum(r["victim"]["errors"] for r in these),
                     "attacker_ok": sum(r["attacker"]["ok"] for r in attacks),
                     "attacker_429": sum(r["attacker"]["rate_limited"] for r in attacks),
                     "attacker_errors": sum(r["attacker"]["other_errors"] for r in attacks),
                     "met": bool(ratios) and C.median(ratios) >= TARGET
                     and sum(r["victim"]["errors"] for r in these) == 0})
    return rows


def report_lines(result: dict) -> list[str]:
    p = result["params"]
    lines = ["## Fairness between tenants (`bench/tenants.py`)", "",
             f"`vsteer serve` {p['model']} (eager, 2 CPU cores). A victim streams greedy chat completions "
             f"({p['victim_tokens']} tokens each) while an attacker sends `max_tokens=1` requests, each with a new "
             f"inline spec of {p['vectors']} vectors x {p['layers']} layers (attack) or none (baseline): a closed "
             f"loop of {p['connections']} connections, or an open loop at {p['rate']:g} requests/s. {p['phase_s']:g} s "
             f"phases, baseline and attack alternating, {p['rounds']} round(s); ratio = median over rounds of victim "
             f"tok/s under attack / against the baseline attacker. Budget on = the default per-client budget of new "
             f"specs (429 `too_many_new_configs` beyond it); off = none. Target: ratio >= {TARGET}, 0 victim errors.",
             "", "| budget | victim | attacker | victim tok/s (baseline) | victim tok/s (attack) | ratio | victim "
             "errors | attacker ok | attacker 429 | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['budget']} | {r['victim']} | {r['mode']} | {r['baseline_tok_s']:.1f} | "
                     f"{r['attack_tok_s']:.1f} | {r['ratio']:.2f} | {r['victim_errors']} | {r['attacker_ok']} | "
                     f"{r['attacker_429']} | {'yes' if r['met'] else '**no**'} |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vsteer.engine import VectorRegistry

    path = C.resolve_model(args.model)
    hidden, num_layers = C.model_shape(path)
    work = Path(tempfile.mkdtemp(prefix="vsteer-tenants-"))
    VectorRegistry(work).add(VICTIM_VECTOR, C.random_vector_set(VICTIM_VECTOR, hidden, [num_layers // 3]))
    runs = {budget: run_server(args, budget, (hidden, num_layers), work) for budget in args.budgets.split(",")}
    results = [r for run in runs.values() for r in run["results"]]
    summary = summarize(results)
    print()
    print(C.table(["budget", "victim", "attacker", "baseline tok/s", "attack tok/s", "ratio", "victim errors",
                   "attacker ok", "attacker 429", "met"],
                  [[r["budget"], r["victim"], r["mode"], r["baseline_tok_s"], r["attack_tok_s"], r["ratio"],
                    r["victim_errors"], r["attacker_ok"], r["attacker_429"], r["met"]] for r in summary]))
    params = {k: getattr(args, k) for k in ("model", "phase_s", "rounds", "connections", "rate", "vectors", "layers",
                                             "victim_tokens", "budgets")}
    checks = [{"target": f"victim ({r['victim']}) tok/s under a new-spec-per-request attacker ({r['mode']} loop, "
                         f"budget {r['budget']}) / against the same attacker unsteered >= {TARGET}, 0 victim errors",
               "value": r["ratio"], "met": r["met"]} for r in summary]
    C.write_result(NAME, {"params": params, "summary": summary, "checks": checks, "results": results,
                          "commands": {b: r["command"] for b, r in runs.items()}, **C.meta()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
