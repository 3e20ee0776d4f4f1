"""Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``): vLLM's default runner on GPU
since 0.25 and its only one from 0.34 (the 0.34 CPU build runs a subclass of it).

V2 keeps per-request state in ``RequestState`` slots (``req_states``) and builds a fresh,
sorted ``InputBatch`` every step. The hook points mirror its LoRA support:

* ``add_requests``: remember each new request (its sampling params carry the prepared
  steering; a request resumed after preemption is added again);
* ``_remove_request`` (finished and preempted requests): forget it;
* ``prepare_inputs``: right after it (where ``_set_active_loras`` runs) build the step's
  rows from the returned ``InputBatch``;
* ``execute_model(dummy_run=True)`` and ``capture_model``: no requests, tables cleared.

Speculative decoding is refused: V2 may re-balance draft tokens across requests on the
device only (adaptive verification), so the host cannot know which token belongs to
which request. Prefill context parallelism re-partitions the batch: refused as well.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from ..compat import UnsupportedVLLMError
from ..patching import Patch, check_fields
from .base import RunnerGeneration, StepBatch, steering_of

FIELDS = ("req_states.req_id_to_index", "req_states.prompt_len", "max_num_reqs", "max_num_tokens", "dtype",
          "device", "model_config")
"""Runner state the V2 adapter reads (checked when the model loads)."""
BATCH_FIELDS = ("req_ids", "idx_mapping_np", "num_scheduled_tokens", "num_computed_tokens_np")
"""``InputBatch`` fields read each step."""


def step_batch(runner: Any, input_batch: Any, scheduler_output: Any) -> StepBatch:
    prompt_lens = runner.req_states.prompt_len.np[input_batch.idx_mapping_np]
    return StepBatch(input_batch.req_ids, np.asarray(input_batch.num_scheduled_tokens),
                     np.asarray(input_batch.num_computed_tokens_np), prompt_lens, scheduler_output)


def add_requests_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def add_requests(self, scheduler_output, *args, **kwargs):
        out = original(self, scheduler_output, *args, **kwargs)
        state = steering_of(self)
        if state is not None:
            for new_req in scheduler_output.scheduled_new_reqs:
                state.remember(new_req.req_id, new_req)
        return out

    return add_requests


def remove_request_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _remove_request(self, req_id, *args, **kwargs):
        state = steering_of(self)
        if state is not None:
            state.forget(req_id)
        return original(self, req_id, *args, **kwargs)

    return _remove_request


def prepare_inputs_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``prepare_inputs``: fill the steering tables from the step's ``InputBatch``."""

    @functools.wraps(original)
    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        input_batch = original(self, scheduler_output, *args, **kwargs)
        state = steering_of(self)
        if state is not None:
            state.step(step_batch(self, input_batch, scheduler_output), state.remembered)
        return input_batch

    return prepare_inputs


def execute_model_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``execute_model``: a dummy run (profiling, warm-up, idle data-parallel ranks) carries
    no requests, so nothing is steered; every call is timed like V1's."""
    from ..worker import timed_wrapper

    timed = timed_wrapper(original)

    @functools.wraps(original)
    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False, *args, **kwargs):
        state = steering_of(self)
        if dummy_run and state is not None:
            state.idle()
        return timed(self, scheduler_output, intermediate_tensors, dummy_run, *args, **kwargs)

    return execute_model


def capture_model_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``capture_model``: CUDA graphs are captured from dummy batches with the tables idle
    (the op takes its full, branch-free path while capturing)."""

    @functools.wraps(original)
    def capture_model(self, *args, **kwargs):
        state = steering_of(self)
        if state is not None:
            state.idle()
        return original(self, *args, **kwargs)

    return capture_model


class V2(RunnerGeneration):
    name = "v2"

    @staticmethod
    def patches(runner_class: str) -> tuple[Patch, ...]:
        return (
            Patch(f"{runner_class}.add_requests", "vsteer.serving.runners.v2:add_requests_wrapper",
                  ("self", "scheduler_output")),
            Patch(f"{runner_class}._remove_request", "vsteer.serving.runners.v2:remove_request_wrapper",
                  ("self", "req_id")),
            Patch(f"{runner_class}.prepare_inputs", "vsteer.serving.runners.v2:prepare_inputs_wrapper",
                  ("self", "scheduler_output")),
            Patch(f"{runner_class}.execute_model", "vsteer.serving.runners.v2:execute_model_wrapper",
                  ("self", "scheduler_output", "intermediate_tensors", "dummy_run")),
            Patch(f"{runner_class}.capture_model", "vsteer.serving.runners.v2:capture_model_wrapper", ("self",)),
            Patch(f"{runner_class}.sample_tokens", "vsteer.serving.failures:sample_tokens_wrapper", ("self",)),
        )

    @staticmethod
    def check(runner: Any, vllm_config: Any) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise UnsupportedVLLMError(
                "vsteer does not support speculative decoding on vLLM's Model Runner V2 (draft tokens may be "
                "re-balanced across requests on the device, so steering rows cannot be placed): start without "
                "--speculative-config, or set VSTEER_DISABLE=1")
        if getattr(runner, "pcp_manager", None) is not None:
            raise UnsupportedVLLMError("vsteer does not support prefill context parallelism on Model Runner V2; "
                                       "start without it, or set VSTEER_DISABLE=1")
        parallel = getattr(vllm_config, "parallel_config", None)
        if parallel is not None and getattr(parallel, "use_ubatching", False):
            raise UnsupportedVLLMError("vsteer does not support micro-batching (dual-batch overlap); "
                                       "turn off --enable-dbo / ubatching")
        check_fields(runner, FIELDS)
