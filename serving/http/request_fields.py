"""The ``steering`` field of vLLM's OpenAI-compatible requests.

vLLM keeps unknown top-level request fields in ``request.model_extra`` and ignores them.
vsteer wraps ``to_sampling_params`` of the Chat Completions, Completions and Responses
request classes (listed in ``vsteer.serving.vllm_patches``) to

* pick the request's steering: its top-level ``"steering"`` (``extra_body`` in the
  ``openai`` client), else ``vllm_xargs["steering"]``, else the server's default steering
  (``--default-steering``); ``"steering": null`` or ``{"vectors": []}`` switch steering off;
* validate it against the served model and the vector registry *before* anything is
  queued: an invalid spec raises ``InvalidSteering`` (a ``VLLMValidationError``), which
  vLLM answers with HTTP 400 naming the field, for streaming requests too (this runs
  before the response starts);
* put it into ``SamplingParams.extra_args["steering"]``, where the engine patch
  (``vsteer.serving.frontend``) salts the prefix cache and the workers steer;
* note what was applied for the response headers and body (``middleware``).

A request that does not mention steering on a server without default steering is
exactly a stock vLLM request.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from vsteer.engine.errors import SteeringError
from vsteer.engine.resolver import ResolvedSteering
from vsteer.engine.spec import SteeringSpec

from .. import metrics, request_context
from ..frontend import InvalidSteering, seal
from ..keys import PINS_KEY, STEERING_KEY
from . import state

logger = logging.getLogger("vllm.vsteer")


def _invalid(err: SteeringError) -> Exception:
    metrics.record_rejection(err.reason)
    request_context.note(request_context.REJECTION, err.reason)
    return InvalidSteering(err)


def resolve_http(spec: Any) -> ResolvedSteering | None:
    """Resolve against the served model (raises ``InvalidSteering``), reusing what the
    middleware resolved off the event loop for this HTTP request. Before the server
    state exists only the model-free checks run; the engine checks the rest."""
    st = state.current()
    try:
        if st is None:
            SteeringSpec.parse(spec)
            return None
        early = request_context.early_resolution(spec)
        if early is not None:
            if isinstance(early, SteeringError):
                raise early
            return early
        return st.resolver.resolve(spec)
    except SteeringError as e:
        raise _invalid(e) from None


def requested_steering(request: Any) -> tuple[bool, Any, str]:
    """(mentioned, spec, source): what steering this request asks for (a request object,
    or its JSON body as a dict).

    ``source`` is "request" when the request said anything about steering (a spec, null or
    no vectors), "default" when the server default applies, "" when neither."""
    if isinstance(request, dict):
        extra, xargs = request, request.get("vllm_xargs")
    else:
        extra, xargs = getattr(request, "model_extra", None) or {}, getattr(request, "vllm_xargs", None)
    if STEERING_KEY in extra:
        return True, extra[STEERING_KEY], "request"
    if isinstance(xargs, dict) and STEERING_KEY in xargs:
        return True, xargs[STEERING_KEY], "request"
    st = state.current()
    if st is not None and st.default_steering is not None:
        return True, st.default_steering, "default"
    return False, None, ""


_announced = False


def _note(resolved: ResolvedSteering | None, source: str) -> None:
    global _announced
    if resolved is None:
        return
    request_context.note(STEERING_KEY, {**resolved.describe(), "source": source})
    if not _announced:  # one line per API-server process: which ones steer (--api-server-count)
        _announced = True
        logger.info("vsteer: this API server is steering requests (first fingerprint %s)", resolved.fingerprint)


def _canonical(spec: Any) -> dict[str, Any] | None:
    parsed = SteeringSpec.parse(spec)
    return parsed.to_dict() if parsed is not None and not parsed.is_empty else None


def _without_client_keys(extra: dict[str, Any] | None) -> dict[str, Any]:
    """A new dict (vLLM passes the request's own ``vllm_xargs`` as ``extra_args``) without
    the keys vsteer owns: a client never sets the steering pins."""
    return {k: v for k, v in (extra or {}).items() if k not in (STEERING_KEY, PINS_KEY)}


def to_sampling_params_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def to_sampling_params(self, *args, **kwargs):
        mentioned, spec, source = requested_steering(self)
        if not mentioned:
            sp = original(self, *args, **kwargs)
            if sp.extra_args and PINS_KEY in sp.extra_args:
                sp.extra_args = _without_client_keys(sp.extra_args) or None
            return sp
        resolved = resolve_http(spec)  # 400 here, before the engine sees anything
        try:
            canonical = _canonical(spec)
        except SteeringError as e:
            raise _invalid(e) from None
        sp = original(self, *args, **kwargs)
        rest = _without_client_keys(sp.extra_args)
        if canonical is not None:
            rest[STEERING_KEY] = canonical
            if resolved is not None:  # the engine applies exactly what the headers will describe
                rest[PINS_KEY] = seal(canonical, resolved)
        sp.extra_args = rest or None
        _note(resolved, source)
        return sp

    return to_sampling_params


def to_beam_search_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """Beam search builds its own sampling params per beam and would drop steering:
    refuse explicit steering there (400), and report ``"steering": null`` when the
    server's default steering is therefore not applied."""

    @functools.wraps(original)
    def to_beam_search_params(self, *args, **kwargs):
        mentioned, spec, source = requested_steering(self)
        if mentioned and source == "request":
            parsed = None
            try:
                parsed = SteeringSpec.parse(spec)
            except SteeringError as e:
                raise _invalid(e) from None
            if parsed is not None and not parsed.is_empty:
                raise _invalid(SteeringError("steering is not supported with use_beam_search",
                                             field="steering", reason="unsupported_with_beam_search"))
        elif source == "default":
            request_context.note(request_context.NOT_APPLIED, "the default steering is not applied with use_beam_search")
        return original(self, *args, **kwargs)

    return to_beam_search_params
