"""vsteer.eval: does a steering vector do what it should, and at what cost?

A sweep (``run_sweep``) steers a model with a vector set at several strengths and
layers, scores the behaviour (``scorers``), measures coherence (perplexity under the
unsteered model, distinct-n), compares against same-norm random directions, and finds
the trade-off point; ``report`` formats and plots it. ``backends`` run the same specs
through the HF reference or vLLM. The protocol is described in docs/evaluation.md.
"""

from .sweep import DEFAULT_STRENGTHS, format_report, run_sweep, tradeoff, write_plots

__all__ = ["DEFAULT_STRENGTHS", "format_report", "run_sweep", "tradeoff", "write_plots"]
