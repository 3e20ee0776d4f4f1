"""A pure ASGI middleware around vLLM's app: it adds ``x-vsteer-fingerprint`` /
``x-vsteer-steering`` headers (and a top-level ``"steering"`` field in non-streaming JSON
bodies) to steered responses, authenticates the admin routes, and pulls the workers'
steering counters into Prometheus before ``/metrics`` is served."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from starlette.datastructures import Headers, MutableHeaders

from vsteer.engine.errors import SteeringError

from .. import metrics
from ..keys import (
    ADMIN_KEY_HEADER,
    FINGERPRINT_HEADER,
    STEERED_PATHS,
    STEERING_HEADER,
    STEERING_KEY,
    VECTORS_PATH,
)
from ..request_context import EARLY, NOT_APPLIED, REJECTION, RESPONSE_INFO, spec_key
from .state import ServerState

EARLY_RESOLVE_MAX_BYTES = 64 << 20
"""Bodies larger than this are not pre-read; their steering is resolved in the handler."""


def _replay(chunks: list[bytes], pending: dict[str, Any] | None, receive: Any, *, more: bool = False) -> Any:
    """A ``receive`` that first yields what was already read (``more``: the body goes on),
    then ``pending`` (a message read after the body, e.g. a disconnect), then the real one."""
    queue: list[dict[str, Any]] = []
    if chunks or pending is None:
        queue.append({"type": "http.request", "body": b"".join(chunks), "more_body": more or pending is not None})
    if pending is not None:
        queue.append(pending)

    async def replay() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


def _presented_keys(headers: Headers) -> list[str]:
    """``Authorization: Bearer KEY`` and/or ``X-Vsteer-Admin-Key: KEY``."""
    keys = []
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            keys.append(token.strip())
    if headers.get(ADMIN_KEY_HEADER):
        keys.append(headers[ADMIN_KEY_HEADER].strip())
    return keys


def _key_matches(token: str | None, keys: list[str]) -> bool:
    if not token:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


class SteeringMiddleware:
    """Pure ASGI (no extra task): streaming responses pass through untouched but for the
    added headers; non-streaming JSON bodies of steered requests get a ``steering`` field."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        method = scope.get("method", "GET")
        if path == "/metrics" or path.startswith("/metrics/"):
            await self._refresh_metrics(scope)
            return await self.app(scope, receive, send)
        if (path == VECTORS_PATH or path.startswith(VECTORS_PATH + "/")) and method in ("POST", "DELETE"):
            scope = self._authenticate_admin(scope)
            return await self.app(scope, receive, send)
        if method == "POST" and path in STEERED_PATHS:
            self._start_background(scope)
            info: dict[str, Any] = {}
            token = RESPONSE_INFO.set(info)
            try:
                receive = await self._resolve_early(receive, info)
                return await self.app(scope, receive, self._wrap_send(send, info))
            finally:
                RESPONSE_INFO.reset(token)
        return await self.app(scope, receive, send)

    async def _resolve_early(self, receive: Any, info: dict[str, Any]) -> Any:
        """Read the body, and when it carries steering (or a default applies), resolve it in
        a thread: decoding inline vectors and loading sets must not block the event loop.
        The request handler (``request_fields``) then reuses the result. Returns a
        ``receive`` that replays the body to vLLM."""
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let vLLM see it
                return _replay(chunks, message, receive)
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if not message.get("more_body", False) or total > EARLY_RESOLVE_MAX_BYTES:
                break
        body = b"".join(chunks)
        more = total > EARLY_RESOLVE_MAX_BYTES
        if not more and (STEERING_KEY.encode() in body or self.state.default_steering is not None):
            early = await asyncio.to_thread(self._resolve_body, body)
            if early is not None:
                info[EARLY] = early
        return _replay([body], None, receive, more=more)

    def _resolve_body(self, body: bytes) -> tuple[str, Any] | None:
        from .request_fields import requested_steering

        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            return None  # vLLM answers malformed bodies itself
        if not isinstance(request, dict):
            return None
        mentioned, spec, _ = requested_steering(request)
        if not mentioned:
            return None
        try:
            return spec_key(spec), self.state.resolver.resolve(spec)
        except SteeringError as e:
            return spec_key(spec), e
        except (RecursionError, ValueError, TypeError):
            return None

    def _engine_client(self, scope: dict[str, Any]) -> Any:
        app = scope.get("app")
        return getattr(getattr(app, "state", None), "engine_client", None)

    def _start_background(self, scope: dict[str, Any]) -> None:
        try:
            metrics.PULLER.start_background(self._engine_client(scope), metrics.refresh_interval())
        except RuntimeError:
            pass

    async def _refresh_metrics(self, scope: dict[str, Any]) -> None:
        self._start_background(scope)
        await metrics.PULLER.refresh(self._engine_client(scope))
        await asyncio.to_thread(metrics.update_registry_size, self.state.registry)

    def _authenticate_admin(self, scope: dict[str, Any]) -> dict[str, Any]:
        presented = _presented_keys(Headers(scope=scope))
        if not any(_key_matches(k, self.state.admin_keys) for k in presented):
            return scope
        scope = dict(scope)
        scope["vsteer_admin"] = True
        # vLLM's own --api-key check guards every /v1 route and knows nothing of the admin
        # key: an authenticated admin request passes it with one of the API keys.
        if self.state.api_keys and not any(_key_matches(k, self.state.api_keys) for k in presented):
            raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]
            raw.append((b"authorization", f"Bearer {self.state.api_keys[0]}".encode("latin-1")))
            scope["headers"] = raw
        return scope

    def _wrap_send(self, send: Any, info: dict[str, Any]) -> Any:
        """Add the steering headers to successful responses and, in JSON bodies, the
        ``steering`` field (or the reason ``code`` to a refused request's error)."""
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def wrapped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                status = message.get("status")
                headers = MutableHeaders(scope=message)
                is_json = headers.get("content-type", "").startswith("application/json")
                if status == 200 and (STEERING_KEY in info or NOT_APPLIED in info):
                    described = info.get(STEERING_KEY)
                    if described is not None:
                        headers[FINGERPRINT_HEADER] = described["fingerprint"]
                    headers[STEERING_HEADER] = json.dumps(described, separators=(",", ":"), sort_keys=True)
                    held["edit"] = _add_steering_field
                elif status == 400:
                    held["edit"] = _openai_error
                if is_json and "edit" in held:
                    held["start"] = message  # edit the body once it is complete
                    return None
                return await send(message)
            if kind == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return None
                body = held["edit"](b"".join(chunks), info)
                start = held.pop("start")
                MutableHeaders(scope=start)["content-length"] = str(len(body))
                await send(start)
                return await send({"type": "http.response.body", "body": body, "more_body": False})
            return await send(message)

        return wrapped


def _edit_json(body: bytes, edit: Any) -> bytes:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(obj, dict) or not edit(obj):
        return body
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _add_steering_field(body: bytes, info: dict[str, Any]) -> bytes:
    return _edit_json(body, lambda obj: obj.__setitem__(STEERING_KEY, info.get(STEERING_KEY)) or True)


def _openai_error(body: bytes, info: dict[str, Any]) -> bytes:
    """Every 400 of the inference routes is an OpenAI error object. vLLM's own has
    ``code: 400``: a refused steering field gets its machine-readable reason there, as the
    OpenAI API does (``"code": "unknown_vector"``); a body FastAPI rejected before vLLM saw
    it (``{"detail": ...}``) is wrapped."""
    def edit(obj: dict[str, Any]) -> bool:
        error = obj.get("error")
        if not isinstance(error, dict):
            detail = obj.get("detail", "invalid request body")
            obj.clear()
            obj["error"] = {"message": detail if isinstance(detail, str) else json.dumps(detail)[:2000],
                            "type": "BadRequestError", "param": None, "code": "invalid_request"}
            return True
        if REJECTION in info:
            error["code"] = info[REJECTION]
            return True
        return False
    return _edit_json(body, edit)
