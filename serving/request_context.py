"""What one HTTP request learns on its way through the layers.

The middleware opens a dict per request (a context variable, so the request handler, a
child task, sees it) holding the request's resolved steering (``RESOLVED``: the one
resolution, made before vLLM sees the body). The handlers then note what they applied
(the response headers and body), why a steering was not applied, or why a steering field
was refused (the error body's ``code``).
"""

from __future__ import annotations

import contextvars
from typing import Any

RESPONSE_INFO: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("vsteer_response_info",
                                                                                      default=None)
"""Set per HTTP request by the middleware to a fresh dict."""

RESOLVED = "resolved"
"""RESPONSE_INFO key: this request's ``SteeringRequest`` (None: unsteered), resolved once
by the middleware; ``to_sampling_params`` attaches it to the engine request."""
APPLIED = "steering"
"""RESPONSE_INFO key: the description of the steering attached (headers and body)."""
NOT_APPLIED = "not_applied"
"""RESPONSE_INFO key: why a request that would have been steered was not (the response
then says ``"steering": null``)."""
REJECTION = "rejection"
"""RESPONSE_INFO key: the reason code of a refused steering field."""
ENGINE_IDS = "engine_ids"
"""RESPONSE_INFO key: the engine request ids this HTTP request created (``process_inputs``)."""

_serves_http = False


def mark_serving_http() -> None:
    """This process serves vLLM's HTTP app with vsteer's request path installed."""
    global _serves_http
    _serves_http = True


def serves_http() -> bool:
    return _serves_http


def note(key: str, value: Any) -> None:
    """Record ``value`` for the current HTTP request (nothing outside one)."""
    info = RESPONSE_INFO.get()
    if info is not None:
        info[key] = value


def note_engine_request(request_id: str) -> None:
    info = RESPONSE_INFO.get()
    if info is not None:
        info.setdefault(ENGINE_IDS, []).append(request_id)


def get(key: str, default: Any = None) -> Any:
    info = RESPONSE_INFO.get()
    return default if info is None else info.get(key, default)


def in_request() -> bool:
    """Inside an HTTP request whose steering the middleware resolved."""
    info = RESPONSE_INFO.get()
    return info is not None and RESOLVED in info
