"""``vsteer extract``: contrast pairs + a model -> a vector set directory (or a new version
of a registry entry), with the token position chosen from the pairs and a check that the
written vector steers."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from . import extract_vllm
from .args import parse_layers
from .choices import COMPONENTS, DTYPES, METHODS, TOKEN_POSITIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face Hub id (org/name), a local HF folder, or "
                                                 "smollm2-135m-instruct / tiny-llama")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modelling code a Hub repository ships (only for repositories you trust)")
    p.add_argument("--pairs", required=True, help="contrast-pair file (.jsonl/.json/.csv), a Parquet file or "
                                                 "datasets folder, or a bundled name (sentiment, formality, "
                                                 "refusal, conciseness, ocean, cooking, space)")
    p.add_argument("--positive-column", help="column of the positive texts (datasets input; default positive)")
    p.add_argument("--negative-column", help="column of the negative texts (datasets input; default negative)")
    p.add_argument("--prompt-column", help="column of the shared prompts (datasets input; default prompt, "
                                           "optional)")
    p.add_argument("--split", help="datasets split (default: train, else the first)")
    p.add_argument("--layers", type=parse_layers, default="auto",
                   help="8,10,12 | 4-8 | all | auto (score all layers on a held-out split, keep --top-k)")
    p.add_argument("--out", required=True, help="output directory (replaced if it holds a vector set); inside a "
                                               "vector registry: a new version of that name, swapped in atomically")
    p.add_argument("--method", choices=METHODS, default="caa",
                   help="caa: mean difference; pca: first principal direction of the differences; bipo: a vector "
                        "per layer trained by gradient (docs/extraction.md)")
    p.add_argument("--component", choices=COMPONENTS, default="residual",
                   help="what is read: the block output (residual), or its attention / MLP output")
    p.add_argument("--token-position", choices=TOKEN_POSITIONS, default="auto",
                   help="tokens each text is read at; auto: the completion's tokens when every pair has a prompt, "
                        "else the mean over the text (printed)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (2x rows)")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompt as a user turn and the completion as the assistant's reply")
    p.add_argument("--top-k", type=int, default=3, help="layers kept by --layers auto")
    p.add_argument("--holdout-fraction", type=float, default=0.25,
                   help="share of the pairs held out by --layers auto, the check and bipo's validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (and of bipo's batches)")
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument("--behaviour", help="behaviour name stored in the set (default: the dataset's name)")
    p.add_argument("--model-id", help="model id stored in the set (default: --model)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: the checkpoint's, on either engine); statistics accumulate in "
                        "float64 either way")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--device-map", choices=["auto"], help="spread a model larger than one device over all "
                                                         "of them (accelerate); --device is then ignored")
    p.add_argument("--center", choices=["none", "neutral", "both"], default="none",
                   help="caa: subtract a neutral corpus's mean activation from the positive mean instead of the "
                        "negative mean (neutral) or with it (both); see docs/evaluation.md")
    p.add_argument("--neutral-file", help="neutral corpus for --center ({text} JSONL or plain lines; default: "
                                          "the bundled one)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check on held-out pairs (does the vector separate them, and does adding it make "
                        "the positive completions likelier than random directions do?)")
    t = p.add_argument_group("--method bipo (trained directions)")
    t.add_argument("--steps", type=int, default=30, help="optimiser steps")
    t.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (relative units)")
    t.add_argument("--beta", type=float, default=0.5, help="preference temperature")
    t.add_argument("--l2", type=float, default=1.0, help="weight of the squared relative norm (--train-strength free)")
    t.add_argument("--init", choices=["zero", "caa"], default="caa",
                   help="starting directions (zero needs --train-strength free)")
    t.add_argument("--train-strength", type=_strength, default=0.2, metavar="S|free",
                   help="train at the size it is served: total relative strength S over the layers (S/k per layer), "
                        "directions only; free: the size is trained too, held back by --l2")
    t.add_argument("--train-context", choices=["chat", "plain"], default="chat",
                   help="chat: each pair is the assistant's reply in a chat turn (prompt-less pairs answer bundled "
                        "everyday requests); plain: the pairs as given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract_vllm.add_arguments(p)  # --engine vllm (cli/extract_vllm.py)


def _strength(text: str) -> float | None:
    """``--train-strength``: a number, or ``free`` (its range is ``BiPOConfig``'s rule)."""
    if text == "free":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a relative strength or 'free', got {text!r}") from None


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


def _error(message: str) -> int:
    print(f"vsteer extract: error: {message}", file=sys.stderr)
    return 2


def resolve_position(args: argparse.Namespace, pairs: Any) -> str:
    """``--token-position``, with ``auto`` replaced by the rule the pairs call for (printed)."""
    from vsteer.extract.positions import choose_token_position

    if args.token_position != "auto":
        return args.token_position
    position, why = choose_token_position(pairs, args.chat_template)
    print(f"token position: {position} (auto: {why}; --token-position overrides)")
    return position


def bipo_config(args: argparse.Namespace) -> Any:
    """``--method bipo``'s flags as a ``BiPOConfig`` (ValueError on a combination it refuses)."""
    from vsteer.extract.trained import BiPOConfig

    return BiPOConfig(steps=args.steps, lr=args.lr, beta=args.beta, l2=args.l2, init=args.init,
                      strength=args.train_strength, context=args.train_context, batch_size=args.batch_size,
                      holdout_fraction=args.holdout_fraction, seed=args.seed)


def _extract(args: argparse.Namespace, model: Any, tok: Any, pairs: Any, kw: dict[str, Any]):
    from vsteer.extract.caa import extract_caa
    from vsteer.extract.layer_select import extract_auto

    if args.method == "bipo":
        from vsteer.extract.trained import train_bipo

        layers = args.layers
        if layers == "auto":  # train where held-out pairs separate best
            layers = extract_auto(model, tok, pairs, top_k=args.top_k, holdout_fraction=args.holdout_fraction,
                                  seed=args.seed, **{**kw, "progress": False}).layers
        return train_bipo(model, tok, pairs, layers, bipo_config(args), chat_template=args.chat_template, max_length=args.max_length,
                          progress=kw["progress"], behaviour=args.behaviour, model_id=kw["model_id"],
                          batch_size=args.batch_size, token_position=kw["token_position"])
    if args.layers == "auto":
        return extract_auto(model, tok, pairs, top_k=args.top_k, holdout_fraction=args.holdout_fraction,
                            seed=args.seed, **kw)
    return extract_caa(model, tok, pairs, layers=args.layers, **kw)


def check(args: argparse.Namespace, model: Any, tok: Any, pairs: Any, vs: Any, kw: dict[str, Any]) -> dict | None:
    """The held-out check (``extract.quality``): a bipo set is checked on the pairs its
    training held out; a caa/pca set is re-extracted without them first."""
    from vsteer.extract.caa import extract_caa
    from vsteer.extract.quality import check_vector

    if len(pairs) < 8:
        print("check: skipped (fewer than 8 pairs to hold some out)")
        return None
    train, held = pairs.split(args.holdout_fraction, args.seed)
    probe = vs if vs.method == "bipo" else extract_caa(model, tok, train, layers=vs.layers, **{**kw, "progress": False})
    q = check_vector(model, tok, probe, held, batch_size=args.batch_size, chat_template=args.chat_template,
                     max_length=args.max_length, seed=args.seed)
    print(f"check on {q.n_heldout} held-out pairs: projection accuracy {q.accuracy:.2f} (margin {q.margin:.2f}); "
          f"adding it over layers {_band(q.layers)} at {q.relative:g} relative: {q.gain:+.2f} nats/pair "
          f"(z {q.z:.1f} against {len(q.random_gains)} random directions)")
    for problem in q.problems:
        print(f"WARNING: weak vector: {problem}.", file=sys.stderr)
    if q.problems:
        hint = ("more, cleaner pairs" if args.token_position != "auto" and args.token_position != "last"
                else "--token-position mean (whole sentences) or completion (prompted pairs), or more, cleaner pairs")
        print(f"WARNING: it was written anyway; steering with it will likely do little. Try {hint}.", file=sys.stderr)
    return q.to_dict()


def _band(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


def run(args: argparse.Namespace) -> int:
    import torch

    from vsteer.engine.models import ModelNotFoundError, load_hf
    from vsteer.extract.output import describe, write_vector_set

    try:
        pairs = _pairs(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        return _error(e.args[0] if isinstance(e, KeyError) else str(e))
    if args.center != "none" and args.method != "caa":
        return _error(f"--center applies to --method caa, not {args.method}")
    if args.method == "bipo":
        try:  # before the model loads: a refused combination of flags costs nothing
            bipo_config(args)
        except ValueError as e:
            return _error(str(e))
    if args.engine == "vllm":  # extraction inside vLLM's engine (cli/extract_vllm.py)
        return extract_vllm.run_vllm(args, pairs)
    position = resolve_position(args, pairs)
    started = time.perf_counter()
    try:
        model, tok = load_hf(args.model, dtype=args.dtype, revision=args.revision, device_map=args.device_map,
                             trust_remote_code=args.trust_remote_code)
    except ModelNotFoundError as e:
        return _error(str(e))
    if args.device_map:
        device = "device_map=auto"
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model.to(device)
    loaded = time.perf_counter()
    kw = dict(component=args.component, token_position=position, batch_size=args.batch_size,
              chat_template=args.chat_template, method=args.method, progress=not args.no_progress,
              behaviour=args.behaviour, model_id=args.model_id or args.model, max_length=args.max_length)
    if args.method == "bipo":
        kw["method"] = "caa"
    try:
        if args.center != "none":
            from vsteer.extract.centering import load_neutral

            kw.update(center=args.center, neutral_texts=load_neutral(args.neutral_file))
        vs = _extract(args, model, tok, pairs, kw)
        quality = None if args.no_check else check(args, model, tok, pairs, vs, kw)
    except ValueError as e:  # bad layers, too few pairs to split, ...
        return _error(str(e))
    if quality is not None:
        vs.provenance["check"] = quality
    dest = write_vector_set(vs, args.out)
    done = time.perf_counter()
    _summary(args, vs, len(pairs), device, next(model.parameters()).dtype)
    print(f"wrote {describe(dest)} in {done - started:.1f}s (model load {loaded - started:.1f}s, "
          f"extraction {done - loaded:.1f}s)")
    return 0


def _summary(args: argparse.Namespace, vs: Any, n_pairs: int, device: str, dtype: Any) -> None:
    dtype = str(dtype).replace("torch.", "")
    position = vs.params.get("token_position", vs.params.get("init_token_position"))
    print(f"extracted {vs.behaviour!r} ({vs.method}, {args.component}, {position} token) from "
          f"{n_pairs} pairs on {args.model} [{device}, {dtype}]")
    act = vs.provenance.get("mean_activation_norm", {})
    scores = vs.provenance.get("layer_scores", {})
    print(f"{'layer':>5}  {'norm':>10}  {'act_norm':>10}  {'ratio':>7}" + ("  heldout_acc  margin" if scores else ""))
    for layer, norm in vs.norms().items():
        a = act.get(str(layer))
        ratio = f"{norm / a:7.3f}" if a else f"{'-':>7}"
        line = f"{layer:>5}  {norm:10.4f}  {a if a is not None else float('nan'):10.4f}  {ratio}"
        if scores and str(layer) in scores:
            s = scores[str(layer)]
            line += f"  {s['accuracy']:11.3f}  {s['margin']:6.2f}"
        print(line)
    if scores and "layer_selection" in vs.provenance:
        ranked = vs.provenance["layer_selection"]["ranked"]
        print(f"layers auto: kept {vs.layers} of {len(scores)} candidates (ranked: {ranked})")
    training = vs.provenance.get("training")
    if training:
        b, a = training["before"]["heldout"], training["after"]["heldout"]
        size = vs.params.get("bipo_strength")
        cos = list((training.get("cosine_to_caa") or {}).values())
        print(f"bipo ({training.get('context', 'plain')} context, "
              f"{f'trained at {size:g} relative' if size is not None else 'free size'}): objective "
              f"{training['before']['train']['objective']:.3f} -> {training['after']['train']['objective']:.3f} (train); "
              f"held-out preference accuracy {b['accuracy']:.2f} -> {a['accuracy']:.2f}, mean gain "
              f"{b['mean_delta']:+.2f} -> {a['mean_delta']:+.2f} nats/pair"
              + (f"; cosine to the mean difference {min(cos):.2f}-{max(cos):.2f}" if cos else ""))
