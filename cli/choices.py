"""What the CLI's help lists, as plain constants: ``vsteer ... --help`` must not import
torch or vLLM (seconds), so the parsers read their choices from here.
``tests/test_cli_help.py`` checks that every tuple equals the library's own."""

from __future__ import annotations

COMPONENTS = ("residual", "attn", "mlp")                    # vsteer.engine.layers.COMPONENTS
DTYPES = ("auto", "bfloat16", "float16", "float32")         # vsteer.engine.models.DTYPES
KNOWN_MODELS = ("smollm2-135m-instruct", "tiny-llama")      # vsteer.engine.models.KNOWN_MODELS
OPS = ("add", "ablate", "clamp")                            # vsteer.engine.operators.OPS
NORMS = ("keep", "preserve")                                # vsteer.engine.operators.NORMS
UNITS = ("raw", "relative")                                 # vsteer.engine.operators.UNITS
POSITIONS = ("all", "prompt", "generated", "first", "last")  # vsteer.engine.positions.POSITIONS
METHODS = ("bipo", "caa", "pca")                            # extract.methods.METHODS + extract.trained
TOKEN_POSITIONS = ("auto", "last", "first", "mean", "completion")  # extract.positions.CLI_TOKEN_POSITIONS
BEHAVIOURS = ("conciseness", "cooking", "formality", "ocean", "refusal", "sentiment", "space")  # eval BEHAVIOURS
CHOICE_RULES = ("lcb", "folds", "smooth", "max")                       # vsteer.eval.choice.RULES
