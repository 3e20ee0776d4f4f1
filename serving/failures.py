"""A request whose steering cannot be applied finishes with an error, never as an
unsteered success.

The API server validated and pinned the request's vectors; leases keep the pinned
versions on disk (``vsteer.engine.leases``). Should a version still be missing (files
deleted by hand, a node without the volume), vLLM's own request-error path
(``FinishReason.ERROR``: HTTP 500 for the client, an error event in a stream) ends that
request, and only that one:

1. ``SteeringUnavailable`` raised in the engine core's ``preprocess_add_request``
   (``vsteer.serving.admission``, where the rows are prepared) makes vLLM fail it before
   it is scheduled;
2. ``sample_tokens_wrapper`` (worker) + ``update_from_output_wrapper`` (scheduler): a
   worker that meets a steered request without prepared rows marks it on its
   ``ModelRunnerOutput`` (through ``get_output`` for async outputs); the scheduler
   finishes it with ERROR and drops the tokens of that step.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from typing import Any, Callable

from .runners.base import steering_of

logger = logging.getLogger("vllm.vsteer")
FAILED_ATTR = "vsteer_failed"


class SteeringUnavailable(RuntimeError):
    """The request's pinned steering cannot be loaded here."""


def _mark(output: Any, failed: frozenset[str]) -> Any:
    try:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
    except ImportError:  # pragma: no cover
        EMPTY_MODEL_RUNNER_OUTPUT = None
    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy.copy(output)  # never mark the shared empty output
    setattr(output, FAILED_ATTR, failed | getattr(output, FAILED_ATTR, frozenset()))
    return output


def _with_failed(output: Any, failed: set[str]) -> Any:
    """Mark ``failed`` on a runner output; an async output (whose ``get_output`` the engine
    core calls later) carries the mark to the output it resolves to (``get_output_wrapper``)."""
    if output is None or not failed:
        return output
    return _mark(output, frozenset(failed))


def get_output_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """The runners' async outputs: the resolved ``ModelRunnerOutput`` keeps the mark."""

    @functools.wraps(original)
    def get_output(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        failed = getattr(self, FAILED_ATTR, None)
        return _mark(output, failed) if failed else output

    return get_output


def sample_tokens_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """The runner's ``sample_tokens`` (both generations): mark this step's failed requests
    on its output (and count the time in the step, like ``worker.timed_wrapper`` does for
    execute_model)."""

    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        t0 = time.perf_counter()
        output = original(self, *args, **kwargs)
        state = steering_of(self)
        if state is None:
            return output
        state.stats["step_seconds"] += time.perf_counter() - t0
        return _with_failed(output, state.take_failed()) if state.failed else output

    return sample_tokens


def update_from_output_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        outputs = original(self, scheduler_output, model_runner_output, *args, **kwargs)
        failed = getattr(model_runner_output, FAILED_ATTR, None)
        if failed:
            _fail_requests(self, outputs, failed)
        return outputs

    return update_from_output


def _fail_requests(scheduler: Any, outputs: dict[int, Any], failed: frozenset[str]) -> None:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    requests = {rid: scheduler.requests.get(rid) for rid in failed}
    scheduler.finish_requests([rid for rid, r in requests.items() if r is not None], RequestStatus.FINISHED_ERROR)
    seen = set()
    for client_outputs in outputs.values():
        for out in client_outputs.outputs:
            if out.request_id in failed:  # this step's tokens were computed unsteered: drop them
                out.new_token_ids, out.new_logprobs = [], None
                out.finish_reason, out.stop_reason = FinishReason.ERROR, None
                seen.add(out.request_id)
    for rid, request in requests.items():
        if rid in seen or request is None:
            continue
        outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(
            EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason=FinishReason.ERROR))
    logger.error("vsteer: finished %d request(s) with an error: their steering could not be applied (%s)",
                 len(failed), ", ".join(sorted(failed)))
