"""``vsteer models prepare NAME``: build the local model folders (no hub downloads)."""

from __future__ import annotations

import argparse

from .choices import KNOWN_MODELS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["prepare", "path"])
    p.add_argument("name", choices=KNOWN_MODELS)
    p.add_argument("--out", help="folder to write (default: the vsteer cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if prepared")


def run(args: argparse.Namespace) -> int:
    from vsteer.engine.models import SMOLLM2, build_tiny_llama, prepare_smollm2

    fn = prepare_smollm2 if args.name == SMOLLM2 else build_tiny_llama
    print(fn(args.out, force=args.force and args.action == "prepare"))
    return 0
