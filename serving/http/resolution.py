"""The steering of one HTTP request: found in its body (its ``steering`` field, its
``vllm_xargs``, or the server's default), resolved once before vLLM sees the request.

Tenants send many requests with the same steering, and a steering server's job is many
tenants: so the result is cached by the bytes of the spec (a repeat costs a hash and a
symlink read per registry name, not a parse), resolution runs on a small executor of its
own (never on the event loop, never in the pool vLLM's own handlers use), and each client
has a budget of specs new to the server per second (``VSTEER_NEW_CONFIGS_PER_S``,
``VSTEER_NEW_CONFIGS_BURST``; 429 ``too_many_new_configs`` beyond it), so one tenant
inventing a config per request cannot starve the others' requests of resolution time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from vsteer.engine.cache import ByteLRU
from vsteer.engine.errors import SteeringError
from vsteer.engine.settings import settings
from vsteer.engine.spec import STEERING_KEY, SteeringSpec

from ..steering_request import SteeringRequest
from .aliases import combine
from .state import ServerState

MISS = object()
RESOLVE_TIMEOUT_S = 30.0
"""A resolution that takes longer (a registry volume that hangs) answers 503."""


def steering_field(body: dict[str, Any]) -> tuple[bool, Any]:
    """(mentioned, spec) of the request's own ``steering`` (top level, else ``vllm_xargs``)."""
    if STEERING_KEY in body:
        return True, body[STEERING_KEY]
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and STEERING_KEY in xargs:
        return True, xargs[STEERING_KEY]
    return False, None


def steered_model_of(body: dict[str, Any], state: ServerState | None) -> Any:
    """The steered model (``aliases.SteeredModel``) the request's ``model`` names, or None."""
    aliases = getattr(state, "aliases", None)
    return aliases.get(body.get("model")) if aliases is not None else None


def requested_steering(body: dict[str, Any], state: ServerState | None) -> tuple[Any, str] | None:
    """(spec, source) this request asks for, or None when it says nothing and no server
    default applies. ``source``: "request" | "alias" | "default". A spec of ``null`` or with
    no vectors means "unsteered" (and switches a default off); with a steered model it adds
    nothing (``aliases.combine``)."""
    mentioned, spec = steering_field(body)
    model = steered_model_of(body, state)
    if model is not None:
        return combine(model.spec, spec), "alias"
    if mentioned:
        return spec, "request"
    if state is not None and state.default_steering is not None:
        return state.default_steering, "default"
    return None


def spec_key(spec: Any) -> str:
    try:
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        raise SteeringError("must be a JSON object", reason="wrong_type") from None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class SpecCache:
    """Resolved steering by spec bytes, valid while every registry name it pinned still
    points at the same content (one ``readlink`` per name)."""

    def __init__(self, budget: int):
        self._items: ByteLRU[tuple[SteeringRequest | None]] = ByteLRU(
            budget, lambda v: (v[0].resolved.inline_bytes if v[0] is not None and v[0].resolved is not None else 0)
            + 512)

    def get(self, key: str, registry: Any) -> Any:
        hit = self._items.get(key)
        if hit is None:
            return MISS
        request = hit[0]
        if request is not None and request.versions:
            if registry is None or any(registry.live_version(n) != sha for n, sha in request.versions.items()):
                return MISS
        return request

    def put(self, key: str, request: SteeringRequest | None) -> None:
        self._items.put(key, (request,))


class NewSpecBudget:
    """Token buckets per client: specs new to the server (cache misses) per second."""

    MAX_CLIENTS = 10000

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def charge(self, client: str) -> float:
        """0 if ``client`` may resolve a new spec now, else the seconds until it may."""
        s = settings()
        rate, burst = s.new_configs_per_s, float(s.new_configs_burst)
        if rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(client, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.MAX_CLIENTS:
                self._buckets.popitem(last=False)
        return wait


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"too many new steering configs from this client; retry in {retry_after:.1f}s "
                         "(VSTEER_NEW_CONFIGS_PER_S)")
        self.retry_after = retry_after


class RequestResolver:
    """One per server (``ServerState.requests``)."""

    def __init__(self, state: ServerState, workers: int = 4):
        self.state = state
        self.cache = SpecCache(settings().cache_bytes)
        self.budget = NewSpecBudget()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vsteer-resolve")
        self.resolutions = 0
        """Specs this server resolved (cache misses that parsed)."""

    def _resolve(self, spec: Any, source: str) -> SteeringRequest | None:
        self.resolutions += 1
        parsed = SteeringSpec.parse(spec)
        resolved = self.state.resolver.resolve(parsed)
        return None if resolved is None else SteeringRequest.of(parsed.to_dict(), resolved, source)  # type: ignore

    async def resolve(self, body: dict[str, Any], client: str) -> SteeringRequest | None:
        """This request's steering (None: unsteered). Raises ``SteeringError`` (400, or the
        status of its reason) or ``RateLimited`` (429)."""
        found = requested_steering(body, self.state)
        if found is None:
            return None
        spec, source = found
        if spec is None:
            return None
        alias = body.get("model") if source == "alias" else None
        key = spec_key(spec)
        hit = self.cache.get(key, self.state.registry)
        if hit is not MISS:
            return hit if hit is None or (hit.source, hit.alias) == (source, alias) else replace(
                hit, source=source, alias=alias)
        if steering_field(body)[0]:  # the client's own spec (alone, or added to a steered model's)
            wait = self.budget.charge(client)
            if wait:
                raise RateLimited(wait)
        loop = asyncio.get_running_loop()
        try:
            request = await asyncio.wait_for(loop.run_in_executor(self._pool, self._resolve, spec, source),
                                             RESOLVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise SteeringError("the vector registry did not answer in time; retry", reason="registry_busy") from None
        except RecursionError:
            raise SteeringError("nested too deeply", reason="invalid_value") from None
        self.cache.put(key, request)
        return request if request is None or alias is None else replace(request, alias=alias)
