"""The ``vsteer`` command. Each subcommand is a module of ``vsteer.cli`` imported only when
chosen, and building a parser imports neither torch nor vLLM, so ``vsteer --help`` and
every ``vsteer CMD --help`` answer at once (tests/test_cli_help.py)."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module, metadata

# name -> (module defining add_arguments(parser) and run(args), help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("vsteer.cli.models_cmd", "prepare the embedded default model (and a tiny test model)"),
    "pairs": ("vsteer.cli.pairs_cmd", "make contrast pairs, e.g. for a topic from a word list"),
    "extract": ("vsteer.cli.extract_cmd", "extract a steering vector set from contrast pairs"),
    "inspect": ("vsteer.cli.inspect_cmd", "print a vector file's metadata and norms"),
    "eval": ("vsteer.cli.eval_cmd", "strength/layer sweep: behaviour score, coherence, prompting baseline, plots"),
    "tune": ("vsteer.cli.tune_cmd", "choose a recipe (layers, strength, positions) and a system message on some "
                                    "prompts, score them on others, record the recipe as the set's default"),
    "serve": ("vsteer.cli.serve_cmd", "run vLLM's OpenAI-compatible server with per-request steering"),
    "demo": ("vsteer.cli.demo", "extract a vector on the embedded model and print steered vs unsteered text"),
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus each option's default when it has one and its help does
    not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text is argparse.SUPPRESS or "default" in text.lower() or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or action.nargs == 0:
            return text
        shown = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in action.default) \
            if isinstance(action.default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def _version() -> str:
    try:  # the same source as vsteer.engine.version, without importing the engine (torch)
        return metadata.version("vsteer")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (the others just list their help)."""
    parser = argparse.ArgumentParser(prog="vsteer", description="Steering vectors: extract, tune, inspect, serve.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"vsteer {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
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
