"""``vsteer extract``: contrast pairs + a model -> a vector set directory."""

from __future__ import annotations

import argparse
import sys
import time

from vsteer.engine.layers import COMPONENTS
from vsteer.engine.models import DTYPES
from vsteer.extract.methods import METHODS
from vsteer.extract.positions import TOKEN_POSITIONS

from . import extract_vllm
from .args import parse_layers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face Hub id (org/name), a local HF folder, or "
                                                 "smollm2-135m-instruct / tiny-llama")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--pairs", required=True, help="contrast-pair file (.jsonl/.json/.csv), a Parquet file or "
                                                 "datasets folder, or a bundled name (sentiment, formality, "
                                                 "refusal, conciseness)")
    p.add_argument("--positive-column", help="column of the positive texts (datasets input; default positive)")
    p.add_argument("--negative-column", help="column of the negative texts (datasets input; default negative)")
    p.add_argument("--prompt-column", help="column of the shared prompts (datasets input; default prompt, "
                                           "optional)")
    p.add_argument("--split", help="datasets split (default: train, else the first)")
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
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: the checkpoint's); statistics accumulate in float64 either way")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--device-map", choices=["auto"], help="spread a model larger than one device over all "
                                                         "of them (accelerate); --device is then ignored")
    p.add_argument("--center", choices=["none", "neutral", "both"], default="none",
                   help="caa: subtract a neutral corpus's mean activation from the positive mean instead of the "
                        "negative mean (neutral) or with it (both); see docs/evaluation.md")
    p.add_argument("--neutral-file", help="neutral corpus for --center ({text} JSONL or plain lines; default: "
                                          "the bundled one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract_vllm.add_arguments(p)  # --engine vllm (cli/extract_vllm.py)


def _pairs(args: argparse.Namespace):
    """Bundled name, vsteer's own pair files, or (Parquet, folders, named columns) datasets."""
    from vsteer.extract.hf_datasets import load_dataset_pairs, wants_datasets
    from vsteer.extract.pairs import load_pairs

    columns = {"positive_column": args.positive_column, "negative_column": args.negative_column,
               "prompt_column": args.prompt_column}
    if wants_datasets(args.pairs, any(v is not None for v in columns.values())):
        given = {k: v for k, v in columns.items() if v is not None}
        return load_dataset_pairs(args.pairs, split=args.split, **given)
    return load_pairs(args.pairs)


def run(args: argparse.Namespace) -> int:
    import torch

    from vsteer.engine.formats import save_vector_set
    from vsteer.engine.models import ModelNotFoundError, load_hf
    from vsteer.extract.caa import extract_caa
    from vsteer.extract.layer_select import extract_auto

    try:
        pairs = _pairs(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"vsteer extract: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if args.engine == "vllm":  # extraction inside vLLM's engine (cli/extract_vllm.py)
        return extract_vllm.run_vllm(args, pairs)
    started = time.perf_counter()
    try:
        model, tok = load_hf(args.model, dtype=args.dtype, revision=args.revision, device_map=args.device_map)
    except ModelNotFoundError as e:
        print(f"vsteer extract: error: {e}", file=sys.stderr)
        return 2
    if args.device_map:
        device = "device_map=auto"
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model.to(device)
    loaded = time.perf_counter()
    kw = dict(component=args.component, token_position=args.token_position, batch_size=args.batch_size,
              chat_template=args.chat_template, method=args.method, progress=not args.no_progress,
              behaviour=args.behaviour, model_id=args.model_id or args.model, max_length=args.max_length)
    try:
        if args.center != "none":
            from vsteer.extract.centering import load_neutral

            kw.update(center=args.center, neutral_texts=load_neutral(args.neutral_file))
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

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"extracted {vs.behaviour!r} ({vs.method}, {args.component}, {args.token_position} token) from "
          f"{len(pairs)} pairs on {args.model} [{device}, {dtype}]")
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
