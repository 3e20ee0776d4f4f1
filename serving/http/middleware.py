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

from .. import metrics
from ..keys import (
    ADMIN_KEY_HEADER,
    FINGERPRINT_HEADER,
    STEERED_PATHS,
    STEERING_HEADER,
    STEERING_KEY,
    VECTORS_PATH,
)
from .state import RESPONSE_INFO, ServerState


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
                return await self.app(scope, receive, self._wrap_send(send, info))
            finally:
                RESPONSE_INFO.reset(token)
        return await self.app(scope, receive, send)

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
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def wrapped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                described = info.get(STEERING_KEY)
                if described is None or message.get("status") != 200:
                    return await send(message)
                headers = MutableHeaders(scope=message)
                headers[FINGERPRINT_HEADER] = described["fingerprint"]
                headers[STEERING_HEADER] = json.dumps(described, separators=(",", ":"), sort_keys=True)
                if headers.get("content-type", "").startswith("application/json"):
                    held["start"] = message  # add the body field once the body is complete
                    return None
                return await send(message)
            if kind == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return None
                body = b"".join(chunks)
                try:
                    obj = json.loads(body)
                    if isinstance(obj, dict):
                        obj[STEERING_KEY] = info[STEERING_KEY]
                        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
                start = held.pop("start")
                MutableHeaders(scope=start)["content-length"] = str(len(body))
                await send(start)
                return await send({"type": "http.response.body", "body": body, "more_body": False})
            return await send(message)

        return wrapped
