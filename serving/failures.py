"""A request whose steering cannot be applied finishes with an error, never as an
unsteered success.

The API server validated and pinned the request's vectors; leases keep the pinned
versions on disk (``vsteer.engine.leases``). Should a version still be missing (files
deleted by hand, a node without the volume), two checks turn that into vLLM's own
request-error path (``FinishReason.ERROR``: HTTP 500 for the client, an error event in a
stream), and only for that request:

1. ``admission_wrapper`` (``EngineCore.preprocess_add_request``, engine-core process):
   resolve the pinned spec before the request is scheduled; raising there makes vLLM
   finish it with ERROR. It also loads the vectors into the process cache, which the
   in-process worker (TP=1) then uses.
2. ``sample_tokens_wrapper`` (worker) + ``update_from_output_wrapper`` (scheduler): a
   worker that cannot resolve a request marks it on its ``ModelRunnerOutput``; the
   scheduler finishes it with ERROR and drops the tokens of that step.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from typing import Any, Callable

from vsteer.engine.errors import SteeringError

from .keys import PINS_KEY, STEERING_KEY

logger = logging.getLogger("vllm.vsteer")
FAILED_ATTR = "vsteer_failed"


class SteeringUnavailable(RuntimeError):
    """The request's pinned steering cannot be loaded here."""


def admission_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def preprocess_add_request(self, request, *args, **kwargs):
        sp = getattr(request, "sampling_params", None)
        extra = (getattr(sp, "extra_args", None) or {}) if sp is not None else {}
        if extra.get(STEERING_KEY):
            from .frontend import resolver_for_config

            try:
                resolver_for_config(self.vllm_config).resolve(
                    extra[STEERING_KEY], versions=(extra.get(PINS_KEY) or {}).get("versions"))
            except SteeringError as e:
                raise SteeringUnavailable(f"vsteer: request {request.request_id}: its steering cannot be "
                                          f"applied ({e.message}); failing it rather than running unsteered") from None
        return original(self, request, *args, **kwargs)

    return preprocess_add_request


def _with_failed(output: Any, failed: set[str]) -> Any:
    if output is None or not failed:
        return output
    try:
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
    except ImportError:  # pragma: no cover
        EMPTY_MODEL_RUNNER_OUTPUT = None
    if output is EMPTY_MODEL_RUNNER_OUTPUT:
        output = copy.copy(output)  # never mark the shared empty output
    if hasattr(output, "get_output") and not hasattr(output, "req_ids"):  # async output: mark when resolved
        inner = output.get_output

        def get_output() -> Any:
            return _with_failed(inner(), failed)

        output.get_output = get_output
        return output
    setattr(output, FAILED_ATTR, frozenset(failed) | getattr(output, FAILED_ATTR, frozenset()))
    return output


def sample_tokens_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``GPUModelRunner.sample_tokens``: mark this step's failed requests on its output
    (and count the time in the step, like ``worker.timed_wrapper`` does for execute_model)."""

    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        t0 = time.perf_counter()
        output = original(self, *args, **kwargs)
        state = getattr(self, "_vsteer", None)
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
