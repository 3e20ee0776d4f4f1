"""The ``vsteer`` command. Subcommands live beside the code they drive and are imported
lazily, so ``vsteer inspect`` does not pay for importing vLLM."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module defining add_arguments(parser) and run(args), help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("vsteer.engine.models_cli", "prepare the embedded default model (and a tiny test model)"),
    "extract": ("vsteer.extract.cli", "extract a steering vector set from contrast pairs"),
    "inspect": ("vsteer.extract.inspect_cli", "print a vector file's metadata and norms"),
    "demo": ("vsteer.engine.demo", "extract a vector on the embedded model and print steered vs unsteered text"),
    "serve": ("vsteer.serving.cli", "run vLLM's OpenAI-compatible server with per-request steering"),
    "eval": ("vsteer.extract.eval_cli", "strength/layer sweep: behaviour score, coherence, plots"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (the others just list their help)."""
    parser = argparse.ArgumentParser(prog="vsteer", description="Steering vectors: extract, inspect, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # serve parses vLLM's own flags itself
        return int(import_module(SUBCOMMANDS["serve"][0]).main(argv[1:]) or 0)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(command).parse_args(argv)
    return int(import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
