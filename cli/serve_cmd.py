"""``vsteer serve MODEL --vectors DIR [--default-steering FILE] [--steering-import-dir DIR ...]
[any vllm serve flag]``

vLLM's OpenAI-compatible server, in this process, with per-request steering, the vector
registry routes and the steering metrics (docs/server.md). MODEL is a local folder or one
of the built-in short names (``smollm2-135m-instruct``, ``tiny-llama``); nothing is
downloaded. Every other flag goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USAGE = ("vsteer serve MODEL [--vectors DIR] [--default-steering FILE] [--steering-import-dir DIR] "
         "[vllm serve flags...]")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsteer serve", usage=USAGE, add_help=False, allow_abbrev=False,
                                description="vLLM's OpenAI-compatible server with per-request steering.",
                                epilog="All other flags are vLLM's (see `python -m vllm.entrypoints.openai."
                                       "api_server --help`). Docs: docs/server.md")
    add_arguments(p)
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """vsteer's own serve flags (the rest of the command line is vLLM's)."""
    p.add_argument("--vectors", metavar="DIR",
                   help="vector registry directory (one sub-directory per named vector set); requests name "
                        "vectors from it and the admin routes write to it (env VSTEER_VECTORS_DIR)")
    p.add_argument("--default-steering", metavar="FILE",
                   help="JSON SteeringSpec applied to requests that do not mention steering (a request "
                        "overrides it, or turns it off with \"steering\": null)")
    p.add_argument("--steering-admin-key", metavar="KEY", help=argparse.SUPPRESS)  # refused: env only
    p.add_argument("--steering-import-dir", metavar="DIR", action="append", default=[],
                   help="extra directory POST /v1/steering/vectors may load vector sets from by path "
                        "(repeatable; the --vectors directory is always allowed)")


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    model, rest = _take_model(argv)
    ours, vllm_argv = parser.parse_known_args(rest)
    if ours.help:
        parser.print_help()
        return 0
    if ours.steering_admin_key is not None:
        return _fail("--steering-admin-key is not accepted (a key on the command line is visible to every "
                     "local user); set VSTEER_ADMIN_KEY in the environment")
    if model is None:
        parser.print_usage(sys.stderr)
        return _fail("MODEL is required (a local folder, smollm2-135m-instruct or tiny-llama)")
    from vsteer.engine.settings import Settings, SettingsError, settings

    try:
        disabled = settings().disable
    except SettingsError as e:
        return _fail(str(e))
    if disabled:
        return _fail("VSTEER_DISABLE=1 turns the vLLM plugin off; unset it to serve with steering")

    from vsteer.engine.models import KNOWN_MODELS, resolve_model

    try:
        model_path = resolve_model(model)
    except FileNotFoundError as e:
        return _fail(str(e))
    if ours.vectors:
        vdir = Path(ours.vectors).expanduser().resolve()
        if vdir.exists() and not vdir.is_dir():
            return _fail(f"--vectors {ours.vectors} is not a directory")
        vdir.mkdir(parents=True, exist_ok=True)
        os.environ[Settings.env_name("vectors_dir")] = str(vdir)
    # vLLM only loads plugins named in VLLM_PLUGINS when that is set: make sure ours is.
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "vsteer" not in [p.strip() for p in plugins.split(",")]:
        os.environ["VLLM_PLUGINS"] = ",".join([p for p in plugins.split(",") if p.strip()] + ["vsteer"])

    from vsteer.serving.http.config import configure

    try:
        configure(default_steering=ours.default_steering, import_dirs=ours.steering_import_dir, banner=True)
    except ValueError as e:
        return _fail(str(e))

    # Import the launcher first, so the plugin (loaded while vLLM builds its parser) finds
    # the build_app it wraps; register explicitly too in case plugin loading is filtered.
    import uvloop
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vsteer.serving.plugin import ensure_api_server_patches, register

    register()
    ensure_api_server_patches()
    cli_env_setup()
    vparser = make_arg_parser(FlexibleArgumentParser(prog="vsteer serve", usage=USAGE))
    args = vparser.parse_args(["--model", model_path, *vllm_argv])
    if getattr(args, "model_tag", None):
        return _fail(f"unexpected positional argument {args.model_tag!r} (MODEL is {model!r})")
    if model in KNOWN_MODELS and not _has_flag(vllm_argv, "--served-model-name"):
        args.served_model_name = [model]
    if getattr(args, "api_server_count", None) not in (None, 1):
        return _fail("vsteer serve runs one API server process; use `vllm serve` with vsteer installed for "
                     "--api-server-count > 1 (docs/server.md)")
    if getattr(args, "headless", False):
        return _fail("--headless starts no API server; run `vllm serve --headless` for engine-only nodes")
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    try:
        uvloop.run(entry.run_server(args))
    except KeyboardInterrupt:  # SIGTERM/SIGINT before the HTTP server took over the signals
        print("vsteer: interrupted during start-up; stopped", file=sys.stderr, flush=True)
    print("vsteer: server stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:  # pragma: no cover - `vsteer serve` is routed to main()
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
