"""vsteer.eval: does a steering vector do what it should, at what cost, and does it beat
simply asking for the behaviour?

``run_sweep`` (``vsteer eval``) steers a model with a vector set over recipes (layers and
bands, strengths, operators, norm modes, positions), scores the behaviour, measures
coherence, compares against same-norm random directions and the prompting baseline, and
finds the trade-off point. ``tune`` (``vsteer tune``) searches recipes on one half of the
held-out prompts, scores the chosen one on the other half and records it as the set's
default. The protocol is described in docs/evaluation.md.
"""

from .recipes import Recipe
from .sweep import DEFAULT_STRENGTHS, format_report, run_sweep, tradeoff, write_plots
from .tune import tune

__all__ = ["DEFAULT_STRENGTHS", "Recipe", "format_report", "run_sweep", "tradeoff", "tune", "write_plots"]
