"""Engine core: turn each steered request's config into table rows before it is queued.

``EngineCore.preprocess_add_request`` runs in the engine core's input thread, in parallel
with the model's forward passes (vLLM initialises grammars there for the same reason).
Here a steered request's config is prepared once per fingerprint: its pinned vectors are
loaded, scaled, orthonormalised and cast (``PreparedSteering``), cached by fingerprint,
and attached to the request (``extra_args[ROWS_KEY]``) for the workers, which only copy
it into a table row. A new tenant's config therefore costs the step loop nothing: the
request waits for its rows, the others do not wait for it.

A request whose pinned content cannot be loaded (deleted by hand past its lease, a node
without the volume) is failed here with vLLM's request-error path, never run unsteered.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from vsteer.engine.cache import ByteLRU
from vsteer.engine.errors import SteeringError
from vsteer.engine.settings import settings

from .failures import SteeringUnavailable
from .keys import PINS_KEY, ROWS_KEY
from .prepared import PreparedSteering
from .resolvers import resolver_for_model
from .steering_request import SteeringRequest


class RowPreparer:
    """Prepared rows by fingerprint, for one model (bounded by ``VSTEER_CACHE_BYTES``)."""

    def __init__(self, model_config: Any):
        self.model_config = model_config
        self.dtype = model_config.dtype
        self._cache: ByteLRU[PreparedSteering] = ByteLRU(settings().cache_bytes, lambda p: p.nbytes + 256)
        self.resolutions = 0
        """How many configs this process resolved (one per fingerprint while cached)."""

    def prepare(self, request: SteeringRequest) -> PreparedSteering:
        """The request's rows (raises ``SteeringError`` if its pinned content is gone)."""
        cached = self._cache.get(request.fingerprint)
        if cached is not None:
            return cached
        resolved = resolver_for_model(self.model_config).resolve(request.spec, versions=request.versions)
        self.resolutions += 1
        if resolved is None or resolved.fingerprint != request.fingerprint:
            raise SteeringError("the pinned steering resolves to other content than the front-end validated",
                                reason="vector_version_gone")
        prepared = PreparedSteering.build(resolved, dtype=self.dtype, max_projections=settings().max_projections)
        return self._cache.put(request.fingerprint, prepared)


_preparers: dict[int, RowPreparer] = {}


def preparer_for(engine_core: Any) -> RowPreparer:
    """One preparer per engine core (its model config)."""
    key = id(engine_core)
    preparer = _preparers.get(key)
    if preparer is None:
        preparer = _preparers[key] = RowPreparer(engine_core.vllm_config.model_config)
    return preparer


def preprocess_add_request_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def preprocess_add_request(self, request, *args, **kwargs):
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None)
        if extra and PINS_KEY in extra:
            steering = SteeringRequest.from_engine(extra[PINS_KEY])
            if steering is None:
                raise SteeringUnavailable(f"vsteer: request {request.request_id}: malformed steering pins; failing "
                                          "it rather than running unsteered")
            try:
                prepared = preparer_for(self).prepare(steering)
            except (SteeringError, OSError) as e:
                raise SteeringUnavailable(f"vsteer: request {request.request_id}: its steering cannot be applied "
                                          f"({getattr(e, 'message', e)}); failing it rather than running unsteered"
                                          ) from None
            sp.extra_args = {**extra, ROWS_KEY: prepared}
        return original(self, request, *args, **kwargs)

    return preprocess_add_request
