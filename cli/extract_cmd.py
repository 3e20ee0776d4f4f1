"""``vsteer extract``: contrast pairs + a model -> a vector set directory."""

from __future__ import annotations

import argparse
import sys
import time

from vsteer.engine.layers import COMPONENTS
from vsteer.extract.methods import METHODS
from vsteer.extract.positions import TOKEN_POSITIONS

from .args import parse_layers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF folder, or smollm2-135m-instruct / tiny-llama")
    p.add_argument("--pairs", required=True, help="contrast-pair file (.jsonl/.json/.csv) or a bundled name "
                                                 "(sentiment, formality, refusal, conciseness)")
    p.add_argument("--layers", type=parse_layers, default="auto",
                   help="8,10,12 | 4-8 | all | auto (score all layers on a held-out split, keep --top-k)")
    p.add_argument("--out", required=True, help="output directory (replaced if it holds a vector set)")
    p.add_argument("--method", choices=sorted(METHODS), default="caa")
    p.add_argument("--component", choices=COMPONENTS, default="residual")
    p.add_argument("--token-position", choices=TOKEN_POSITIONS, default="last")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (2x rows)")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompt as a user turn and the completion as the assistant's reply")
    p.add_argument("--top-k", type=int, default=3, help="layers kept by --layers auto")
    p.add_argument("--holdout-fraction", type=float, default=0.25, help="held-out share for --layers auto")
    p.add_argument("--seed", type=int, default=0, help="split seed for --layers auto")
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument("--behaviour", help="behaviour name stored in the set (default: the dataset's name)")
    p.add_argument("--model-id", help="model id stored in the set (default: --model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from vsteer.engine.models import load_hf

    from vsteer.extract.caa import extract_caa
    from vsteer.extract.layer_select import extract_auto
    from vsteer.extract.pairs import PairFileError, load_pairs
    from vsteer.engine.formats import save_vector_set

    try:
        pairs = load_pairs(args.pairs)
    except (PairFileError, FileNotFoundError, KeyError) as e:
        print(f"vsteer extract: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model, tok = load_hf(args.model, dtype=args.dtype)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model.to(device)
    loaded = time.perf_counter()
    kw = dict(component=args.component, token_position=args.token_position, batch_size=args.batch_size,
              chat_template=args.chat_template, method=args.method, progress=not args.no_progress,
              behaviour=args.behaviour, model_id=args.model_id or args.model, max_length=args.max_length)
    try:
        if args.layers == "auto":
            vs = extract_auto(model, tok, pairs, top_k=args.top_k, holdout_fraction=args.holdout_fraction,
                              seed=args.seed, **kw)
        else:
            vs = extract_caa(model, tok, pairs, layers=args.layers, **kw)
    except ValueError as e:  # bad layers, too few pairs to split, ...
        print(f"vsteer extract: error: {e}", file=sys.stderr)
        return 2
    save_vector_set(vs, args.out, overwrite=True)
    done = time.perf_counter()

    print(f"extracted {vs.behaviour!r} ({vs.method}, {args.component}, {args.token_position} token) from "
          f"{len(pairs)} pairs on {args.model} [{device}, {args.dtype}]")
    act = vs.provenance.get("mean_activation_norm", {})
    scores = vs.provenance.get("layer_scores", {})
    print(f"{'layer':>5}  {'norm':>10}  {'act_norm':>10}  {'ratio':>7}" + ("  heldout_acc  margin" if scores else ""))
    for layer, norm in vs.norms().items():
        a = act.get(str(layer))
        ratio = f"{norm / a:7.3f}" if a else f"{'-':>7}"
        line = f"{layer:>5}  {norm:10.4f}  {a if a is not None else float('nan'):10.4f}  {ratio}"
        if scores:
            s = scores[str(layer)]
            line += f"  {s['accuracy']:11.3f}  {s['margin']:6.2f}"
        print(line)
    if scores:
        ranked = vs.provenance["layer_selection"]["ranked"]
        print(f"layers auto: kept {vs.layers} of {len(scores)} candidates (ranked: {ranked})")
    print(f"wrote {args.out} in {done - started:.1f}s (model load {loaded - started:.1f}s, "
          f"extraction {done - loaded:.1f}s)")
    return 0
