"""``vsteer tune``: search layer band, strength and positions under a perplexity budget on
one half of the held-out prompts, score the choice on the other half, and record it as
the vector set's default recipe (what a request naming only the vector gets)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import floats as _floats
from .choices import CHOICE_RULES, NORMS, POSITIONS, UNITS
from .eval_cmd import _choices, add_common, scorer_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--strengths", type=_floats, default=[0.05, 0.1, 0.2, 0.3, 0.45, 0.6],
                   help="strengths to search, total over a band")
    p.add_argument("--unit", choices=UNITS, default="relative",
                   help="strength unit: relative = fractions of the layer's mean residual norm, or raw")
    p.add_argument("--positions", type=_choices(POSITIONS), default=["all", "generated"],
                   help="positions to search")
    p.add_argument("--norms", type=_choices(NORMS), default=["keep"], help="norm modes to search")
    p.add_argument("--max-ppl-ratio", type=float, default=1.2,
                   help="perplexity budget: at most this x unsteered on the select prompts")
    p.add_argument("--choose", choices=CHOICE_RULES, default="lcb",
                   help="how a candidate is chosen on the select prompts: lcb = mean gain minus its standard error "
                        "(robust to selection noise), folds = median over prompt folds, smooth = lcb pooled with the "
                        "neighbouring strengths, max = highest mean")
    p.add_argument("--direction", choices=["+", "-"], default="+",
                   help="raise (+) or lower (-) the behaviour score")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the select/score split of the prompts")
    p.add_argument("--out", default="vsteer-tune", help="report directory")
    p.add_argument("--dry-run", action="store_true", help="report the choice but do not record it in the set")
    p.add_argument("--no-combined", action="store_true",
                   help="skip the search of recipes on top of the chosen system message (halves the search; "
                        "'both' is then the steering choice plus the message)")


def run(args: argparse.Namespace) -> int:
    from vsteer.eval.tune import format_tune, tune

    if not Path(args.vectors).is_dir():
        print(f"vsteer tune: error: {args.vectors} is not a vector set directory", file=sys.stderr)
        return 2
    try:
        report = tune(
            args.model, args.vectors, bands=args.bands, strengths=args.strengths, unit=args.unit,
            positions=args.positions, norms=args.norms, max_ppl_ratio=args.max_ppl_ratio,
            direction=1 if args.direction == "+" else -1, random_baselines=args.random_baselines,
            prompting=not args.no_prompting, backend=args.backend, out=args.out, write=not args.dry_run,
            n_prompts=args.prompts, max_new_tokens=args.max_new_tokens, seed=args.seed, split_seed=args.split_seed,
            progress=not args.no_progress, batch_size=args.batch_size, dtype=args.dtype,
            enforce_eager=not args.compile, plots=not args.no_plots, rule=args.choose, combined=not args.no_combined,
            **scorer_kwargs(args))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"vsteer tune: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(format_tune(report))
    print(f"wrote {Path(args.out) / 'report.json'} in {report['timing']['total_s']:.1f}s")
    return 0 if report["tune"]["chosen"] is not None else 1
