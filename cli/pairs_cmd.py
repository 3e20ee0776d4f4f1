"""``vsteer pairs``: make contrast-pair files. ``vsteer pairs topic --words ocean,sea,waves
--out pairs.jsonl`` fills sentence templates with the words (positive) and with an
everyday topic's words (negative); the file feeds ``vsteer extract --pairs``."""

from __future__ import annotations

import argparse
import sys

from .args import words


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pairs_kind", required=True)
    t = sub.add_parser("topic", help="topic-swap pairs for a concept from a word list",
                       description="Each pair fills one sentence template with the concept's words (positive) "
                                   "and with the words of an everyday contrast topic (negative).")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--words", type=words, help="comma list of words or short phrases of the concept")
    src.add_argument("--topic", help="a bundled topic's word list (ocean, cooking, space, ...)")
    t.add_argument("--out", required=True, help="output file (.jsonl, .json or .csv)")
    t.add_argument("--name", help="dataset name (default: --topic, else the first word)")
    t.add_argument("-n", "--n", type=int, default=64, help="number of pairs (default: %(default)s)")
    t.add_argument("--contrast", type=words, help="bundled contrast topics to swap in (default: all everyday ones)")
    t.add_argument("--contrast-words", type=words, help="your own contrast words instead of bundled topics")
    t.add_argument("--prompt", default="", help="a prompt shared by every pair (default: none)")
    t.add_argument("--seed", type=int, default=0, help="seed of the template and word order")


def run(args: argparse.Namespace) -> int:
    from vsteer.extract.concepts import bundled_topics, topic_pairs

    try:
        if args.topic:
            topics = bundled_topics()
            if args.topic not in topics:
                raise ValueError(f"no bundled topic {args.topic!r}; bundled: {', '.join(sorted(topics))}")
            words = list(topics[args.topic].words)
        else:
            words = args.words
        name = args.name or args.topic or words[0].replace(" ", "-")
        pairs = topic_pairs(words, name=name, n=args.n, contrast=args.contrast, contrast_words=args.contrast_words,
                            prompt=args.prompt, seed=args.seed)
        path = pairs.save(args.out)
    except (ValueError, OSError) as e:
        print(f"vsteer pairs: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(pairs)} pairs for {name!r} to {path}")
    for pair in list(pairs)[:2]:
        print(f"  + {pair.positive}\n  - {pair.negative}")
    return 0
