"""What every runner adapter hands to ``WorkerSteering``: one step's batch, in the runner's
own batch order, as the steering tables need it.

vLLM has two model-runner generations with different batch state (V1's persistent
``InputBatch``, V2's per-step ``InputBatch`` over ``RequestState``). Each adapter
(``runners.v1``, ``runners.v2``) reads its runner and builds a ``StepBatch``; everything
after that (config rows, position rules, the op) is the same code for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class StepBatch:
    """Per request, in the order its tokens are laid out in the step's flattened input."""

    req_ids: Sequence[str]
    num_scheduled: np.ndarray
    """Tokens of each request in this step."""
    num_computed: np.ndarray
    """Tokens of each request computed before this step: the absolute position of its first
    token in this step (positions are exact for every token a position rule can tell apart:
    with speculative decoding only tokens past the prompt are uncertain, and every rule is
    constant there)."""
    prompt_lens: np.ndarray
    """The user prompt's length (not V2's prefill length, which grows on resumption)."""
    scheduler_output: Any = None


STATE_ATTR = "_vsteer"
"""The runner attribute holding its ``WorkerSteering`` (set when the model loads)."""


def steering_of(runner: Any) -> Any:
    """The runner's ``WorkerSteering`` (None before the model loads, or without vsteer)."""
    return getattr(runner, STATE_ATTR, None)


class RunnerGeneration:
    """One generation of vLLM's model runner: how to recognise it, and what it must provide."""

    name: str = ""
    """"v1" | "v2": the key of ``VLLMCompat.runners``."""

    def describe(self) -> str:
        return f"Model Runner {self.name.upper()}"
