"""The ``vsteer`` command. Each subcommand is a module of ``vsteer.cli`` imported only when
chosen, so ``vsteer inspect`` does not pay for importing vLLM."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module defining add_arguments(parser) and run(args), help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("vsteer.cli.models_cmd", "prepare the embedded default model (and a tiny test model)"),
    "extract": ("vsteer.cli.extract_cmd", "extract a steering vector set from contrast pairs"),
    "inspect": ("vsteer.cli.inspect_cmd", "print a vector file's metadata and norms"),
    "demo": ("vsteer.cli.demo", "extract a vector on the embedded model and print steered vs unsteered text"),
    "serve": ("vsteer.cli.serve_cmd", "run vLLM's OpenAI-compatible server with per-request steering"),
    "eval": ("vsteer.cli.eval_cmd", "strength/layer sweep: behaviour score, coherence, plots"),
    "tune": ("vsteer.cli.tune_cmd", "search a recipe (layers, strength, positions) on held-out prompts and "
                                    "record it as the vector set's default"),
    "pairs": ("vsteer.cli.pairs_cmd", "make contrast pairs, e.g. for a topic from a word list"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (the others just list their help)."""
    from vsteer.engine.version import __version__

    parser = argparse.ArgumentParser(prog="vsteer", description="Steering vectors: extract, inspect, serve.")
    parser.add_argument("--version", action="version", version=f"vsteer {__version__}")
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
