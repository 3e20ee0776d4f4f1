"""HF-hook steering (how rotalabs-steer, steering-vectors and repeng steer: a forward hook
adding the vector after a decoder block, ``model.generate`` on a left-padded batch) vs
vsteer's per-request steering inside vLLM. Same prompts, same vector, same strength,
greedy, fixed length; plus the time to first token of a single steered request.

Both run in this process, alternating rounds (HF, then vLLM, then the other order). The
vLLM engine core is idle while HF runs (we wait for its busy-poll to end first).

    python bench/hf_vs_vllm.py                                  # SmolLM2, batch 64 x 64
    python bench/hf_vs_vllm.py --batch 8 --tokens 8 --reps 1 --enforce-eager   # quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "hf_vs_vllm"
VECTOR = "sentiment"
TARGET_SPEEDUP = 10.0
IDLE_WAIT_S = 2.0  # vLLM's worker busy-polls for 1 s after its last step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL, help="HF folder or known name (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--reps", type=int, default=3, help="measured rounds per side")
    p.add_argument("--ttft-reps", type=int, default=5, help="single-request first-token timings per side")
    p.add_argument("--layer", type=int, default=None, help="steered layer (default: num_layers // 3)")
    p.add_argument("--strength", type=float, default=4.0)
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="result JSON (default: bench/out/hf_vs_vllm.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from vsteer.engine import ActivationInjector, VectorRegistry
    from vsteer.engine.models import load_hf
    from vsteer.extract import ContrastPairDataset, extract_caa

    path = C.resolve_model(args.model)
    _, num_layers = C.model_shape(path)
    layer = args.layer if args.layer is not None else num_layers // 3
    model, tok = load_hf(path, dtype=args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    C.log(f"extracting the sentiment vector at layer {layer} (bundled pairs)")
    vs = extract_caa(model, tok, ContrastPairDataset.from_bundled("sentiment"), layers=[layer],
                     token_position="mean", batch_size=16, progress=False, behaviour=VECTOR)
    reg_dir = Path(tempfile.mkdtemp(prefix="vsteer-bench-")) / "vectors"
    reg_dir.mkdir()
    VectorRegistry(reg_dir).add(VECTOR, vs)
    prompts = C.chat_prompts(tok, args.batch)

    from vllm import LLM, SamplingParams

    from vsteer.serving import set_vectors_dir, steering

    set_vectors_dir(reg_dir)
    C.log(f"starting vLLM ({'eager' if args.enforce_eager else 'compiled'})")
    t0 = time.perf_counter()
    llm = LLM(path, dtype=args.dtype, enforce_eager=args.enforce_eager, gpu_memory_utilization=0.3,
              max_model_len=1024, max_num_seqs=max(64, args.batch), enable_prefix_caching=False, seed=0)
    vllm_start_s = time.perf_counter() - t0
    spec = {"vectors": [{"name": VECTOR, "strength": args.strength, "layers": [layer]}], "positions": "all"}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def hf_batch(batch_prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        width = max(len(p) for p in batch_prompts)
        ids = torch.full((len(batch_prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch_prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        t = time.perf_counter()
        with torch.inference_mode(), ActivationInjector(model, vs[layer], strength=args.strength):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, int((out.shape[1] - width) * len(batch_prompts))

    def vllm_batch(batch_prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, extra_args=steering(spec))
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch_prompts], sp, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    sides = {"hf": hf_batch, "vllm": vllm_batch}
    # warm-up (untimed): one short batch each
    for fn in sides.values():
        fn(prompts[: min(4, args.batch)], 4)
        time.sleep(IDLE_WAIT_S)
    rounds = []
    for r in range(args.reps):
        row = {}
        for side in C.rotated(list(sides), r):
            dt, n = sides[side](prompts, args.tokens)
            assert n == args.batch * args.tokens, (side, n)
            row[side] = n / dt
            time.sleep(IDLE_WAIT_S)
        rounds.append(row)
        C.log(f"round {r + 1}/{args.reps}: HF {row['hf']:.1f} tok/s, vLLM {row['vllm']:.1f} tok/s")
    ttft = {"hf": [], "vllm": []}
    for r in range(args.ttft_reps):
        for side in C.rotated(list(sides), r):
            dt, _ = sides[side]([prompts[0]], 1)
            ttft[side].append(dt)
            if side == "vllm":
                time.sleep(IDLE_WAIT_S)
    C.shutdown_llm(llm)

    hf_tps = C.median([r["hf"] for r in rounds])
    vllm_tps = C.median([r["vllm"] for r in rounds])
    speedup = C.median([r["vllm"] / r["hf"] for r in rounds])
    ttft_hf, ttft_vllm = C.median(ttft["hf"]), C.median(ttft["vllm"])
    print()
    print(C.table(["path", "tok/s (median)", "TTFT single request (s)"],
                  [["HF generate + forward hook", hf_tps, ttft_hf], ["vsteer on vLLM", vllm_tps, ttft_vllm]]))
    met = speedup >= TARGET_SPEEDUP
    print(f"\n  [{'met' if met else 'NOT met'}] vLLM / HF throughput >= {TARGET_SPEEDUP:g}x: {speedup:.1f}x")
    C.write_result(NAME, {
        "params": {"model": args.model, "model_path": path, "batch": args.batch, "new_tokens": args.tokens,
                   "reps": args.reps, "layer": layer, "strength": args.strength, "positions": "all",
                   "vllm_compiled": not args.enforce_eager, "dtype": args.dtype, "device": device,
                   "hf_padding": "left", "hf_torch_threads": torch.get_num_threads(),
                   "vector": "sentiment, CAA mean difference from the bundled pairs"},
        "vllm_start_s": vllm_start_s, "hf_tok_s": hf_tps, "vllm_tok_s": vllm_tps, "speedup": speedup,
        "ttft_s": {"hf": ttft_hf, "vllm": ttft_vllm}, "raw": {"rounds": rounds, "ttft": ttft},
        "checks": [{"target": f"vLLM / HF throughput >= {TARGET_SPEEDUP:g}x", "value": speedup, "met": met}],
        "notes": ["speedup = median over rounds of (vLLM tok/s / HF tok/s of that round)",
                  "TTFT = wall time of a single steered request generating 1 token (prefill + first sample)"],
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
