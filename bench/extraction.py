"""Extraction throughput: ``extract_caa`` over all layers vs a plain HF forward pass over
the same batches, and vs a one-layer-per-pass loop like the seed's (rotalabs-steer ran
every text once per layer).

Throughput = real (unpadded) tokens of the contrast-pair texts / seconds to get the
vectors of every layer. The cases alternate within each round (rotated order); ratios
are medians of per-round ratios.

* ``extract_caa``: vsteer, one pass per batch, hooks on every layer, stops after the
  deepest requested block (so it skips the final norm and LM head);
* ``forward``: ``model(**batch)`` with logits, nothing captured (the target: >= 0.9x);
* ``forward_hidden_states``: the same with ``output_hidden_states=True`` (what many
  libraries read activations from);
* ``per_layer_loop``: for each layer, every batch again, full forward with one hook.

    python bench/extraction.py                        # SmolLM2, bundled sentiment pairs
    python bench/extraction.py --model tiny-llama --reps 1 --pairs-limit 16   # quick

``--engine vllm`` compares the two extraction engines instead (``vsteer extract --engine``),
on ``--mixed-pairs`` (default 512) pairs of mixed lengths built deterministically from the
bundled sets (``mixed_pairs``: several bundled texts of one side joined, half of the pairs
behind one of a few shared context preambles), all layers:

* ``hf_engine``: ``extract_caa`` (padded batches of ``--batch-size`` pairs);
* ``vllm_engine``: ``extract_caa_vllm`` on a capture engine (prefill requests, the workers
  accumulate the sums);
* ``vllm_prefill``: the same token prompts as plain ``max_tokens=1`` requests on a plain
  engine, one cache salt per round like the ``last`` rule (the target: vllm_engine >= 0.9x;
  and >= 1.5x hf_engine). Writes ``bench/out/extraction_vllm.json``.

    python bench/extraction.py --engine vllm --reps 2
    python bench/extraction.py --engine vllm --model tiny-llama --mixed-pairs 64 --reps 1   # quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "extraction"
TARGET_VS_FORWARD = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=C.DEFAULT_MODEL)
    p.add_argument("--pairs", default="sentiment", help="bundled pair set or file (default: %(default)s)")
    p.add_argument("--pairs-limit", type=int, default=None, help="use the first N pairs")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward (2x texts)")
    p.add_argument("--token-position", default="last", choices=["last", "first", "mean"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-loop", action="store_true", help="skip the slow per-layer loop")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="result JSON (default: bench/out/extraction.json)")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: the HF extraction cases above; vllm: HF engine vs vLLM engine vs plain vLLM prefill")
    p.add_argument("--mixed-pairs", type=int, default=512, help="--engine vllm: generated pairs (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="--engine vllm: the engines' token budget")
    p.add_argument("--max-join", type=int, default=8,
                   help="--engine vllm: at most this many bundled texts joined into one side (default: %(default)s)")
    p.add_argument("--warmup-pairs", type=int, default=64,
                   help="--engine vllm: pairs of the untimed warm-up pass on each engine (default: %(default)s)")
    return p.parse_args(argv)


def report_lines_vllm(result: dict) -> list[str]:
    """The RESULTS.md section of ``--engine vllm`` (bench/run_all.py calls this)."""
    p = result["params"]
    lines = ["## Extraction inside vLLM (`bench/extraction.py --engine vllm`)", "",
             f"{p['model']}: {p['n_pairs']} pairs generated deterministically from the bundled ones ({p['texts']} "
             f"texts, {p['tokens']} tokens; text length min / median / max {p['length_min']} / "
             f"{p['length_median']} / {p['length_max']} tokens, bundled median {p['bundled_length_median']}), every "
             f"layer, token position `{p['token_position']}`, {p['dtype']}, {p['reps']} rounds. HF engine: "
             f"`extract_caa`, batch {p['batch_size']} pairs. vLLM engine: `vsteer extract --engine vllm`'s "
             f"`extract_caa_vllm` (torch.compile, chunked prefill at {p['max_num_batched_tokens']} tokens per step, "
             "prefix caching). Plain vLLM prefill: the same prompts, `max_tokens=1`, on an engine without the "
             "capture hooks.", "",
             "| case | tok/s (median) | vLLM engine speed-up over it |", "|---|---|---|"]
    rounds = result["raw_rounds"]
    for name, tps in result["tok_s"].items():
        ratio = C.median([r["vllm_engine"] / r[name] for r in rounds])
        lines.append(f"| {name} | {tps:.1f} | {ratio:.2f}x |")
    lines.append("")
    for chk in result.get("checks", []):
        lines.append(f"* {chk['target']}: {chk['value']:.2f} ({'met' if chk['met'] else '**not met**'})")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine == "vllm":
        return main_vllm(args)
    import torch

    from vsteer.engine.layers import num_decoder_layers
    from vsteer.engine.models import load_hf
    from vsteer.extract import extract_caa, load_pairs
    from vsteer.extract.hooks import ActivationHook
    from vsteer.extract.methods import LayerStats
    from vsteer.extract.runner import encode, ensure_pad_token, position_ids_from_mask

    path = C.resolve_model(args.model)
    model, tok = load_hf(path, dtype=args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    ensure_pad_token(tok)
    pairs = load_pairs(args.pairs)
    if args.pairs_limit:
        pairs = pairs[: args.pairs_limit]
    num_layers = num_decoder_layers(model)
    layers = list(range(num_layers))

    batches = []
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        texts = [p.texts(tok)[0] for p in chunk] + [p.texts(tok)[1] for p in chunk]
        inputs = encode(tok, texts, chat_template=False, device=torch.device(device))
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
        batches.append((inputs, len(chunk)))
    tokens = int(sum(int(b["attention_mask"].sum()) for b, _ in batches))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run_extract():
        vs = extract_caa(model, tok, pairs, layers="all", batch_size=args.batch_size,
                         token_position=args.token_position, progress=False)
        assert len(vs) == num_layers

    def run_forward(hidden_states: bool = False):
        with torch.inference_mode():
            for inputs, _ in batches:
                model(**inputs, use_cache=False, output_hidden_states=hidden_states)

    def run_loop():
        # the seed's shape: one layer at a time, every batch again, full forward, one hook
        for layer in layers:
            stats = LayerStats()
            got = {}
            with ActivationHook(model, [layer], "residual", args.token_position,
                                reduce=lambda _l, act: got.__setitem__("a", act)), torch.inference_mode():
                for inputs, n in batches:
                    model(**inputs, use_cache=False)
                    stats.add(got["a"][:n], got["a"][n:])
            stats.mean_difference  # noqa: B018  (the vector)

    cases = {"extract_caa": run_extract, "forward": run_forward,
             "forward_hidden_states": lambda: run_forward(True)}
    if not args.no_loop:
        cases["per_layer_loop"] = run_loop
    C.log(f"{len(pairs)} pairs, {2 * len(pairs)} texts, {tokens} tokens, {len(batches)} batches, "
          f"{num_layers} layers; warm-up")
    run_forward()
    run_extract()
    rounds = []
    for r in range(args.reps):
        row = {}
        for name in C.rotated(list(cases), r):
            sync()
            t = time.perf_counter()
            cases[name]()
            sync()
            row[name] = tokens / (time.perf_counter() - t)
        rounds.append(row)
        C.log(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in row.items()))

    tps = {name: C.median([r[name] for r in rounds]) for name in cases}
    ratio = {name: C.median([r["extract_caa"] / r[name] for r in rounds]) for name in cases}
    rows = [[name, tps[name], C.median([r[name] / r["forward"] for r in rounds]),
             ratio[name] if name != "extract_caa" else 1.0] for name in cases]
    print()
    print(C.table(["case", "tok/s", "vs forward", "extract_caa speedup over it"], rows))
    vs_forward = C.median([r["extract_caa"] / r["forward"] for r in rounds])
    checks = [{"target": f"extract_caa (all layers) / plain forward >= {TARGET_VS_FORWARD}", "value": vs_forward,
               "met": vs_forward >= TARGET_VS_FORWARD}]
    if "per_layer_loop" in cases:
        checks.append({"target": "extract_caa / per-layer loop (informational)", "value": ratio["per_layer_loop"],
                       "met": ratio["per_layer_loop"] > 1.0})
    print()
    for chk in checks:
        print(f"  [{'met' if chk['met'] else 'NOT met'}] {chk['target']}: {chk['value']:.2f}")
    C.write_result(NAME, {
        "params": {"model": args.model, "model_path": path, "pairs": args.pairs, "n_pairs": len(pairs),
                   "texts": 2 * len(pairs), "tokens": tokens, "batch_size": args.batch_size,
                   "token_position": args.token_position, "layers": num_layers, "reps": args.reps,
                   "dtype": args.dtype, "device": device, "torch_threads": torch.get_num_threads()},
        "tok_s": tps, "extract_vs": ratio, "extract_vs_forward": vs_forward, "checks": checks,
        "raw_rounds": rounds,
        "notes": ["tokens = real tokens of all texts once; per_layer_loop needs num_layers passes for the same "
                  "output", "ratios: median over rounds of per-round ratios"],
    }, args.out)
    return 0


PREAMBLES = 4


def mixed_pairs(n: int, seed: int = 0, max_join: int = 8):
    """``n`` contrast pairs of mixed lengths, the same on every run: each joins 1-8 bundled
    texts of one side (sentiment, formality, refusal, conciseness; the pair's own set, so the
    behaviour stays the same), keeps the bundled prompt, and half of them sit behind one of
    ``PREAMBLES`` shared context paragraphs (prefix-cache material, like a system prompt)."""
    import json
    import random
    from importlib import resources

    from vsteer.extract import ContrastPair, ContrastPairDataset, load_pairs

    sets = [list(load_pairs(name)) for name in ("sentiment", "formality", "refusal", "conciseness")]
    neutral = [json.loads(line)["text"] for line in
               (resources.files("vsteer.extract") / "data" / "neutral.jsonl").read_text().splitlines() if line.strip()]
    preambles = [" ".join(neutral[i * 6:(i + 1) * 6]) + "\n\n" for i in range(PREAMBLES)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pool = sets[i % len(sets)]
        base = pool[(i // len(sets)) % len(pool)]
        k = rng.choice([j for j in (1, 1, 2, 3, 5, 8) if j <= max_join])
        extra = [pool[rng.randrange(len(pool))] for _ in range(k - 1)]
        pos = " ".join([base.positive] + [p.positive for p in extra])
        neg = " ".join([base.negative] + [p.negative for p in extra])
        prompt = (preambles[rng.randrange(PREAMBLES)] if i % 2 else "") + base.prompt
        out.append(ContrastPair(pos, neg, prompt=prompt))
    return ContrastPairDataset(out, name="mixed")


def main_vllm(args: argparse.Namespace) -> int:
    import uuid

    import torch
    import vllm

    from vsteer.engine.models import load_hf
    from vsteer.extract import ContrastPairDataset, extract_caa
    from vsteer.extract.vllm_engine import capture_llm, extract_caa_vllm, tokenize_texts

    path = C.resolve_model(args.model)
    model, tok = load_hf(path, dtype=args.dtype)
    pairs = mixed_pairs(args.mixed_pairs, max_join=args.max_join)
    pos, neg = tokenize_texts(tok, pairs)
    lengths = [len(x) for x in pos + neg]
    tokens = sum(lengths)
    bundled = [len(x) for side in tokenize_texts(tok, load_bundled()) for x in side]
    engine_kw = dict(dtype=args.dtype, gpu_memory_utilization=0.3, max_model_len=2048, seed=0,
                     max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=True)
    C.log(f"{len(pairs)} mixed pairs, {len(lengths)} texts, {tokens} tokens (text length min/median/max "
          f"{min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}; bundled median "
          f"{sorted(bundled)[len(bundled) // 2]}); starting the engines")
    capture = capture_llm(path, **engine_kw)
    plain = vllm.LLM(path, **engine_kw)
    prompts = [{"prompt_token_ids": ids} for pair in zip(pos, neg) for ids in pair]

    def run_hf():
        extract_caa(model, tok, pairs, layers="all", batch_size=args.batch_size,
                    token_position=args.token_position, progress=False)

    def run_vllm_engine():
        extract_caa_vllm(capture, pairs, layers="all", token_position=args.token_position, progress=False,
                         tokenizer=tok)

    def run_prefill():
        salt = uuid.uuid4().hex  # a fresh namespace per round: no hits on the previous round's blocks
        plain.generate([{**p, "cache_salt": salt} for p in prompts],
                       vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)

    cases = {"hf_engine": run_hf, "vllm_engine": run_vllm_engine, "vllm_prefill": run_prefill}
    C.log(f"warm-up on {args.warmup_pairs} pairs (compiles the shapes; untimed)")
    warm = ContrastPairDataset(list(pairs)[: args.warmup_pairs], name="warm-up")
    extract_caa_vllm(capture, warm, layers="all", token_position=args.token_position, progress=False, tokenizer=tok)
    plain.generate(prompts[: 2 * args.warmup_pairs], vllm.SamplingParams(max_tokens=1, temperature=0.0,
                                                                          detokenize=False), use_tqdm=False)
    rounds = []
    for r in range(args.reps):
        row = {}
        for name in C.rotated(list(cases), r):
            t = time.perf_counter()
            cases[name]()
            row[name] = tokens / (time.perf_counter() - t)
        rounds.append(row)
        C.log(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in row.items()))
    tps = {name: C.median([r[name] for r in rounds]) for name in cases}
    vs_prefill = C.median([r["vllm_engine"] / r["vllm_prefill"] for r in rounds])
    vs_hf = C.median([r["vllm_engine"] / r["hf_engine"] for r in rounds])
    print()
    print(C.table(["case", "tok/s", "vllm_engine speed-up over it"],
                  [[name, tps[name], C.median([r["vllm_engine"] / r[name] for r in rounds])] for name in cases]))
    checks = [{"target": "vllm_engine / plain vLLM prefill >= 0.9", "value": vs_prefill, "met": vs_prefill >= 0.9},
              {"target": "vllm_engine / hf_engine >= 1.5", "value": vs_hf, "met": vs_hf >= 1.5}]
    print()
    for chk in checks:
        print(f"  [{'met' if chk['met'] else 'NOT met'}] {chk['target']}: {chk['value']:.2f}")
    C.write_result("extraction_vllm", {
        "params": {"model": args.model, "model_path": path, "pairs": "mixed_pairs", "n_pairs": len(pairs),
                   "texts": len(lengths), "tokens": tokens, "length_min": min(lengths), "length_max": max(lengths),
                   "length_median": sorted(lengths)[len(lengths) // 2],
                   "bundled_length_median": sorted(bundled)[len(bundled) // 2], "batch_size": args.batch_size,
                   "token_position": args.token_position, "layers": "all", "reps": args.reps, "dtype": args.dtype,
                   "max_num_batched_tokens": args.max_num_batched_tokens, "max_join": args.max_join,
                   "warmup_pairs": args.warmup_pairs, "torch_threads": torch.get_num_threads()},
        "tok_s": tps, "vllm_engine_vs_prefill": vs_prefill, "vllm_engine_vs_hf": vs_hf, "checks": checks,
        "raw_rounds": rounds,
        "notes": ["tokens = real tokens of all texts once; the HF engine pads each batch",
                  "vllm_prefill runs on a second engine without capture hooks; both engines cache prefixes within "
                  "a round only (fresh salts per round)", "ratios: median over rounds of per-round ratios"],
    }, args.out)
    return 0


def load_bundled():
    from vsteer.extract import ContrastPairDataset, load_pairs

    return ContrastPairDataset([p for name in ("sentiment", "formality", "refusal", "conciseness")
                                for p in load_pairs(name)])


if __name__ == "__main__":
    sys.exit(main())
