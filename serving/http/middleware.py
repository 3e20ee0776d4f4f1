"""A pure ASGI middleware around vLLM's app, the one place an HTTP request's steering is
decided: it resolves the steering of every generation route once before vLLM sees the
body (``resolution``), refuses bad steering (400), a client over its new-spec budget
(429) or a registry that does not answer (503) with a ``code``, refuses a ``steering``
field on any other route, and adds ``x-vsteer-fingerprint`` / ``x-vsteer-steering``
headers (and a top-level ``"steering"`` field in non-streaming JSON bodies) to steered
responses. It also authenticates the admin routes and pulls the workers' steering
counters into Prometheus before ``/metrics`` is served."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

from starlette.datastructures import Headers, MutableHeaders

from vsteer.engine.errors import SteeringError

from .. import lifetimes, metrics
from ..keys import (
    ADMIN_KEY_HEADER,
    FINGERPRINT_HEADER,
    MODELS_PATH,
    STEERED_PATHS,
    STEERING_HEADER,
    STEERING_KEY,
    VECTORS_PATH,
)
from ..request_context import APPLIED, ENGINE_IDS, NOT_APPLIED, REJECTION, RESOLVED, RESPONSE_INFO
from . import aliases
from .resolution import RateLimited, steered_model_of, steering_field
from .state import ServerState

MODELS_LIST_PATH = "/v1/models"


def _replay(chunks: list[bytes], pending: dict[str, Any] | None, receive: Any) -> Any:
    """A ``receive`` that first yields what was already read, then ``pending`` (a message
    read after the body, e.g. a disconnect), then the real one."""
    queue: list[dict[str, Any]] = []
    if chunks or pending is None:
        queue.append({"type": "http.request", "body": b"".join(chunks), "more_body": pending is not None})
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


STATUS_OF_REASON = {"too_many_new_configs": 429, "registry_busy": 503}
"""Refusals that are not the request's fault get their own HTTP status (default 400)."""


def _client_of(scope: dict[str, Any]) -> str:
    """Who a request is from, for the new-spec budget: its API key, else its address."""
    for key in _presented_keys(Headers(scope=scope)):
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:?"


def _is_json(scope: dict[str, Any]) -> bool:
    return Headers(scope=scope).get("content-type", "").split(";")[0].strip().lower() == "application/json"


async def _read_body(receive: Any) -> tuple[bytes, dict[str, Any] | None]:
    """The whole request body, and a message read after it (a disconnect) if any."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: let vLLM see it
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _with_length(scope: dict[str, Any], length: int) -> dict[str, Any]:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def _send_error(send: Any, status: int, message: str, code: str, param: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
    kind = {429: "RateLimitError", 503: "ServiceUnavailableError"}.get(status, "BadRequestError")
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


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
        if any(path == p or path.startswith(p + "/") for p in (VECTORS_PATH, MODELS_PATH)):
            if method in ("POST", "DELETE"):
                scope = self._authenticate_admin(scope)
            return await self.app(scope, receive, send)
        if method == "POST" and path in STEERED_PATHS:
            return await self._steered(scope, receive, send)
        if method == "GET" and path == MODELS_LIST_PATH and self.state.aliases is not None:
            return await self.app(scope, receive, self._listing_send(send))
        if method == "POST" and _is_json(scope):
            return await self._unsteered_route(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _steered(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Resolve the request's steering once (or refuse it) before vLLM sees the body."""
        self._start_background(scope)
        body, pending = await _read_body(receive)
        info: dict[str, Any] = {}
        token = RESPONSE_INFO.set(info)
        try:
            try:
                request = self._parse_if_steering(body)
                steering = await self.state.requests.resolve(request, _client_of(scope)) if request else None
                info[RESOLVED] = steering
            except SteeringError as e:
                metrics.record_rejection(e.reason)
                return await _send_error(send, STATUS_OF_REASON.get(e.reason, 400), f"invalid steering: {e}",
                                         e.reason, e.field)
            except RateLimited as e:
                metrics.record_rejection("too_many_new_configs")
                return await _send_error(send, 429, str(e), "too_many_new_configs", STEERING_KEY,
                                         {"retry-after": str(max(1, round(e.retry_after)))})
            if steering is not None and steering.alias is not None:  # vLLM serves the model, not the alias
                body = aliases.served_body(request, self.state.model_name)
                scope = _with_length(scope, len(body))
            return await self.app(scope, _replay([body], pending, receive), self._wrap_send(send, info))
        finally:
            RESPONSE_INFO.reset(token)

    def _parse_if_steering(self, body: bytes) -> dict[str, Any] | None:
        """The JSON body when it may carry steering (a field, a default, a steered model)."""
        if STEERING_KEY.encode() not in body and self.state.default_steering is None \
                and not aliases.may_name_one(body, self.state.aliases):
            return None
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            return None  # vLLM answers malformed bodies itself
        return request if isinstance(request, dict) else None

    async def _unsteered_route(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Any other JSON route: a ``steering`` field there would be ignored by vLLM, so it is
        refused (a generation carrying steering the server did not apply is impossible)."""
        body, pending = await _read_body(receive)
        if STEERING_KEY.encode() in body or aliases.may_name_one(body, self.state.aliases):
            try:
                request = json.loads(body)
            except (ValueError, RecursionError):
                request = None
            mentioned, spec = steering_field(request) if isinstance(request, dict) else (False, None)
            if (mentioned and spec is not None) or steered_model_of(request, self.state) is not None:
                metrics.record_rejection("unsupported_route")
                path = scope["path"]
                return await _send_error(send, 400, f"steering (or a steered model) is not applied on {path}: steer "
                                         f"through {', '.join(STEERED_PATHS)}", "unsupported_route", STEERING_KEY)
        return await self.app(scope, _replay([body], pending, receive), send)

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
        steering = info.get(RESOLVED)
        rename = (aliases.renamer(self.state.model_name, steering.alias)
                  if steering is not None and steering.alias is not None else None)

        async def wrapped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.body" and rename is not None:  # the steered model's name, as LoRA's
                message = {**message, "body": rename(message.get("body", b""))}
            if kind == "http.response.start":
                status = message.get("status")
                headers = MutableHeaders(scope=message)
                is_json = headers.get("content-type", "").startswith("application/json")
                if status == 200 and (APPLIED in info or NOT_APPLIED in info):
                    described = info.get(APPLIED)
                    if described is not None:
                        headers[FINGERPRINT_HEADER] = described["fingerprint"]
                    headers[STEERING_HEADER] = json.dumps(described, separators=(",", ":"), sort_keys=True)
                    held["edit"] = _add_steering_field
                elif status == 400:
                    held["edit"] = _openai_error
                elif status == 500 and lifetimes.steering_failed(info.get(ENGINE_IDS, ())):
                    held["edit"] = _steering_unavailable
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

    def _listing_send(self, send: Any) -> Any:
        """``GET /v1/models``: one more card per steered model."""
        return _json_edit_send(send, lambda obj: aliases.model_cards(obj, self.state.aliases, self.state.model_name)
                               is not None)


def _json_edit_send(send: Any, edit: Any) -> Any:
    """A ``send`` that edits a successful JSON response body in place (``edit(obj)``)."""
    held: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if message.get("status") == 200 and MutableHeaders(scope=message).get("content-type", "").startswith(
                    "application/json"):
                held["start"] = message
                return None
            return await send(message)
        if message["type"] == "http.response.body" and "start" in held:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            body = _edit_json(b"".join(chunks), edit)
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
    return _edit_json(body, lambda obj: obj.__setitem__(STEERING_KEY, info.get(APPLIED)) or True)


def _steering_unavailable(body: bytes, info: dict[str, Any]) -> bytes:
    """vLLM's 500 for a request the engine failed carries ``code: 500``; a steered request
    the engine failed because its steering could not be applied gets vsteer's string code."""
    def edit(obj: dict[str, Any]) -> bool:
        error = obj.get("error")
        if not isinstance(error, dict):
            return False
        error["code"] = "steering_unavailable"
        error["message"] = ("the request's steering could not be applied (its pinned vectors could not be loaded "
                            "on the engine); nothing was generated with it. " + str(error.get("message") or ""))
        return True
    return _edit_json(body, edit)


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
