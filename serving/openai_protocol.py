"""The ``steering`` field of vLLM's OpenAI-compatible requests.

vLLM keeps unknown top-level request fields in ``request.model_extra`` and ignores them.
We patch ``to_sampling_params`` of the Chat Completions, Completions and Responses
request classes to

* pick the request's steering: its top-level ``"steering"`` (``extra_body`` in the
  ``openai`` client), else ``vllm_xargs["steering"]``, else the server's default steering
  (``--default-steering``); ``"steering": null`` or ``{"vectors": []}`` switch steering off;
* validate it against the served model and the vector registry *before* anything is
  queued: an invalid spec raises ``InvalidSteering`` (a ``VLLMValidationError``), which
  vLLM answers with HTTP 400 naming the field, for streaming requests too (this runs
  before the response starts);
* put it into ``SamplingParams.extra_args["steering"]``, where the engine patch
  (``vsteer.serving.frontend``) salts the prefix cache and the workers steer;
* note what was applied for the response headers and body (``vsteer.serving.server``).

A request that does not mention steering on a server without default steering is
exactly a stock vLLM request.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
from typing import Any

from vsteer.engine.spec import ResolvedSteering, SteeringError, SteeringSpec

logger = logging.getLogger("vsteer")
STEERING_KEY = "steering"

# Set per HTTP request by the server middleware to a fresh dict; the request handler (a
# child task that inherits the context) writes what it applied into it.
RESPONSE_INFO: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("vsteer_response_info",
                                                                                      default=None)


class _ModelShape:
    hidden_size: int | None = None
    num_layers: int | None = None


MODEL = _ModelShape()
_default_spec: dict[str, Any] | None = None


def set_model_shape(hidden_size: int, num_layers: int) -> None:
    """Called by the server when the app is built (the model is known then)."""
    MODEL.hidden_size, MODEL.num_layers = int(hidden_size), int(num_layers)


def set_default_steering(spec: SteeringSpec | dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec applied to requests that do not mention steering (None: no default)."""
    global _default_spec
    parsed = SteeringSpec.parse(spec)
    _default_spec = parsed.to_dict() if parsed is not None and not parsed.is_empty else None
    return _default_spec


def default_steering() -> dict[str, Any] | None:
    return _default_spec


def _invalid(err: SteeringError) -> Exception:
    from . import metrics
    from .frontend import InvalidSteering

    metrics.record_rejection(err.reason)
    return InvalidSteering(err)


def resolve_http(spec: Any) -> ResolvedSteering | None:
    """Resolve against the served model (raises ``InvalidSteering``). Before the model
    shape is known only the model-free checks run; the engine checks the rest."""
    try:
        if MODEL.hidden_size is None:
            SteeringSpec.parse(spec)
            return None
        from .frontend import resolver_for

        return resolver_for(MODEL.hidden_size, MODEL.num_layers).resolve(spec)
    except SteeringError as e:
        raise _invalid(e) from None


def requested_steering(request: Any) -> tuple[bool, Any, str]:
    """(mentioned, spec, source): what steering this request asks for.

    ``source`` is "request" when the request said anything about steering (a spec, null or
    no vectors), "default" when the server default applies, "" when neither."""
    extra = getattr(request, "model_extra", None) or {}
    if STEERING_KEY in extra:
        return True, extra[STEERING_KEY], "request"
    xargs = getattr(request, "vllm_xargs", None) or {}
    if STEERING_KEY in xargs:
        return True, xargs[STEERING_KEY], "request"
    if _default_spec is not None:
        return True, _default_spec, "default"
    return False, None, ""


def _note(resolved: ResolvedSteering | None, source: str) -> None:
    info = RESPONSE_INFO.get()
    if info is not None and resolved is not None:
        info[STEERING_KEY] = {**resolved.describe(), "source": source}


def _canonical(spec: Any) -> dict[str, Any] | None:
    parsed = SteeringSpec.parse(spec)
    return parsed.to_dict() if parsed is not None and not parsed.is_empty else None


def _wrap_to_sampling_params(cls: type) -> None:
    orig = cls.to_sampling_params
    if getattr(orig, "_vsteer", False):
        return

    @functools.wraps(orig)
    def to_sampling_params(self, *args, **kwargs):
        mentioned, spec, source = requested_steering(self)
        if not mentioned:
            return orig(self, *args, **kwargs)
        resolved = resolve_http(spec)  # 400 here, before the engine sees anything
        try:
            canonical = _canonical(spec)
        except SteeringError as e:
            raise _invalid(e) from None
        sp = orig(self, *args, **kwargs)
        # A new dict: vLLM passes the request's own vllm_xargs dict as extra_args.
        rest = {k: v for k, v in (sp.extra_args or {}).items() if k != STEERING_KEY}
        if canonical is not None:
            rest[STEERING_KEY] = canonical
        sp.extra_args = rest or None
        _note(resolved, source)
        return sp

    to_sampling_params._vsteer = True  # type: ignore[attr-defined]
    cls.to_sampling_params = to_sampling_params


def _wrap_to_beam_search_params(cls: type) -> None:
    """Beam search builds its own sampling params per beam and would drop steering:
    refuse explicit steering there instead of ignoring it."""
    orig = getattr(cls, "to_beam_search_params", None)
    if orig is None or getattr(orig, "_vsteer", False):
        return

    @functools.wraps(orig)
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
        return orig(self, *args, **kwargs)

    to_beam_search_params._vsteer = True  # type: ignore[attr-defined]
    cls.to_beam_search_params = to_beam_search_params


def _request_classes() -> list[type]:
    classes = []
    for module, name in (("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
                         ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
                         ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest")):
        try:
            mod = __import__(module, fromlist=[name])
            classes.append(getattr(mod, name))
        except (ImportError, AttributeError) as e:  # pragma: no cover - other vLLM layouts
            logger.warning("vsteer: cannot patch %s.%s (%s); its steering field is ignored", module, name, e)
    return classes


_API_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.app")


def patch_openai_requests() -> None:
    """Called by the vLLM plugin in every process (cheap: the protocol modules are
    already imported by vLLM's engine code)."""
    for cls in _request_classes():
        _wrap_to_sampling_params(cls)
        _wrap_to_beam_search_params(cls)
    from . import metrics

    metrics.patch_request_counter()
    # In an API server process (vllm serve / vsteer serve) also add the steering routes,
    # headers and metrics to the app it is about to build.
    if any(m in sys.modules for m in _API_SERVER_MODULES):
        from .server import patch_build_app

        patch_build_app()
