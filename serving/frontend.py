"""Front-end side: every request enters vLLM's engine here (``InputProcessor.process_inputs``,
used by ``vllm.LLM`` and the OpenAI server alike). Steered requests get their own
prefix-cache namespace and are counted; nothing is resolved twice.

* A request the API server resolved carries a sealed ``SteeringRequest`` (``PINS_KEY``):
  the seal is checked, the cache salted, the request counted. No parse, no resolution.
* ``vllm.LLM`` (and ``vllm run-batch``) pass ``extra_args["steering"]``: it is resolved
  here, once, and sealed the same way.
* In a process that serves HTTP, steering that did not come through vsteer's request
  path (a route that bypasses it, a client's ``vllm_xargs`` on a route vsteer does not
  steer) is refused: a generation carrying steering the server did not apply, describe
  and count is impossible.

A bad spec raises ``InvalidSteering`` (a ``VLLMValidationError`` and a ``ValueError``): the
offline API raises it for that call, the server answers HTTP 400, and the engine keeps
serving everyone else.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from vsteer.engine.errors import SteeringError
from vsteer.engine.spec import SteeringSpec

from . import metrics, request_context
from .keys import PINS_KEY, STEERING_KEY
from .resolvers import resolver_for_model
from .steering_request import CLIENT_KEYS, SteeringRequest, user_salt

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


def refuse(err: SteeringError) -> InvalidSteering:
    """Count a refused steering field and note its reason for the HTTP error body."""
    metrics.record_rejection(err.reason)
    request_context.note(request_context.REJECTION, err.reason)
    return InvalidSteering(err)


def resolve_spec(spec: Any, model_config: Any, source: str = "request") -> SteeringRequest | None:
    """Parse and resolve ``spec`` once against this model and registry (None: no steering);
    raises ``InvalidSteering``."""
    try:
        parsed = SteeringSpec.parse(spec)
        resolved = resolver_for_model(model_config).resolve(parsed)
    except SteeringError as e:
        raise refuse(e) from None
    if resolved is None:
        return None
    return SteeringRequest.of(parsed.to_dict(), resolved, source)  # type: ignore[union-attr]


def _prompt_len(request: Any) -> int:
    """Prompt length in positions, for token prompts and prompt-embeds prompts alike."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    embeds = getattr(request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _steering_of(extra: dict[str, Any] | None, model_config: Any) -> tuple[SteeringRequest | None, Any]:
    """(the request's steering, the sealed value to pass on as is)."""
    sealed = extra.get(PINS_KEY) if extra else None
    request = SteeringRequest.unseal(sealed) if sealed is not None else None
    if request is not None:
        return request, sealed
    if request_context.in_request() and request_context.get(request_context.RESOLVED) is not None \
            and request_context.get(request_context.NOT_APPLIED) is None:
        raise refuse(SteeringError("this route built its engine request without the steering it was asked for; "
                                   "refusing rather than generating unsteered", field="steering",
                                   reason="unsupported_route"))
    if not extra or STEERING_KEY not in extra:
        return None, None
    if request_context.serves_http():
        raise refuse(SteeringError("steering is not applied on this route: send it in the request body of "
                                   "/v1/chat/completions, /v1/completions, /v1/responses or /v1/messages",
                                   field="steering", reason="unsupported_route"))
    request = resolve_spec(extra[STEERING_KEY], model_config)
    return request, (request.seal() if request is not None else None)


def process_inputs_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """The one wrapper of ``InputProcessor.process_inputs``: check the seal (or resolve an
    offline request once), salt, count."""

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        steering, sealed = _steering_of(getattr(params, "extra_args", None), self.vllm_config.model_config)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(request, "sampling_params", None)
        if sp is not None and (sealed is not None or (sp.extra_args and not CLIENT_KEYS.isdisjoint(sp.extra_args))):
            # A new dict: the caller's params (shared across prompts in LLM.generate) stay untouched.
            rest = {k: v for k, v in (sp.extra_args or {}).items() if k not in CLIENT_KEYS}
            if sealed is not None:
                rest[PINS_KEY] = sealed
            sp.extra_args = rest or None
        if steering is None:  # null / no vectors / not mentioned: exactly an unsteered request
            request.cache_salt = user_salt(request.cache_salt)
            metrics.record_unsteered()
            return request
        request.cache_salt = steering.cache_salt(request.cache_salt, _prompt_len(request))
        metrics.record_request(steering)
        request_context.note_engine_request(request_id)
        return request

    return process_inputs
