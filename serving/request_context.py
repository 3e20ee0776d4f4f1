"""What one HTTP request learns on its way through the layers: a dict the middleware
opens per request (a context variable, so the request handler, a child task, sees it)
and the handlers fill: the steering applied (response headers and body), why a default
steering was not applied, the early resolution made off the event loop, and the reason a
steering field was refused (the error body's ``code``)."""

from __future__ import annotations

import contextvars
import json
from typing import Any

RESPONSE_INFO: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("vsteer_response_info",
                                                                                      default=None)
"""Set per HTTP request by the middleware to a fresh dict; the request handler (a child
task that inherits the context) notes there what steering it applied, for the response
headers and body."""

NOT_APPLIED = "not_applied"
"""RESPONSE_INFO key: why a request that would have been steered was not (the response
then says ``"steering": null``)."""
EARLY = "early"
"""RESPONSE_INFO key: the middleware's resolution of this request's steering, made off
the event loop: (canonical spec JSON, ResolvedSteering | None | SteeringError)."""


def early_resolution(spec: Any) -> Any:
    """The middleware's result for exactly this spec (None: not resolved early)."""
    info = RESPONSE_INFO.get()
    early = info.get(EARLY) if info is not None else None
    if early is None:
        return None
    try:
        key = spec_key(spec)
    except Exception:
        return None
    return early[1] if early[0] == key else None


def spec_key(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=True)


REJECTION = "rejection"
"""RESPONSE_INFO key: the reason code of a refused steering field."""


def note(key: str, value: Any) -> None:
    """Record ``value`` for the current HTTP request (nothing outside one)."""
    info = RESPONSE_INFO.get()
    if info is not None:
        info[key] = value
