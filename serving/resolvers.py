"""One ``SteeringResolver`` per process and model, built from vLLM's model config.

The API server (HTTP path and ``process_inputs`` for ``vllm.LLM``) and the engine core
(``admission``) resolve against the same model shape and dtype; building the resolver
from the model config keeps the dtype in (overflow checks depend on it).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from vsteer.engine.registry import VectorRegistry
from vsteer.engine.resolver import SteeringResolver
from vsteer.engine.settings import settings

_resolvers: dict[tuple, SteeringResolver] = {}
_lock = threading.Lock()


def resolver_for(hidden_size: int, num_layers: int, dtype: Any = None) -> SteeringResolver:
    """One resolver per (vector directory, model shape, dtype, steerable layers) per process.

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


def resolver_for_model(model_config: Any) -> SteeringResolver:
    """The resolver of a vLLM ``ModelConfig`` (hidden size, layers, dtype)."""
    return resolver_for(model_config.get_hidden_size(), model_config.get_total_num_hidden_layers(),
                        getattr(model_config, "dtype", None))
