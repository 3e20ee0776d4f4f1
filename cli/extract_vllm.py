"""``vsteer extract --engine vllm``: the extraction runs inside a vLLM engine
(``vsteer.extract.vllm_engine``); same output directory and summary as the HF engine."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: padded batches through transformers; vllm: every text as a vLLM prefill request "
                        "(continuous batching, prefix caching, tensor parallelism; method caa, residual stream)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: tensor-parallel ranks")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="--engine vllm: the engine's context length (default: the model's)")


def _error(message: str) -> int:
    print(f"vsteer extract: error: {message}", file=sys.stderr)
    return 2


def run_vllm(args: argparse.Namespace, pairs: Any) -> int:
    from vsteer.engine.models import ModelNotFoundError
    from vsteer.extract.output import describe, write_vector_set
    from vsteer.extract.positions import TOKEN_POSITIONS, choose_token_position
    from vsteer.extract.vllm_engine import capture_llm, check_supported, extract_caa_vllm

    if args.layers == "auto":
        return _error("--layers auto scores every layer on held-out pairs with the HF engine; give the layers "
                      "(e.g. --layers 8,10,12 or all) with --engine vllm")
    if args.method == "bipo":
        return _error("--method bipo trains by gradient on the HF model; use --engine hf")
    position = args.token_position
    if position == "auto":
        position, why = choose_token_position(pairs, args.chat_template)
        print(f"token position: {position} (auto: {why}; --token-position overrides)")
    if position not in TOKEN_POSITIONS:
        return _error(f"token position {position!r} (the mean over the completion's tokens) needs --engine hf; with "
                      "--engine vllm pass --token-position last (the completion's last token) or mean")
    try:  # before an engine starts
        check_supported(args.method, args.component, position)
    except ValueError as e:
        return _error(str(e))
    started = time.perf_counter()
    try:
        llm = capture_llm(args.model, dtype=args.dtype, revision=args.revision,
                          tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
                          seed=args.seed, trust_remote_code=args.trust_remote_code)
    except ModelNotFoundError as e:
        return _error(str(e))
    loaded = time.perf_counter()
    try:
        vs = extract_caa_vllm(llm, pairs, layers=args.layers, token_position=position,
                              chat_template=args.chat_template, method=args.method, component=args.component,
                              progress=not args.no_progress, behaviour=args.behaviour,
                              model_id=args.model_id or args.model, max_length=args.max_length)
    except ValueError as e:
        return _error(str(e))
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - the process ends anyway
            pass
    dest = write_vector_set(vs, args.out)
    done = time.perf_counter()
    info = vs.provenance["vllm"]
    print(f"extracted {vs.behaviour!r} ({vs.method}, residual, {position} token) from {len(pairs)} pairs "
          f"on {args.model} [vllm, TP={info['tensor_parallel_size']}, {vs.params['model_dtype']}]: "
          f"{info['tokens']} tokens, {info['cached_tokens']} from the prefix cache")
    act = vs.provenance["mean_activation_norm"]
    print(f"{'layer':>5}  {'norm':>10}  {'act_norm':>10}  {'ratio':>7}")
    for layer, norm in vs.norms().items():
        a = act[str(layer)]
        print(f"{layer:>5}  {norm:10.4f}  {a:10.4f}  {norm / a if a else float('nan'):7.3f}")
    print("check: not run with --engine vllm (it steers the HF model; run `vsteer extract` with --engine hf to "
          "check a vector)")
    print(f"wrote {describe(dest)} in {done - started:.1f}s (engine start {loaded - started:.1f}s, "
          f"extraction {done - loaded:.1f}s)")
    return 0
