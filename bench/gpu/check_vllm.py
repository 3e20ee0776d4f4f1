"""GPU check of vsteer inside real vLLM (0.32-0.34): token parity and the cost of the op.

    python bench/gpu/check_vllm.py --out check_vllm.json     # a CUDA machine with vLLM + vsteer
    python bench/gpu/check_vllm.py --cpu-smoke --out x.json  # CI (tests/test_gpu_check_cpu.py)

Only public API: ``vllm.LLM`` / ``AsyncLLM`` with ``SamplingParams(extra_args={"steering":
spec})`` and ``vsteer.serving.set_vectors_dir``; the reference is the HF model with
``vsteer.engine.SpecInjector`` (tests/reference.py), one request alone, greedy.

1. Parity (a small random Llama, fp32, ``vsteer.engine.models.build_tiny_llama``): batches
   of N requests with mixed specs (unsteered, add, ablate, clamp, several vectors, every
   position rule), N inside the CUDA-graph capture sizes (1, 8, 16), padded up to one (3)
   and above the largest (21, with ``max_cudagraph_capture_size=16``); vLLM's default
   compilation (FULL_AND_PIECEWISE on GPU), ``async_scheduling=True``. Every request's
   tokens must equal the reference; the first-token logprobs are compared too. With two
   or more GPUs the same runs with tensor parallelism 2, and data parallelism 2 through
   ``AsyncLLM`` (offline ``LLM`` refuses DP), where batches of one leave a rank idle (it
   runs dummy steps between the other rank's real ones).
2. Cost at Llama-3-8B shapes (32 layers, hidden 4096, GQA 32/8, bf16, random weights via
   ``load_format="dummy"``: no download): decode-heavy generation (64 requests, 32 prompt
   tokens, 256 new) with the plugin disabled (``VSTEER_DISABLE=1``, its own engine), on
   with nobody steering, every row adding (all layers), every row projecting (ablate).

Each engine runs in a child process of this script (``--child``), so environment, GPU
memory and plugin state never leak between configurations. Writes one JSON report
(``--out``); exit status 0 and a last line ``PASS`` when every parity check held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NEW_TOKENS = 16
PROMPTS = ["The weather today is", "Once upon a time there was a", "My favourite food is", "I think that the",
           "Yesterday I went to the market and", "The capital of France is", "In the beginning",
           "She opened the door and saw", "Here is a list of things:", "What a wonderful"]


def specs_cycle() -> list[Any]:
    a, b = {"name": "a", "strength": 1.0}, {"name": "b", "strength": 1.0}
    return [None, {"vectors": [a]}, {"vectors": [{"name": "a", "op": "ablate"}]},
            {"vectors": [a, b]}, {"vectors": [{"name": "b", "op": "clamp", "strength": 2.0}], "positions": "prompt"},
            {"vectors": [{"name": "a", "strength": -1.5}], "positions": "generated"},
            {"vectors": [b], "positions": "first"}, {"vectors": [{"name": "a", "strength": 3.0}], "positions": "last"},
            {"vectors": []}]


def _vector(hidden: int, seed: int, norm: float):
    import torch

    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def make_registry(root: Path, hidden: int, layers: list[int], norm: float):
    """Vectors "a" (two layers) and "b" (one layer); "all" on every layer (cost runs)."""
    from vsteer.engine import SteeringVectorSet, VectorRegistry

    reg = VectorRegistry(root)
    reg.add("a", SteeringVectorSet("a", {layers[1]: _vector(hidden, 1, norm), layers[2]: _vector(hidden, 2, norm)}))
    reg.add("b", SteeringVectorSet("b", {layers[-1]: _vector(hidden, 3, norm * 1.3)}))
    reg.add("all", SteeringVectorSet("all", {layer: _vector(hidden, 10 + layer, norm) for layer in layers}))
    return reg


def params(spec: Any, max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs,
                          extra_args={"steering": spec} if spec is not None else None)


# -- child: one engine, some tasks ---------------------------------------------------------------

def engine_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(dtype=cfg.get("dtype", "float32"), seed=0, max_model_len=cfg.get("max_model_len", 512),
                              max_num_seqs=cfg.get("max_num_seqs", 64),
                              gpu_memory_utilization=cfg.get("gpu_memory_utilization", 0.3))
    if cfg.get("eager"):
        kw["enforce_eager"] = True
    if cfg.get("max_capture"):
        kw["compilation_config"] = {"max_cudagraph_capture_size": cfg["max_capture"]}
    if cfg.get("async_scheduling") is not None:
        kw["async_scheduling"] = cfg["async_scheduling"]
    for key in ("tensor_parallel_size", "data_parallel_size", "load_format", "skip_tokenizer_init"):
        if cfg.get(key) is not None:
            kw[key] = cfg[key]
    return kw


def hf_references(model_path: str, device: str, hidden: int, layers: int, registry, cases) -> dict:
    """(prompt index, spec json) -> (tokens, first-token logprobs) from the HF model alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from vsteer.engine import SpecInjector, SteeringResolver

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    resolver = SteeringResolver(registry, hidden_size=hidden, num_layers=layers)
    out = {}
    for ids, spec in cases:
        key = (tuple(ids), json.dumps(spec, sort_keys=True))
        if key in out:
            continue
        x = torch.tensor([ids], device=device)
        with torch.no_grad(), SpecInjector(model, resolver.resolve(spec)):
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0, eos_token_id=None)
        margins = [float(t[0] - t[1]) for t in (lg[0].float().topk(2).values for lg in gen.logits)]
        out[key] = (gen.sequences[0, len(ids):].tolist(), torch.log_softmax(gen.logits[0][0].float(), -1).cpu(),
                    margins)
    del model
    return out


def parity_task(llm_generate, cfg: dict[str, Any], tokenizer_path: str, registry) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    specs = specs_cycle()
    batches = []
    plan = []
    for n in cfg["batch_sizes"]:
        cases = [(tok(PROMPTS[(i + n) % len(PROMPTS)])["input_ids"], specs[(i + n) % len(specs)]) for i in range(n)]
        plan.append((n, cases))
    t0 = time.time()
    got_all = [(n, cases, llm_generate([c[0] for c in cases], [params(c[1], NEW_TOKENS, 5) for c in cases]))
               for n, cases in plan]
    vllm_s = time.time() - t0
    refs = hf_references(cfg["model"], cfg["hf_device"], cfg["hidden"], cfg["layers"], registry,
                         [c for _, cases in plan for c in cases] + [(c[0], None) for _, cases in plan for c in cases])
    changed = steered = 0
    for n, cases, outs in got_all:
        mism, lp_diff = [], 0.0
        for (ids, spec), (tokens, logprobs) in zip(cases, outs):
            ref_tokens, ref_lp, margins = refs[(tuple(ids), json.dumps(spec, sort_keys=True))]
            if tokens != ref_tokens:
                first = next(i for i, (x, y) in enumerate(zip(tokens + [None], ref_tokens + [None])) if x != y)
                mism.append({"spec": spec, "first_diff": first, "vllm": tokens, "hf": ref_tokens,
                             # a near tie in the reference's logits there points at numerics, not steering
                             "hf_top2_logit_margin_at_diff": margins[first] if first < len(margins) else None})
            for token_id, lp in (logprobs or {}).items():
                lp_diff = max(lp_diff, abs(lp - float(ref_lp[token_id])))
            if spec and spec.get("vectors"):
                steered += 1
                changed += ref_tokens != refs[(tuple(ids), "null")][0]
        batches.append({"batch_size": n, "requests": n, "mismatches": mism, "max_first_logprob_diff": lp_diff})
    ok = all(not b["mismatches"] and b["max_first_logprob_diff"] < cfg.get("logprob_atol", 1e-2) for b in batches)
    return {"task": "parity", "passed": ok and changed > 0, "batches": batches, "vllm_seconds": round(vllm_s, 2),
            "steered_requests": steered, "steered_changed_vs_unsteered_reference": changed}


def cost_task(llm_generate, cfg: dict[str, Any]) -> dict[str, Any]:
    n, plen, new, reps = cfg["cost_requests"], cfg["cost_prompt"], cfg["cost_new"], cfg.get("reps", 3)
    prompts = [[(7 * i + 13 * j) % 5000 + 100 for j in range(plen)] for i in range(n)]
    conditions = {"nobody_steers": None, "every_row_adds": {"vectors": [{"name": "all", "strength": 1.0}]},
                  "every_row_projects": {"vectors": [{"name": "all", "op": "ablate"}]}}
    if cfg.get("plugin_disabled"):
        conditions = {"plugin_disabled": None}
    llm_generate(prompts[:2], [params(None, 4)] * 2)  # warm-up
    out = {}
    for name, spec in conditions.items():
        times = []
        for _ in range(reps):
            t0 = time.time()
            llm_generate(prompts, [params(spec, new) for _ in prompts])
            times.append(time.time() - t0)
        med = statistics.median(times)
        out[name] = {"seconds": [round(t, 3) for t in times], "median_s": round(med, 3),
                     "tokens_per_s": round(n * new / med, 1)}
    return {"task": "cost", "requests": n, "prompt_tokens": plen, "new_tokens": new, "conditions": out}


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("plugin_disabled"):
        os.environ["VSTEER_DISABLE"] = "1"
    if cfg.get("hf_device") == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vsteer.serving import set_vectors_dir

    root = Path(tempfile.mkdtemp(prefix="vsteer-check-vectors-"))
    registry = make_registry(root, cfg["hidden"], list(range(cfg["layers"])), cfg.get("norm", 6.0))
    set_vectors_dir(root)
    import vllm

    result: dict[str, Any] = {"config": cfg, "vllm": vllm.__version__}
    t0 = time.time()
    if cfg.get("data_parallel_size", 1) > 1:
        generate, close = _async_engine(cfg)
    else:
        llm = vllm.LLM(cfg["model"], **engine_kwargs(cfg))

        def generate(prompt_ids, sps):
            outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sps, use_tqdm=False)
            return [(list(o.outputs[0].token_ids),
                     {t: lp.logprob for t, lp in (o.outputs[0].logprobs or [{}])[0].items()}) for o in outs]

        close = None
    result["startup_s"] = round(time.time() - t0, 1)
    try:
        result["tasks"] = [parity_task(generate, cfg, cfg["tokenizer"], registry) if t == "parity"
                           else cost_task(generate, cfg) for t in cfg["tasks"]]
    finally:
        if close:
            close()
    return result


def _async_engine(cfg: dict[str, Any]):
    """``AsyncLLM`` (vLLM's engine behind ``vllm serve``) for data parallelism."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = asyncio.new_event_loop()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(cfg["model"], **engine_kwargs(cfg)))
    counter = iter(range(10**9))

    async def one(ids, sp):
        final = None
        async for out in engine.generate({"prompt_token_ids": ids}, sp, f"check-{next(counter)}"):
            final = out
        o = final.outputs[0]
        return list(o.token_ids), {t: lp.logprob for t, lp in (o.logprobs or [{}])[0].items()}

    def generate(prompt_ids, sps):
        async def all_():
            return await asyncio.gather(*(one(i, s) for i, s in zip(prompt_ids, sps)))
        return loop.run_until_complete(all_())

    return generate, engine.shutdown


# -- parent -------------------------------------------------------------------------------------

def llama8b_dir(tokenizer_from: Path) -> Path:
    """A config-only Llama-3-8B-shaped folder (weights are vLLM's ``load_format="dummy"``)."""
    import shutil

    out = Path(tempfile.mkdtemp(prefix="llama8b-shape-"))
    cfg = json.loads((tokenizer_from / "config.json").read_text())
    cfg.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
               vocab_size=128256, tie_word_embeddings=False, torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def spawn(cfg: dict[str, Any], timeout: int) -> dict[str, Any]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD_RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"config": cfg, "error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-4000:],
                "wall_s": round(time.time() - t0, 1)}
    res = json.loads(lines[-1][len("CHILD_RESULT "):])
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="check_vllm.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, one eager engine (CI)")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("CHILD_RESULT " + json.dumps(run_child(json.loads(args.child)), default=str), flush=True)
        return 0
    import torch

    from vsteer.engine.models import build_tiny_llama

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not args.cpu_smoke:
        print("no CUDA GPU: run with --cpu-smoke for the reduced CPU check")
        return 2
    hidden = 128 if args.cpu_smoke else 256
    tiny = build_tiny_llama(layers=4, hidden=hidden)
    base = dict(model=str(tiny), tokenizer=str(tiny), hidden=hidden, layers=4, hf_device="cuda" if gpus else "cpu",
                dtype="float32", reps=args.reps)
    report: dict[str, Any] = {"gpus": gpus, "device": torch.cuda.get_device_name(0) if gpus else "cpu",
                              "torch": torch.__version__, "runs": []}
    runs: list[dict[str, Any]] = []
    if args.cpu_smoke:
        runs.append(dict(base, name="cpu-smoke", eager=True, batch_sizes=[1, 3], max_num_seqs=8,
                         gpu_memory_utilization=0.3, tasks=["parity"] + ([] if args.skip_cost else ["cost"]),
                         cost_requests=4, cost_prompt=8, cost_new=4, reps=1, max_model_len=256))
    else:
        gpu = dict(base, max_capture=16, async_scheduling=True, batch_sizes=[1, 3, 8, 16, 21],
                   tasks=["parity"], max_num_seqs=32)
        runs.append(dict(gpu, name="parity-tp1"))
        if gpus >= 2:
            runs.append(dict(gpu, name="parity-tp2", tensor_parallel_size=2))
            runs.append(dict(gpu, name="parity-dp2", data_parallel_size=2, batch_sizes=[1, 1, 5, 16]))
        if not args.skip_cost:
            big = llama8b_dir(tiny)
            cost = dict(base, model=str(big), tokenizer=str(tiny), hidden=4096, layers=32, dtype="bfloat16",
                        load_format="dummy", norm=4.0, tasks=["cost"], cost_requests=64, cost_prompt=32,
                        cost_new=256, max_num_seqs=64, max_model_len=1024, gpu_memory_utilization=0.85,
                        async_scheduling=True)
            runs.append(dict(cost, name="cost-8b-plugin-disabled", plugin_disabled=True))
            runs.append(dict(cost, name="cost-8b"))
    passed = True
    for cfg in runs:
        res = spawn(cfg, args.timeout)
        report["runs"].append(res)
        ok = "error" not in res and all(t.get("passed", True) for t in res.get("tasks", []))
        passed &= ok
        print(f"{cfg['name']}: {'ok' if ok else 'FAILED'} ({res.get('wall_s')} s)", flush=True)
    summarize_cost(report)
    report["passed"] = passed
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def summarize_cost(report: dict[str, Any]) -> None:
    """Throughput of each condition relative to the plugin-disabled engine (8B runs)."""
    cond: dict[str, float] = {}
    for run in report["runs"]:
        for task in run.get("tasks", []):
            if task.get("task") == "cost":
                cond.update({k: v["tokens_per_s"] for k, v in task["conditions"].items()})
    ref = cond.get("plugin_disabled") or cond.get("nobody_steers")
    if ref:
        report["cost_relative_throughput"] = {k: round(v / ref, 3) for k, v in cond.items()}


if __name__ == "__main__":
    sys.exit(main())
