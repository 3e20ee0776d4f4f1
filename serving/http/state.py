"""The server's state, created once when vLLM builds its app.

``ServerState`` holds everything the steering routes, the middleware and the request
patches share: the configuration, the served model's shape and name, the registry (one
instance per process), the admin keys and the write lock. ``current()`` returns it to
the request patches, which vLLM calls without the app at hand.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from vsteer.engine.registry import VectorRegistry
from vsteer.engine.resolver import ResolvedSteering, SteeringResolver

from .config import ServerConfig


@dataclass
class ServerState:
    config: ServerConfig
    hidden_size: int
    num_layers: int
    model_name: str
    admin_keys: list[str]          # keys that authorise the admin routes
    api_keys: list[str]            # vLLM's --api-key values (its own middleware checks them)
    registry: VectorRegistry | None
    resolver: SteeringResolver
    default_resolved: ResolvedSteering | None = None
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Any = None
    """The per-request steering resolver (``resolution.RequestResolver``), set at install."""
    aliases: Any = None
    """The steered models (``aliases.AliasTable``), set at install."""

    @property
    def default_steering(self) -> dict[str, Any] | None:
        return self.config.default_steering


_current: ServerState | None = None


def set_current(state: ServerState | None) -> None:
    global _current
    _current = state


def current() -> ServerState | None:
    """The state of this process's server (None outside an API server)."""
    return _current
