"""Per-step host cost of vsteer's worker: the real ``WorkerSteering.step`` and
``SteeringTables`` code at GPU batch sizes, driven by synthetic model-runner state.

What runs is the code a vLLM worker runs right after the runner prepares its inputs (the
V1 adapter's ``_prepare_inputs`` wrapper and ``WorkerSteering.step``: per-request lookup,
row assignment, the per-token row index with the position rules, the table writes of new
configs); only the runner is synthetic: an object with the fields the V1 adapter reads
(``requests`` with ``sampling_params.extra_args``, ``input_batch.req_ids / num_reqs /
num_computed_tokens_cpu / num_prompt_tokens``, ``max_num_reqs``, ``max_num_tokens``,
``dtype``, ``device``, ``model_config``, ``get_model()`` returning a module with decoder
blocks to hook). No vLLM and no model forward are involved, so the figures are host time
only.

Requests carry what the engine core leaves in ``extra_args``: the pins and the config's
prepared rows (``PreparedSteering``). Preparing them (resolve, scale, orthonormalise,
cast) happens off the step, in the engine core's input thread; its cost per config is
reported separately ("prepare").

Cases: batch N requests (``--batches``), every request steered, with 1, 16 or N distinct
configs (inline vectors on ``--steered-layers`` layers; the five position rules rotate
over the distinct configs), in
* ``decode``: one token per request per step;
* ``mixed``: decode plus ``--new-per-step`` requests that finish and are replaced each step
  by new ones prefilling a ``--chunk``-token chunk (chunked prefill with churn: the new
  requests are looked up; their configs are in use by other requests, and resident);
* ``new``: a warmed-up worker whose whole batch is replaced every step by requests with
  configs it has never seen (the step-path cost of new tenants: every row written anew;
  ``--new-steps`` steps).
Each case reports the median and p90 over ``--steps`` steps after ``--warmup`` steps
(steady state), and separately the first step of a fresh worker: it meets every distinct
config for the first time and writes their table rows (the step-path cost of new configs).

On a GPU an 8B model's decode step at batch 256 takes ~15-25 ms; the targets: at most
100 us per step at 256 requests x 256 distinct configs in decode (under 1% of that),
linear or better growth to 1024 (cost(1024) / cost(256) <= 4), at most 100 us of step
path per never-seen config, and a step meeting 256 never-seen configs under 5 ms.

    python bench/step_overhead.py                    # 32 layers x 4096 hidden (8B shape), bf16
    python bench/step_overhead.py --batches 64 --steps 200 --hidden 512 --layers 8   # quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "step_overhead"
TARGET_US = 100.0
TARGET_BATCH = 256
TARGET_NEW_CONFIG_US = 100.0
TARGET_256_NEW_MS = 5.0


# -- synthetic model-runner state ----------------------------------------------------------
def fake_model(num_layers: int):
    """A module with ``model.layers`` of blocks holding an attention sub-module: what the
    worker's layer locator looks for (no forward ever runs)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Identity()

    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList(Block() for _ in range(num_layers))
    return root


class FakeBatch:
    """``InputBatch`` fields the worker reads (same dtypes as vLLM's: int32 numpy views)."""

    def __init__(self, max_num_reqs: int):
        import numpy as np

        self.req_ids: list[str] = []
        self.num_computed_tokens_cpu = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int32)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


class FakeRunner:
    def __init__(self, *, num_layers: int, hidden: int, max_num_reqs: int, max_num_tokens: int, dtype: Any):
        import torch

        self._model = fake_model(num_layers)
        self.model_config = SimpleNamespace(get_hidden_size=lambda: hidden,
                                            get_total_num_hidden_layers=lambda: num_layers)
        self.max_num_reqs, self.max_num_tokens = max_num_reqs, max_num_tokens
        self.dtype, self.device = dtype, torch.device("cpu")
        self.requests: dict[str, SimpleNamespace] = {}
        self.input_batch = FakeBatch(max_num_reqs)

    def get_model(self):
        return self._model


def make_extra_args(num_configs: int, hidden: int, num_layers: int, layers: list[int], dtype: Any,
                    seed: int = 0) -> tuple[list[dict], list[float]]:
    """``extra_args`` of ``num_configs`` distinct steered requests as the engine core leaves
    them (the pins and the prepared rows; inline vectors, distinct strengths, position rules
    rotating), and the time each config took to prepare (off the step path)."""
    import torch

    from vsteer.engine.positions import POSITIONS
    from vsteer.engine.resolver import SteeringResolver, encode_inline
    from vsteer.serving.keys import PINS_KEY, ROWS_KEY
    from vsteer.serving.prepared import PreparedSteering

    gen = torch.Generator().manual_seed(seed)
    data = {layer: encode_inline(torch.randn(hidden, generator=gen)) for layer in layers}
    engine_core = SteeringResolver(None, hidden_size=hidden, num_layers=num_layers, dtype=dtype)
    out, prepare_us = [], []
    for c in range(num_configs):
        spec = {"vectors": [{"name": "bench", "strength": 1.0 + 0.01 * c, "data": data}],
                "positions": POSITIONS[c % len(POSITIONS)] if num_configs > 1 else "all"}
        t0 = time.perf_counter()
        prepared = PreparedSteering.build(engine_core.resolve(spec), dtype=dtype, max_projections=2)
        prepare_us.append((time.perf_counter() - t0) * 1e6)
        out.append({PINS_KEY: {"fingerprint": prepared.fingerprint, "versions": {}}, ROWS_KEY: prepared})
    return out, prepare_us


class Scenario:
    """A batch of N steered requests evolving step by step like vLLM's input batch."""

    def __init__(self, runner: FakeRunner, extra_args: list[dict], batch: int, *, mixed: bool, new_per_step: int,
                 chunk: int, prompt_len: int = 128, prefix: str = "req"):
        import numpy as np

        self.runner, self.extra_args, self.mixed, self.prefix = runner, extra_args, mixed, prefix
        self.new_per_step, self.chunk, self.prompt_len = min(new_per_step, batch), chunk, prompt_len
        self.next_id = 0
        self.rng = np.random.default_rng(0)
        b = runner.input_batch
        for i in range(batch):
            rid = self._add_request()
            b.req_ids.append(rid)
            b.num_prompt_tokens[i] = prompt_len
            b.num_computed_tokens_cpu[i] = prompt_len + int(self.rng.integers(0, 64))  # decoding
        self.num_scheduled = np.ones(batch, dtype=np.int32)
        self.sched = SimpleNamespace(finished_req_ids=set())

    def _add_request(self) -> str:
        rid = f"{self.prefix}-{self.next_id}"
        extra = self.extra_args[self.next_id % len(self.extra_args)]
        self.next_id += 1
        self.runner.requests[rid] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=dict(extra)))
        return rid

    def advance(self) -> None:
        """After a step: every scheduled token is computed; in ``mixed``, some requests
        finish and new ones take their batch slots with a prefill chunk."""
        b, n = self.runner.input_batch, len(self.num_scheduled)
        b.num_computed_tokens_cpu[:n] += self.num_scheduled
        self.num_scheduled[:] = 1
        self.sched.finished_req_ids = set()
        if not self.mixed:
            return
        for i in self.rng.choice(n, self.new_per_step, replace=False):
            old = b.req_ids[i]
            self.sched.finished_req_ids.add(old)
            del self.runner.requests[old]
            b.req_ids[i] = self._add_request()
            b.num_prompt_tokens[i] = self.prompt_len * 4
            b.num_computed_tokens_cpu[i] = 0
            self.num_scheduled[i] = self.chunk


# -- measurement -----------------------------------------------------------------------------
def run_new_configs(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """Steps that each meet ``batch`` never-seen configs, after warm-up steps that met others."""
    import numpy as np
    import torch

    from vsteer.serving.runners import v1
    from vsteer.serving.worker import WorkerSteering

    dtype = getattr(torch, args.dtype)
    runner = FakeRunner(num_layers=args.layers, hidden=args.hidden, max_num_reqs=max(batch, TARGET_BATCH),
                        max_num_tokens=max(batch, 2048), dtype=dtype)
    steered = list(range(args.layers // 3, args.layers, max(1, args.layers // (3 * args.steered_layers))))
    steered = steered[:args.steered_layers]
    runner._vsteer = ws = WorkerSteering(runner)
    step = v1.prepare_inputs_wrapper(lambda *a, **k: None)
    times, prepare_us = [], []
    for i in range(args.warmup_new + args.new_steps):
        extra_args, prep = make_extra_args(batch, args.hidden, args.layers, steered, dtype, seed=1000 + i)
        prepare_us += prep
        runner.requests.clear()
        runner.input_batch.req_ids = []
        scenario = Scenario(runner, extra_args, batch, mixed=False, new_per_step=0, chunk=1, prefix=f"step{i}")
        gc.collect()
        t0 = time.perf_counter()
        step(runner, SimpleNamespace(finished_req_ids=set()), scenario.num_scheduled)
        if i >= args.warmup_new:
            times.append((time.perf_counter() - t0) * 1e6)
    assert ws.stats["new_configs"] == batch * (args.warmup_new + args.new_steps) and not ws.failed
    arr = np.array(times)
    return {"batch": batch, "configs": batch, "kind": "new", "tokens_per_step": batch,
            "median_us": float(np.median(arr)), "p90_us": float(np.percentile(arr, 90)), "min_us": float(arr.min()),
            "new_config_us": float(np.median(arr)) / batch, "prepare_us_per_config": float(np.median(prepare_us)),
            "steps": args.new_steps}


def run_case(args: argparse.Namespace, batch: int, configs: int, kind: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from vsteer.serving.runners import v1
    from vsteer.serving.worker import WorkerSteering

    dtype = getattr(torch, args.dtype)
    max_tokens = max(batch + args.new_per_step * args.chunk, 2048)
    runner = FakeRunner(num_layers=args.layers, hidden=args.hidden, max_num_reqs=max(batch, TARGET_BATCH),
                        max_num_tokens=max_tokens, dtype=dtype)
    steered = list(range(args.layers // 3, args.layers, max(1, args.layers // (3 * args.steered_layers))))
    steered = steered[:args.steered_layers]
    extra_args, _ = make_extra_args(configs, args.hidden, args.layers, steered, dtype)
    scenario = Scenario(runner, extra_args, batch, mixed=kind == "mixed", new_per_step=args.new_per_step,
                        chunk=args.chunk)
    runner._vsteer = ws = WorkerSteering(runner)
    step = v1.prepare_inputs_wrapper(lambda *a, **k: None)  # the V1 adapter after _prepare_inputs
    gc.collect()
    t0 = time.perf_counter()
    step(runner, scenario.sched, scenario.num_scheduled)
    first_us = (time.perf_counter() - t0) * 1e6
    scenario.advance()
    for _ in range(args.warmup):
        step(runner, scenario.sched, scenario.num_scheduled)
        scenario.advance()
    times = []
    tokens = []
    for _ in range(args.steps):
        tokens.append(int(scenario.num_scheduled.sum()))
        t0 = time.perf_counter()
        step(runner, scenario.sched, scenario.num_scheduled)
        times.append((time.perf_counter() - t0) * 1e6)
        scenario.advance()
    assert ws.stats["configs_per_step"][-1] <= configs and not ws.failed
    assert ws.tables.rows[: tokens[-1]].count_nonzero() > 0  # something was steered
    arr = np.array(times)
    return {"batch": batch, "configs": configs, "kind": kind, "tokens_per_step": int(np.median(tokens)),
            "median_us": float(np.median(arr)), "p90_us": float(np.percentile(arr, 90)),
            "min_us": float(arr.min()), "first_step_us": first_us, "steps": args.steps}


def checks(cases: list[dict]) -> list[dict]:
    def get(batch, kind="decode"):
        return next((c for c in cases if c["batch"] == batch and c["configs"] == batch and c["kind"] == kind), None)

    out = []
    at = get(TARGET_BATCH)
    if at:
        out.append({"target": f"decode, {TARGET_BATCH} requests x {TARGET_BATCH} distinct configs: <= "
                              f"{TARGET_US:g} us per step (median)", "value": at["median_us"],
                    "met": at["median_us"] <= TARGET_US})
    big = get(1024)
    if at and big:
        ratio = big["median_us"] / at["median_us"]
        out.append({"target": "decode, all distinct: cost(1024) / cost(256) <= 4 (linear or better)",
                    "value": ratio, "met": ratio <= 4.0})
    for fresh in (c for c in cases if c["kind"] == "new"):
        per = fresh["new_config_us"]
        out.append({"target": f"a step meeting {fresh['batch']} never-seen configs: <= {TARGET_NEW_CONFIG_US:g} us "
                              "of step path per new config (median)", "value": per, "met": per <= TARGET_NEW_CONFIG_US})
        if fresh["batch"] == TARGET_BATCH:
            ms = fresh["median_us"] / 1000
            out.append({"target": f"a step meeting {TARGET_BATCH} never-seen configs: < {TARGET_256_NEW_MS:g} ms "
                                  "(median)", "value": ms, "met": ms < TARGET_256_NEW_MS})
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section (bench/run_all.py calls this)."""
    p = result["params"]
    lines = ["## Per-step host cost (`bench/step_overhead.py`)", "",
             f"The real `WorkerSteering.step` + `SteeringTables` code on synthetic runner state: "
             f"{p['layers']} layers x {p['hidden']} hidden ({p['dtype']}), vectors on {p['steered_layers']} layers, "
             f"every request steered; decode = 1 token per request; mixed = decode + {p['new_per_step']} requests "
             f"replaced per step by new ones prefilling {p['chunk']} tokens. Median / p90 over {p['steps']} steps "
             f"after {p['warmup']} warm-up steps; first step = a fresh worker meeting every config for the first "
             f"time and writing its prepared rows (CPU tables, {p.get('torch_threads', '?')} torch thread(s); on a "
             "GPU the row writes are a few device copies per step). Prepare = building one config's rows in the "
             "engine core's input thread, off the step path. Host time only (no model forward). Targets: <= 100 us "
             "at 256 x 256 distinct in decode (an 8B decode step at batch 256 on an H200 is ~15-25 ms), linear or "
             "better to 1024, <= 100 us of step path per never-seen config, < 5 ms for a step meeting 256. "
             "new = every request of the step brings a never-seen config (its rows written anew).", "",
             "| batch | distinct configs | step | tokens | median us | p90 us | first step us | step us per new "
             "config | prepare us per config (off the step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = result.get("baseline") or {}
    before = {(c["batch"], c["configs"], c["kind"]): c for c in base.get("cases", [])}
    if before:
        lines[-1] += "---|---|"
        lines[-2] += " before: median us | before: first step us |"
    for c in result["cases"]:
        first = f"{c['first_step_us']:.0f}" if "first_step_us" in c else "-"
        per = f"{c['new_config_us']:.1f}" if "new_config_us" in c else "-"
        prep = f"{c['prepare_us_per_config']:.0f}" if "prepare_us_per_config" in c else "-"
        row = (f"| {c['batch']} | {c['configs']} | {c['kind']} | {c['tokens_per_step']} | "
               f"{c['median_us']:.1f} | {c['p90_us']:.1f} | {first} | {per} | {prep} |")
        if before:
            b = before.get((c["batch"], c["configs"], c["kind"]))
            row += f" {b['median_us']:.1f} | {b.get('first_step_us', float('nan')):.0f} |" if b else " n/a | n/a |"
        lines.append(row)
    lines.append("")
    if before:
        def load(r: dict) -> str:
            return " / ".join(f"{x:.1f}" for x in r.get("machine", {}).get("loadavg_at_start", []))

        lines += [f"Before = {base.get('label') or 'baseline'} (run {base.get('date', '?')}, load average "
                  f"{load(base)}); this run: {result.get('date', '?')}, load average {load(result)} (1/5/15 min "
                  "at start; 2 shared cores).", ""]
    for chk in result.get("checks", []):
        lines.append(f"* {chk['target']}: {chk['value']:.2f} ({'met' if chk['met'] else '**not met**'})")
    lines.append("")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64,256,1024", help="requests per step (default: %(default)s)")
    p.add_argument("--configs", default="1,16,all", help="distinct configs per batch; all = one per request")
    p.add_argument("--kinds", default="decode,mixed,new")
    p.add_argument("--layers", type=int, default=32, help="decoder layers hooked (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steered-layers", type=int, default=4, help="layers each vector touches")
    p.add_argument("--steps", type=int, default=2000, help="measured steps per case (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--new-per-step", type=int, default=4, help="mixed: requests replaced per step")
    p.add_argument("--new-batches", default="1,16,256", help="new: batches of never-seen configs per step")
    p.add_argument("--new-steps", type=int, default=15, help="new: measured steps per batch")
    p.add_argument("--warmup-new", type=int, default=3, help="new: warm-up steps (other never-seen configs)")
    p.add_argument("--chunk", type=int, default=512, help="mixed: prefill tokens of each new request")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch CPU threads for the table-row writes of first steps (default: %(default)s; on a "
                        "GPU they are device copies; on an oversubscribed CPU, 2 threads made each 16 ms)")
    p.add_argument("--out", help="result JSON (default: bench/out/step_overhead.json)")
    p.add_argument("--baseline", help="an earlier result JSON to report beside this one (e.g. the code "
                                      "before an optimisation, run with that tree first on PYTHONPATH)")
    p.add_argument("--label", help="what this run measures (stored; shown when it is a baseline)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)
    batches = [int(b) for b in args.batches.split(",")]
    cases = []
    print(f"{'batch':>6} {'configs':>8} {'kind':>7} {'tokens':>7} {'median us':>10} {'p90 us':>9} "
          f"{'first us':>10}", flush=True)
    for batch in batches:
        for cfg in args.configs.split(","):
            configs = batch if cfg == "all" else min(int(cfg), batch)
            for kind in [k for k in args.kinds.split(",") if k != "new"]:
                c = run_case(args, batch, configs, kind)
                cases.append(c)
                print(f"{batch:>6} {configs:>8} {kind:>7} {c['tokens_per_step']:>7} {c['median_us']:>10.1f} "
                      f"{c['p90_us']:>9.1f} {c['first_step_us']:>10.0f}", flush=True)
    if "new" in args.kinds.split(","):
        for batch in (int(b) for b in args.new_batches.split(",") if b):
            c = run_new_configs(args, batch)
            cases.append(c)
            print(f"{batch:>6} {batch:>8} {'new':>7} {batch:>7} {c['median_us']:>10.1f} {c['p90_us']:>9.1f} "
                  f"{'-':>10}  ({c['new_config_us']:.1f} us per new config; preparing one off the step: "
                  f"{c['prepare_us_per_config']:.0f} us)", flush=True)
    params = {k: getattr(args, k) for k in ("layers", "hidden", "dtype", "steered_layers", "steps", "warmup",
                                             "new_per_step", "chunk", "torch_threads", "new_steps")}
    result = {"params": params, "cases": cases, "checks": checks(cases), "label": args.label, **C.meta()}
    if args.baseline:
        import json

        base = json.loads(Path(args.baseline).read_text())
        result["baseline"] = {k: base.get(k) for k in ("label", "date", "machine", "params", "cases")}
    for chk in result["checks"]:
        print(f"{chk['target']}: {chk['value']:.2f} ({'met' if chk['met'] else 'NOT MET'})")
    C.write_result(NAME, result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
