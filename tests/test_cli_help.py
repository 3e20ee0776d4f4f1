"""Day one (issue 21): every help answers fast (no torch, no vLLM imported for it), shows
its defaults, and the subcommands use one name per option."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from vsteer.cli import choices
from vsteer.cli.main import SUBCOMMANDS, build_parser

HELPS = [[], *([name] for name in SUBCOMMANDS), ["pairs", "topic"]]
PROBE = """
import json, sys, time
t0 = time.perf_counter()
from vsteer.cli.main import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit:
    pass
print(json.dumps({"seconds": time.perf_counter() - t0, "heavy": sorted(m for m in ("torch", "vllm", "transformers")
                                                                       if m in sys.modules)}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", HELPS, ids=lambda a: " ".join(a) or "vsteer")
def test_help_is_fast_and_imports_nothing_heavy(argv):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
    info = json.loads(done.stderr.strip().splitlines()[-1])
    assert info["heavy"] == [], f"`vsteer {' '.join(argv)} --help` imported {info['heavy']}"
    assert wall < 2.0, f"`vsteer {' '.join(argv)} --help` took {wall:.2f}s in a fresh process"


def test_cli_choices_are_the_librarys():
    from vsteer.engine.layers import COMPONENTS
    from vsteer.engine.models import DTYPES, KNOWN_MODELS
    from vsteer.engine.operators import NORMS, OPS, UNITS
    from vsteer.engine.positions import POSITIONS
    from vsteer.eval.behaviours import BEHAVIOURS
    from vsteer.eval.choice import RULES
    from vsteer.eval.tune import DEFAULT_TUNE_STRENGTHS
    from vsteer.extract.methods import METHODS
    from vsteer.extract.positions import CLI_TOKEN_POSITIONS

    assert choices.COMPONENTS == COMPONENTS and choices.DTYPES == DTYPES and choices.KNOWN_MODELS == KNOWN_MODELS
    assert choices.OPS == OPS and choices.NORMS == NORMS and choices.UNITS == UNITS
    assert choices.POSITIONS == POSITIONS and choices.CHOICE_RULES == RULES
    assert set(choices.METHODS) == set(METHODS) | {"bipo"}
    assert choices.TOKEN_POSITIONS == CLI_TOKEN_POSITIONS
    assert choices.BEHAVIOURS == tuple(sorted(BEHAVIOURS))
    tune = _options("tune")
    assert tune["--strengths"].default == list(DEFAULT_TUNE_STRENGTHS)


def _options(command: str) -> dict:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s: a for a in sub._actions for s in a.option_strings}


def test_one_name_per_option_and_defaults_shown(capsys):
    opts = {name: _options(name) for name in ("extract", "eval", "tune", "demo")}
    for name in ("eval", "tune"):
        assert "--unit" in opts[name] and "--max-new-tokens" in opts[name]
        assert opts[name]["--dtype"].default == "auto" and "--trust-remote-code" in opts[name]
    assert opts["extract"]["--dtype"].default == "auto" and "--trust-remote-code" in opts["extract"]
    assert "--max-new-tokens" in opts["demo"]
    for name in ("eval", "demo"):  # old spellings still parse, but are not advertised
        build_parser(name)
        with pytest.raises(SystemExit):
            build_parser(name).parse_args([name, "--help"])
        helped = capsys.readouterr().out
        assert "--strength-unit" not in helped and "--max-tokens " not in helped
    args = build_parser("eval").parse_args(["eval", "--model", "m", "--vectors", "v", "--strength-unit", "relative"])
    assert args.unit == "relative"
    with pytest.raises(SystemExit):
        build_parser("extract").parse_args(["extract", "--help"])
    helped = capsys.readouterr().out
    assert "(default: auto)" in helped and "(default: caa)" in helped and "(default: 0.25)" in helped
