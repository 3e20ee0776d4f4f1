"""Front-end side: validate each request's steering before it is queued, pin the content
the workers must apply, and give steered requests their own prefix-cache namespace.

``process_inputs_wrapper`` wraps vLLM's ``InputProcessor.process_inputs``, which both
``vllm.LLM`` and the OpenAI server use to build an ``EngineCoreRequest``. A bad spec
raises ``InvalidSteering`` (a ``VLLMValidationError`` and a ``ValueError``): the offline
API raises it for that call, the server answers HTTP 400, and the engine keeps serving
everyone else.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import threading
from typing import Any, Callable

import torch

from vsteer.engine.errors import SteeringError
from vsteer.engine.positions import RULES
from vsteer.engine.registry import VectorRegistry
from vsteer.engine.resolver import ResolvedSteering, SteeringResolver
from vsteer.engine.settings import settings
from vsteer.engine.spec import SteeringSpec

from . import metrics, request_context
from .keys import PINS_KEY, SALT_PREFIX, STEERING_KEY

logger = logging.getLogger("vllm.vsteer")

try:
    from vllm.exceptions import VLLMValidationError as _ValidationBase
except ImportError:  # pragma: no cover - plain-torch installs
    class _ValidationBase(ValueError):  # type: ignore[no-redef]
        def __init__(self, message: str, *, parameter: str | None = None, value: Any = None):
            super().__init__(message)
            self.parameter, self.value = parameter, value


class InvalidSteering(_ValidationBase, ValueError):
    """A request's steering is invalid. ``parameter`` names the field; ``reason`` is a
    short machine-readable code (also the label of the rejection metric)."""

    def __init__(self, err: SteeringError):
        super().__init__(f"invalid steering: {err.field}: {err.message}", parameter=err.field)
        self.reason, self.field = err.reason, err.field


_resolvers: dict[tuple[str | None, int, int], SteeringResolver] = {}
_lock = threading.Lock()


def resolver_for(hidden_size: int, num_layers: int, dtype: Any = None) -> SteeringResolver:
    """One resolver per (vector directory, model shape) per process.

    The directory is part of the key: a process that starts a second engine on another
    ``VSTEER_VECTORS_DIR`` (tests, notebooks) must not validate against the first one's
    vectors while its workers read the new ones."""
    s = settings()
    root = s.vectors_dir
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    key = (str(root) if root else None, hidden_size, num_layers, dtype, s.layers)
    with _lock:
        if key not in _resolvers:
            _resolvers[key] = SteeringResolver(VectorRegistry(root) if root else None,
                                               hidden_size=hidden_size, num_layers=num_layers,
                                               steerable=s.steerable_layers, dtype=dtype)
        return _resolvers[key]


def resolver_for_config(vllm_config: Any) -> SteeringResolver:
    mc = vllm_config.model_config
    return resolver_for(mc.get_hidden_size(), mc.get_total_num_hidden_layers(), getattr(mc, "dtype", None))


# The API server resolves a request once (``http.request_fields``) and hands the result to
# ``process_inputs`` inside ``extra_args``; the seal proves the pins were set by this
# process, not sent by a client (``vllm_xargs`` reaches ``extra_args`` unfiltered).
_SECRET = os.urandom(32)


def _seal_body(spec: dict[str, Any], fingerprint: str, versions: dict[str, str]) -> bytes:
    return json.dumps({"spec": spec, "fingerprint": fingerprint, "versions": versions}, sort_keys=True).encode()


def seal(spec: dict[str, Any], resolved: ResolvedSteering) -> dict[str, Any]:
    """The ``extra_args["vsteer"]`` value carrying a resolution made in this process."""
    mac = hmac.new(_SECRET, _seal_body(spec, resolved.fingerprint, resolved.versions), "sha256").hexdigest()
    return {"fingerprint": resolved.fingerprint, "versions": dict(resolved.versions), "seal": mac}


def unseal(spec: dict[str, Any], pins: Any) -> tuple[str, dict[str, str]] | None:
    """(fingerprint, versions) if ``pins`` was sealed here for exactly ``spec``; else None."""
    if not isinstance(pins, dict) or not isinstance(pins.get("seal"), str):
        return None
    fingerprint, versions = pins.get("fingerprint"), pins.get("versions")
    if not isinstance(fingerprint, str) or not isinstance(versions, dict):
        return None
    expected = hmac.new(_SECRET, _seal_body(spec, fingerprint, versions), "sha256").hexdigest()
    return (fingerprint, versions) if hmac.compare_digest(expected, pins["seal"]) else None


def validate(spec: Any, vllm_config: Any, pins: Any = None) -> ResolvedSteering | None:
    """Resolve a spec against this engine's model and registry, or raise ``InvalidSteering``.

    With ``pins`` sealed by this process's HTTP layer, the content versions it resolved
    are used (the response headers describe that resolution, so the engine must apply it);
    anything else a client put there is ignored."""
    try:
        canonical = _canonical(spec)
        sealed = unseal(canonical, pins)
        resolver = resolver_for_config(vllm_config)
        if sealed is None:
            return resolver.resolve(spec)
        resolved = resolver.resolve(spec, versions=sealed[1])
        if resolved is not None and resolved.fingerprint != sealed[0]:  # cannot happen: same spec, same content
            raise SteeringError("steering changed between validation and queueing", reason="invalid")
        return resolved
    except SteeringError as e:
        metrics.record_rejection(e.reason)
        request_context.note(request_context.REJECTION, e.reason)
        raise InvalidSteering(e) from None


def cache_salt(client_salt: str | None, resolved: ResolvedSteering, prompt_len: int) -> str:
    """A salt that separates steered KV by fingerprint (and prompt length where the rule
    depends on it); within vLLM's 128-character salt rules."""
    key = f"{client_salt or ''}\0{resolved.fingerprint}"
    if RULES[resolved.positions].prompt_relative:
        key += f"\0{prompt_len}"
    return SALT_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:48]


def user_salt(salt: str | None) -> str | None:
    """An unsteered request's own salt, moved out of vsteer's namespace: fingerprints are
    public (response headers), so a client could otherwise send ``vsteer-<hash>`` and
    plant unsteered KV where steered requests will read it."""
    if salt is None or not salt.startswith(SALT_PREFIX):
        return salt
    return "user-" + hashlib.sha256(salt.encode()).hexdigest()[:48]


def _prompt_len(request: Any) -> int:
    """Prompt length in positions, for token prompts and prompt-embeds prompts alike."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    embeds = getattr(request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _canonical(spec: Any) -> dict[str, Any]:
    parsed = SteeringSpec.parse(spec)
    return parsed.to_dict() if parsed is not None else {}


def _unsteered(request: Any) -> Any:
    request.cache_salt = user_salt(request.cache_salt)
    metrics.record_unsteered()
    return request


def process_inputs_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """The one wrapper of ``InputProcessor.process_inputs``: validate, pin, salt, count."""

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        if not extra or STEERING_KEY not in extra:
            request = original(self, request_id, prompt, params, *args, **kwargs)
            sp = getattr(request, "sampling_params", None)
            if sp is not None and sp.extra_args and PINS_KEY in sp.extra_args:
                sp.extra_args = {k: v for k, v in sp.extra_args.items() if k != PINS_KEY} or None
            return _unsteered(request)
        resolved = validate(extra[STEERING_KEY], self.vllm_config, extra.get(PINS_KEY))
        request = original(self, request_id, prompt, params, *args, **kwargs)
        sp = request.sampling_params
        rest = {k: v for k, v in (sp.extra_args or {}).items() if k not in (STEERING_KEY, PINS_KEY)}
        if resolved is None:  # null / no vectors: exactly an unsteered request
            sp.extra_args = rest or None
            return _unsteered(request)
        # A new dict: the caller's params (shared across prompts in LLM.generate) stay untouched.
        # Workers re-resolve by name: pinning each name to the content validated here makes
        # every worker (and every tensor-parallel rank) apply exactly the fingerprinted
        # vectors, even if the set is overwritten or deleted while the request waits.
        sp.extra_args = {**rest, STEERING_KEY: _canonical(extra[STEERING_KEY]),
                         PINS_KEY: {"fingerprint": resolved.fingerprint, "versions": resolved.versions}}
        request.cache_salt = cache_salt(request.cache_salt, resolved, _prompt_len(request))
        metrics.record_request(resolved)
        return request

    return process_inputs
