"""Runner adapters: the glue between each generation of vLLM's model runner and
``WorkerSteering`` (``v1``: the V1 runner; ``v2``: Model Runner V2).

The adapter is chosen from the runner object vLLM actually built (never from an
environment variable): a runner no adapter knows is refused when the model loads, with a
message naming it, so a new runner can never serve unsteered in silence.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..compat import UnsupportedVLLMError, compat_entry, vllm_version
from .base import RunnerGeneration, StepBatch
from .v1 import V1
from .v2 import V2

GENERATIONS: dict[str, type[RunnerGeneration]] = {"v1": V1, "v2": V2}


def _runner_class(ref: str) -> type | None:
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def adapter_for(runner: Any) -> type[RunnerGeneration]:
    """The adapter of the runner generation ``runner`` belongs to."""
    entry = compat_entry()
    for name, ref in entry.runners.items():
        cls = _runner_class(ref)
        if cls is not None and isinstance(runner, cls):
            return GENERATIONS[name]
    kind = f"{type(runner).__module__}.{type(runner).__qualname__}"
    known = ", ".join(f"{name.upper()} ({ref.replace(':', '.')})" for name, ref in entry.runners.items())
    raise UnsupportedVLLMError(
        f"vsteer cannot steer through the model runner vLLM {vllm_version()} built ({kind}): it knows {known}. "
        "Use a supported vLLM (docs/vllm.md) or set VSTEER_DISABLE=1; vsteer never runs unsteered in silence.")


__all__ = ["GENERATIONS", "RunnerGeneration", "StepBatch", "adapter_for"]
