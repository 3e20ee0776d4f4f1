"""``vsteer serve MODEL [--vectors DIR] [--default-steering FILE] [--steering-import-dir DIR ...]
[--config FILE.yaml] [any vllm serve flag]``

vLLM's OpenAI-compatible server with per-request steering, the vector registry routes and
the steering metrics (docs/server.md). MODEL is a Hugging Face Hub id, a local folder, or
a built-in short name (``smollm2-135m-instruct``, ``tiny-llama``).

vsteer's flags are an argument group of vLLM's own parser, so ``--help`` lists them in
their own section and one ``--config`` YAML file may hold both (``vectors: /srv/vectors``
beside ``max-model-len: 4096``). Every layout ``vllm serve`` offers works the same way
(one API server here; ``--api-server-count N`` or data parallel start N API-server
processes; ``--headless`` an engine-only node): vsteer's settings reach the other
processes as ``VSTEER_*`` environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USAGE = ("vsteer serve MODEL [--vectors DIR] [--default-steering FILE] [--steered-model NAME=SPEC ...] "
         "[--steering-import-dir DIR] [--config FILE.yaml] [vllm serve flags...]")
GROUP = "vsteer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """vsteer's own serve flags, as a group of the parser ``p`` (vLLM's)."""
    g = p.add_argument_group(GROUP, "Per-request steering: vectors, default steering, the registry routes "
                                    "(docs/server.md; environment variables: docs/configuration.md).")
    g.add_argument("--vectors", metavar="DIR",
                   help="vector registry directory (one sub-directory per named vector set); requests name "
                        "vectors from it and the admin routes write to it (env VSTEER_VECTORS_DIR)")
    g.add_argument("--default-steering", metavar="FILE",
                   help="JSON SteeringSpec applied to requests that do not mention steering (a request "
                        "overrides it, or turns it off with \"steering\": null) (env VSTEER_DEFAULT_STEERING)")
    g.add_argument("--steering-import-dir", metavar="DIR", action="append", default=None,
                   help="extra directory POST /v1/steering/vectors may load vector sets from by path "
                        "(repeatable; the --vectors directory is always allowed) (env VSTEER_IMPORT_DIRS)")
    g.add_argument("--steered-model", metavar="NAME=SPEC", nargs="+", action="extend", default=None,
                   help="a model name that means this model with this steering (repeatable; listed in /v1/models): "
                        "NAME=SET[:STRENGTH][+SET[:STRENGTH]...][;layers=8,10;positions=generated;unit=relative;"
                        "op=add;norm=preserve], or NAME= followed by the JSON object extra_body.steering takes "
                        "(env VSTEER_STEERED_MODELS, one per line; docs/server.md)")
    g.add_argument("--steering-admin-key", metavar="KEY", help=argparse.SUPPRESS)  # refused: env only


def _fail(message: str) -> int:
    print(f"vsteer serve: error: {message}", file=sys.stderr)
    return 2


def _take_model(argv: list[str]) -> tuple[str | None, list[str]]:
    """MODEL is the first argument (like `vllm serve MODEL`), or vLLM's --model flag."""
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith("--model="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _has_flag(argv: list[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names) for a in argv)


def _export_settings(vectors: str | None, default_steering: str | None, import_dirs: list[str] | None,
                     steered_models: list[str] | None = None) -> str | None:
    """Turn vsteer's flags into ``VSTEER_*`` variables, which every process vLLM starts
    (API servers, engine cores, workers) inherits; returns an error or None."""
    from vsteer.engine.settings import Settings
    from vsteer.serving.http.aliases import parse_flag_aliases

    if steered_models:
        try:  # the syntax now; whether they resolve on the model, when the app is built
            parsed = parse_flag_aliases(steered_models)
        except ValueError as e:
            return f"--steered-model: {e}"
        os.environ[Settings.env_name("steered_models")] = "\n".join(  # one line each, whatever the input
            f"{m.name}={json.dumps(m.spec, separators=(',', ':'))}" for m in parsed.values())

    if vectors:
        vdir = Path(vectors).expanduser().resolve()
        if vdir.exists() and not vdir.is_dir():
            return f"--vectors {vectors} is not a directory"
        vdir.mkdir(parents=True, exist_ok=True)
        os.environ[Settings.env_name("vectors_dir")] = str(vdir)
    if default_steering:
        value = default_steering
        if not value.lstrip().startswith("{"):
            value = str(Path(value).expanduser().resolve())
        os.environ[Settings.env_name("default_steering")] = value
    if import_dirs:
        os.environ[Settings.env_name("import_dirs")] = os.pathsep.join(str(Path(d).resolve()) for d in import_dirs)
    # vLLM only loads plugins named in VLLM_PLUGINS when that is set: make sure ours is.
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "vsteer" not in [p.strip() for p in plugins.split(",")]:
        os.environ["VLLM_PLUGINS"] = ",".join([p for p in plugins.split(",") if p.strip()] + ["vsteer"])
    return None


def quick_help() -> str:
    """``vsteer serve --help`` without importing vLLM: vsteer's own flags, and where vLLM's
    are listed (vLLM's parser takes seconds to build: only ``--help=...`` builds it)."""
    p = argparse.ArgumentParser(prog="vsteer serve", usage=USAGE, add_help=False,
                                description="vLLM's OpenAI-compatible server with per-request steering, the vector "
                                            "registry routes and the steering metrics (docs/server.md). MODEL is a "
                                            "Hugging Face Hub id, a local folder, smollm2-135m-instruct or tiny-llama.")
    add_arguments(p)
    return p.format_help() + (
        "\nEvery `vllm serve` flag is accepted as well (and --config FILE.yaml may hold both kinds). vLLM's own\n"
        "help builds vLLM's parser (a few seconds):\n"
        "  vsteer serve --help=all         every flag\n"
        "  vsteer serve --help=listgroup   the groups of flags\n"
        "  vsteer serve --help=GROUP       one group (e.g. --help=ModelConfig, --help=vsteer)\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):  # plain help: no vLLM import (--help=GROUP goes to vLLM)
        print(quick_help())
        return 0
    from vsteer.engine.settings import SettingsError, settings

    try:
        if settings().disable:
            return _fail("VSTEER_DISABLE=1 turns the vLLM plugin off; unset it to serve with steering")
    except SettingsError as e:
        return _fail(str(e))
    if _has_flag(argv, "--steering-admin-key"):
        return _fail("--steering-admin-key is not accepted (a key on the command line is visible to every "
                     "local user); set VSTEER_ADMIN_KEY in the environment")
    model, rest = _take_model(argv)
    help_only = _has_flag(rest, "-h", "--help")
    if model is None and not help_only:
        print(f"usage: {USAGE}", file=sys.stderr)
        return _fail("MODEL is required (a Hub id, a local folder, smollm2-135m-instruct or tiny-llama)")

    # Import the launcher first, so the plugin (loaded while vLLM builds its parser) finds
    # the build_app it wraps; register explicitly too in case plugin loading is filtered.
    from vsteer.engine.models import KNOWN_MODELS, resolve_model
    from vsteer.serving.compat import UnsupportedVLLMError, configure_vllm_logging, serve_function
    from vsteer.serving.plugin import ensure_api_server_patches, register

    try:  # where each lives depends on the vLLM version (serving/compat.py, serve_names)
        ServeSubcommand = serve_function("ServeSubcommand")
        serve_function("run_server")  # imports the launcher (see above)
        make_arg_parser, validate_parsed_serve_args = (serve_function("make_arg_parser"),
                                                       serve_function("validate_parsed_serve_args"))
        cli_env_setup, FlexibleArgumentParser = serve_function("cli_env_setup"), serve_function("FlexibleArgumentParser")
    except UnsupportedVLLMError as e:
        return _fail(str(e))

    register()
    ensure_api_server_patches()
    cli_env_setup()
    vparser = make_arg_parser(FlexibleArgumentParser(prog="vsteer serve", usage=USAGE))
    add_arguments(vparser)
    if help_only:  # vLLM's forms: --help, --help=vsteer (one group), --help=listgroup ...
        try:
            vparser.parse_args(rest)
        except SystemExit as e:
            return int(e.code or 0)
    args = vparser.parse_args(["--model", model, *rest])
    if getattr(args, "model_tag", None):
        return _fail(f"unexpected positional argument {args.model_tag!r} (MODEL is {model!r})")
    try:
        args.model = resolve_model(model, getattr(args, "revision", None))
    except FileNotFoundError as e:  # ModelNotFoundError: one line, no traceback
        return _fail(str(e))
    if model in KNOWN_MODELS and not getattr(args, "served_model_name", None):
        args.served_model_name = [model]
    error = _export_settings(args.vectors, args.default_steering, args.steering_import_dir, args.steered_model)
    if error:
        return _fail(error)

    from vsteer.serving.http.config import configure

    try:  # checked here, before vLLM starts: a bad default or admin key never reaches the engine
        configure(banner=True)
    except ValueError as e:
        return _fail(str(e))
    configure_vllm_logging(args)  # vLLM 0.31+ only (compat table)
    validate_parsed_serve_args(args)
    try:
        ServeSubcommand.cmd(args)  # every layout vllm serve has: one or N API servers, headless, DP
    except KeyboardInterrupt:  # SIGTERM/SIGINT before the HTTP server took over the signals
        print("vsteer: interrupted during start-up; stopped", file=sys.stderr, flush=True)
    print("vsteer: server stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:  # pragma: no cover - `vsteer serve` is routed to main()
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
