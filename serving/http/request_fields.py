"""The ``steering`` field of vLLM's OpenAI-compatible requests, attached where vLLM builds
the engine request.

vLLM keeps unknown top-level request fields in ``request.model_extra`` and ignores them.
vsteer wraps ``to_sampling_params`` of the Chat Completions, Completions and Responses
request classes (the Anthropic ``/v1/messages`` route converts to the chat class):

* inside an HTTP request the middleware already resolved the request's steering (its
  ``steering`` field, ``vllm_xargs["steering"]``, or the server's default): it is sealed
  into ``SamplingParams.extra_args`` as is, whatever route built the request object; no
  second parse or resolution;
* outside one (``vllm run-batch`` builds these requests from a file) the spec is passed
  on as ``extra_args["steering"]`` for ``process_inputs`` to resolve, like ``vllm.LLM``.

Client-sent vsteer keys in ``vllm_xargs`` are dropped either way.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from vsteer.engine.errors import SteeringError
from vsteer.engine.spec import SteeringSpec

from .. import request_context
from ..frontend import refuse
from ..keys import STEERING_KEY
from ..steering_request import SteeringRequest, with_steering, without_vsteer_keys

logger = logging.getLogger("vllm.vsteer")
_announced = False


def _spec_in(request: Any) -> tuple[bool, Any]:
    """(mentioned, spec) of a request object that did not pass the middleware."""
    extra, xargs = getattr(request, "model_extra", None) or {}, getattr(request, "vllm_xargs", None)
    if STEERING_KEY in extra:
        return True, extra[STEERING_KEY]
    if isinstance(xargs, dict) and STEERING_KEY in xargs:
        return True, xargs[STEERING_KEY]
    return False, None


def _note_applied(steering: SteeringRequest) -> None:
    global _announced
    request_context.note(request_context.APPLIED, steering.describe())
    if not _announced:  # one line per API-server process: which ones steer (--api-server-count)
        _announced = True
        logger.info("vsteer: this API server is steering requests (first fingerprint %s)", steering.fingerprint)


def to_sampling_params_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def to_sampling_params(self, *args, **kwargs):
        sp = original(self, *args, **kwargs)
        if request_context.in_request():
            steering = request_context.get(request_context.RESOLVED)
            sp.extra_args = with_steering(sp.extra_args, steering)
            if steering is not None:
                _note_applied(steering)
            return sp
        mentioned, spec = _spec_in(self)
        rest = without_vsteer_keys(sp.extra_args)
        if mentioned and spec is not None:
            rest = {**(rest or {}), STEERING_KEY: spec}  # resolved (or refused) by process_inputs
        sp.extra_args = rest
        return sp

    return to_sampling_params


def to_beam_search_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """Beam search builds its own sampling params per beam and would drop steering:
    refuse explicit steering there (400), and report ``"steering": null`` when the
    server's default steering is therefore not applied."""

    @functools.wraps(original)
    def to_beam_search_params(self, *args, **kwargs):
        if request_context.in_request():
            steering = request_context.get(request_context.RESOLVED)
            if steering is not None and steering.source != "default":
                raise refuse(SteeringError("steering is not supported with use_beam_search", field="steering",
                                           reason="unsupported_with_beam_search"))
            if steering is not None:
                request_context.note(request_context.NOT_APPLIED,
                                     "the default steering is not applied with use_beam_search")
        else:
            mentioned, spec = _spec_in(self)
            try:
                parsed = SteeringSpec.parse(spec) if mentioned else None
            except SteeringError as e:
                raise refuse(e) from None
            if parsed is not None and not parsed.is_empty:
                raise refuse(SteeringError("steering is not supported with use_beam_search", field="steering",
                                           reason="unsupported_with_beam_search"))
        return original(self, *args, **kwargs)

    return to_beam_search_params
