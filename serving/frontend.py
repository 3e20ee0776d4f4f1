"""Front-end side: validate each request's steering before it is queued, and give
steered requests their own prefix-cache namespace.

Patched into ``InputProcessor.process_inputs``, which both ``vllm.LLM`` and the OpenAI
server use to build an ``EngineCoreRequest``. A bad spec raises ``InvalidSteering``
(a ``VLLMValidationError`` and a ``ValueError``): the offline API raises it for that call,
the server answers HTTP 400, and the engine keeps serving everyone else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

from vsteer.engine.registry import VECTORS_DIR_ENV, VectorRegistry
from vsteer.engine.spec import ResolvedSteering, SteeringError, SteeringResolver

logger = logging.getLogger("vsteer")
STEERING_KEY = "steering"
PINS_KEY = "vsteer"  # extra_args entry the front-end sets for the workers; never trusted from clients
SALT_PREFIX = "vsteer-"  # cache salts of steered requests; no client salt may start with it
# Rules whose token set depends on where the prompt ends: their KV may only be shared by
# requests with the same prompt length, or a later turn would reuse steered "generated"
# KV as its unsteered prompt.
_PROMPT_RELATIVE = {"prompt", "generated", "last"}

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


def resolver_for(hidden_size: int, num_layers: int) -> SteeringResolver:
    """One resolver per (vector directory, model shape) per process.

    The directory is part of the key: a process that starts a second engine on another
    ``VSTEER_VECTORS_DIR`` (tests, notebooks) must not validate against the first one's
    vectors while its workers read the new ones."""
    root = os.environ.get(VECTORS_DIR_ENV)
    key = (root, hidden_size, num_layers)
    with _lock:
        if key not in _resolvers:
            _resolvers[key] = SteeringResolver(VectorRegistry(root) if root else None,
                                               hidden_size=hidden_size, num_layers=num_layers)
        return _resolvers[key]


def resolver_for_config(vllm_config: Any) -> SteeringResolver:
    mc = vllm_config.model_config
    return resolver_for(mc.get_hidden_size(), mc.get_total_num_hidden_layers())


def validate(spec: Any, vllm_config: Any) -> ResolvedSteering | None:
    """Resolve a spec against this engine's model and registry, or raise ``InvalidSteering``."""
    try:
        return resolver_for_config(vllm_config).resolve(spec)
    except SteeringError as e:
        from . import metrics

        metrics.record_rejection(e.reason)
        raise InvalidSteering(e) from None


def cache_salt(client_salt: str | None, resolved: ResolvedSteering, prompt_len: int) -> str:
    """A salt that separates steered KV by fingerprint (and prompt length where the rule
    depends on it); within vLLM's 128-character salt rules."""
    key = f"{client_salt or ''}\0{resolved.fingerprint}"
    if resolved.positions in _PROMPT_RELATIVE:
        key += f"\0{prompt_len}"
    return SALT_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:48]


def user_salt(salt: str | None) -> str | None:
    """An unsteered request's own salt, moved out of vsteer's namespace: fingerprints are
    public (response headers), so a client could otherwise send ``vsteer-<hash>`` and
    plant unsteered KV where steered requests will read it."""
    if salt is None or not salt.startswith(SALT_PREFIX):
        return salt
    return "user-" + hashlib.sha256(salt.encode()).hexdigest()[:48]


def _unsteered(request: Any) -> Any:
    request.cache_salt = user_salt(request.cache_salt)
    return request


def patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor.process_inputs, "_vsteer", False):
        return
    orig = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        if not extra or STEERING_KEY not in extra:
            return _unsteered(orig(self, request_id, prompt, params, *args, **kwargs))
        resolved = validate(extra[STEERING_KEY], self.vllm_config)
        request = orig(self, request_id, prompt, params, *args, **kwargs)
        sp = request.sampling_params
        rest = {k: v for k, v in (sp.extra_args or {}).items() if k != STEERING_KEY}
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
        from . import metrics

        metrics.record_request(resolved)
        return request

    process_inputs._vsteer = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


def _prompt_len(request: Any) -> int:
    """Prompt length in positions, for token prompts and prompt-embeds prompts alike."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    embeds = getattr(request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _canonical(spec: Any) -> dict[str, Any]:
    from vsteer.engine.spec import SteeringSpec

    parsed = SteeringSpec.parse(spec)
    return parsed.to_dict() if parsed is not None else {}
