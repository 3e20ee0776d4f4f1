"""``vsteer eval``: sweep a vector set over recipes -> report.json, plots, a table, with
the prompting baseline beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import floats as _floats
from .args import parse_layers, words
from .choices import BEHAVIOURS, DTYPES, NORMS, OPS, POSITIONS, UNITS


def _layers(text: str) -> list[int]:
    layers = parse_layers(text)
    if isinstance(layers, str):
        raise argparse.ArgumentTypeError("--layers takes explicit layers here (e.g. 8,10,12 or 8-12)")
    return layers


def _bands(text: str) -> list[tuple[int, ...]]:
    from vsteer.eval.recipes import parse_bands

    try:
        return parse_bands(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"use a comma list of {', '.join(allowed)}")
        return items
    return parse


def add_common(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``vsteer eval`` and ``vsteer tune`` (one name per option)."""
    p.add_argument("--model", required=True, help="local HF folder, Hub id, or smollm2-135m-instruct / tiny-llama")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modelling code a Hub repository ships (only for repositories you trust)")
    p.add_argument("--vectors", required=True, help="vector set directory (what `vsteer extract --out` wrote)")
    s = p.add_argument_group("what is scored (one of --behaviour, --keywords/--regex, --scorer, --probes)")
    s.add_argument("--behaviour", "--behavior", dest="behaviour",
                   help=f"a bundled scorer ({', '.join(BEHAVIOURS)}), or the name of your own (default: the "
                        "set's behaviour)")
    s.add_argument("--keywords", type=words, help="your own concept: comma list of words or phrases; the score is "
                                                   "the share of answers that use one")
    s.add_argument("--regex", action="append", dest="regexes", metavar="PATTERN",
                   help="your own concept: a regular expression that counts as a mention (repeatable)")
    s.add_argument("--concept", help="the phrase the prompting baseline's templates name (default: the first "
                                     "keyword), e.g. 'dinosaurs'")
    s.add_argument("--scorer", metavar="FILE", help="a scorer file: JSON with keywords/regexes or probes, concept, "
                                                    "system_prompt (docs/evaluation.md)")
    s.add_argument("--probes", help="log-probability probe file ({prompt, positive[], negative[]} JSONL)")
    p.add_argument("--prompts-file", help="generation prompts ({prompt} JSONL or a bundled file name; default: "
                                          "the behaviour's)")
    p.add_argument("--system-prompt", action="append", metavar="TEXT",
                   help="the prompting baseline's system message (repeatable: vsteer tune chooses among them; "
                        "default: the behaviour's, or templates filled with the concept)")
    p.add_argument("--no-prompting", action="store_true", help="leave out the prompting baseline")
    p.add_argument("--bands", type=_bands, help="multi-layer recipes, strength spread over each band: 6-9,10-13 "
                                                "or 6+8+10")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers (the reference); vllm: vllm.LLM with per-request steering (faster)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per answer")
    p.add_argument("--prompts", type=int, default=None, help="use the first N probes / generation prompts")
    p.add_argument("--random-baselines", type=int, default=5,
                   help="same-norm random directions per recipe (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (and vLLM)")
    p.add_argument("--batch-size", type=int, default=16, help="HF backend batch size")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the checkpoint's dtype (either backend)")
    p.add_argument("--compile", action="store_true", help="vLLM backend: torch.compile (default: eager)")
    p.add_argument("--no-plots", action="store_true", help="write report.json only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def scorer_kwargs(args: argparse.Namespace) -> dict:
    """What ``run_sweep`` / ``tune`` take for the scorer and the prompting baseline."""
    return dict(behaviour=args.behaviour, probes=args.probes, keywords=args.keywords, regexes=args.regexes,
                scorer=args.scorer, concept=args.concept, system_prompt=args.system_prompt,
                prompts_file=args.prompts_file, trust_remote_code=args.trust_remote_code)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--strengths", type=_floats, default=[-8.0, -4.0, 0.0, 4.0, 8.0],
                   help="comma list; 0 is always added; over a band: the total")
    p.add_argument("--unit", choices=UNITS, default="raw",
                   help="raw multipliers, or relative: fractions of the layer's mean residual-stream norm")
    p.add_argument("--strength-unit", dest="unit", choices=UNITS, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name of --unit
    p.add_argument("--layers", type=_layers, help="layers to sweep one at a time (default: all of the set's "
                                                  "unless --bands is given)")
    p.add_argument("--ops", type=_choices(OPS), default=["add"], help="operators: add,ablate,clamp")
    p.add_argument("--norms", type=_choices(NORMS), default=["keep"], help="keep,preserve (add only)")
    p.add_argument("--positions", type=_choices(POSITIONS), default=["all"],
                   help=f"token positions, one or a comma list of {', '.join(POSITIONS)}")
    p.add_argument("--out", default="vsteer-eval", help="output directory")
    p.add_argument("--generation-prompts", type=int, default=None,
                   help="use the first N generation prompts (default: --prompts)")
    p.add_argument("--target-delta", type=float, default=None,
                   help="behaviour change that counts as steered (default: per behaviour)")
    p.add_argument("--max-ppl-ratio", type=float, default=1.5,
                   help="coherence bound: perplexity <= this x unsteered")
    p.add_argument("--random-strengths", type=_floats, default=None,
                   help="strengths the random directions run at (default: every non-zero --strengths value)")


def run(args: argparse.Namespace) -> int:
    from vsteer.eval.sweep import format_report, run_sweep

    if not Path(args.vectors).is_dir():
        print(f"vsteer eval: error: {args.vectors} is not a vector set directory", file=sys.stderr)
        return 2
    try:
        report = run_sweep(
            args.model, args.vectors, strengths=args.strengths, layers=args.layers, bands=args.bands, ops=args.ops,
            norms=args.norms, backend=args.backend, out=args.out, max_new_tokens=args.max_new_tokens,
            n_prompts=args.prompts, n_generation_prompts=args.generation_prompts, positions=args.positions,
            strength_unit=args.unit, target_delta=args.target_delta, max_ppl_ratio=args.max_ppl_ratio,
            random_baselines=args.random_baselines, random_strengths=args.random_strengths,
            prompting=not args.no_prompting, seed=args.seed, progress=not args.no_progress,
            batch_size=args.batch_size, dtype=args.dtype, enforce_eager=not args.compile, plots=not args.no_plots,
            **scorer_kwargs(args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"vsteer eval: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(format_report(report))
    files = ["report.json"] + report["plots"]
    print(f"wrote {', '.join(str(Path(args.out) / f) for f in files)} in {report['timing']['total_s']:.1f}s")
    return 0
